"""`python -m qkv_vit.main` runs with a faster malloc than glibc's where one is installed (qkv_vit/allocator.py)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from qkv_vit.allocator import CHOICE_VARIABLE, PRELOADED_VARIABLE, choose_allocator

pytestmark = pytest.mark.slow  # trains, starts processes or converts real data: not in `pytest -m "not slow"`


def choose(environ=None, platform="linux", system=("libtcmalloc_minimal.so.4",), wheel="/site/libmimalloc.so.3"):
    return choose_allocator(
        environ or {}, platform, lambda name: system[0] if system and "tcmalloc" in name else None, lambda: wheel
    )


def test_tcmalloc_is_preferred_then_mimalloc_from_the_wheel_then_nothing():
    assert choose() == "libtcmalloc_minimal.so.4"
    assert choose(system=()) == "/site/libmimalloc.so.3"
    assert choose(system=(), wheel=None) is None


def test_the_users_choice_and_other_systems_are_left_alone(tmp_path):
    assert choose({CHOICE_VARIABLE: "system"}) is None
    assert choose({"LD_PRELOAD": "/opt/jemalloc.so"}) is None  # the user's own preload wins
    assert choose({PRELOADED_VARIABLE: "libtcmalloc_minimal.so.4"}) is None  # the re-executed process: once only
    assert choose(platform="darwin") is None
    library = tmp_path / "libmine.so"
    library.write_bytes(b"")
    assert choose({CHOICE_VARIABLE: str(library)}) == str(library)
    with pytest.raises(SystemExit) as stopped:
        choose({CHOICE_VARIABLE: "nowhere.so"})
    assert stopped.value.code == 2  # bad input, as the command's other mistakes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
def test_the_process_reexecutes_itself_with_the_allocator_mapped():
    """The same command line runs again with the library loaded (here: tcmalloc if installed, else the wheel's
    mimalloc, a dependency on Linux), its arguments unchanged."""
    script = (
        "import os, sys; print('started', sys.argv[1:], flush=True); from qkv_vit.allocator import "
        "preload_allocator; preload_allocator(); maps = open('/proc/self/maps').read(); "
        "print('preloaded', os.environ['LD_PRELOAD'], any(n in maps for n in ('tcmalloc', 'mimalloc')))"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", CHOICE_VARIABLE)}
    result = subprocess.run(
        [sys.executable, "-c", script, "--flag=a b", ""], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[:2] == ["started ['--flag=a b', '']"] * 2  # run twice, arguments unchanged (an empty one too)
    assert lines[2].startswith("preloaded ") and lines[2].endswith(" True") and "malloc" in lines[2]
