"""A faster malloc for the training process: `python -m qkv_vit.main` preloads one at start, on Linux.

Why: XLA's CPU runtime allocates each step's temporaries afresh from its worker threads (1.5 GB for XCiT-N12/16
at batch 32), and glibc's malloc serves them with fresh mmaps that it unmaps afterwards, so every step faults
its whole working set in again: a CIFAR-10 run here spent 6 of its 22 CPU-minutes in the kernel. glibc's own
MALLOC_* settings remove the faults but make tf.data's threads share one arena (slower overall). tcmalloc
and mimalloc keep freed memory for reuse per thread: 3 to 4 times less kernel time, 15 to 20% less wall time
for the whole run, tf.data included (benchmarks/README.md, "Memory allocator"). TPU VMs ship tcmalloc
for the same reason.

How: before anything heavy is imported, the process re-executes its own command line once with LD_PRELOAD
naming the first allocator found: tcmalloc installed on the system (`apt install libtcmalloc-minimal4`,
the fastest here), else mimalloc from the `cmeel-mimalloc` wheel, a dependency on Linux. The process keeps
its pid (schedulers' signals and exit codes are unchanged). Nothing is preloaded where the user set
LD_PRELOAD, with QKV_VIT_ALLOCATOR=system (glibc's malloc), or off Linux; QKV_VIT_ALLOCATOR=/path/lib.so
preloads that library.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

CHOICE_VARIABLE = "QKV_VIT_ALLOCATOR"  # unset or "auto", "system", or a library's path
PRELOADED_VARIABLE = "QKV_VIT_PRELOADED_ALLOCATOR"  # set in the re-executed process: never re-execute twice
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")  # ctypes.util.find_library names, in order of preference


def mimalloc_from_wheel() -> str | None:
    """libmimalloc.so.* of the cmeel-mimalloc wheel, if installed (cmeel installs under cmeel.prefix/lib)."""
    for site in sys.path:
        found = sorted(glob.glob(os.path.join(site, "cmeel.prefix", "lib", "libmimalloc.so*")))
        if found:
            return found[0]
    return None


def choose_allocator(
    environ: Mapping[str, str],
    platform: str = sys.platform,
    find_library: Callable[[str], str | None] = ctypes.util.find_library,
    find_mimalloc: Callable[[], str | None] = mimalloc_from_wheel,
) -> str | None:
    """The library to preload, or None to keep the process as it is."""
    choice = environ.get(CHOICE_VARIABLE, "auto")
    if not platform.startswith("linux") or choice == "system" or environ.get("LD_PRELOAD"):
        return None
    if PRELOADED_VARIABLE in environ:
        return None
    if choice != "auto":
        if not Path(choice).is_file():
            print(
                f"error: {CHOICE_VARIABLE}={choice!r} is neither 'auto', 'system' nor a library file: set it to auto, "
                "system or the path of a malloc library (e.g. libjemalloc.so.2), or unset it.",
                file=sys.stderr,
            )
            raise SystemExit(2)  # bad input, as main's other mistakes
        return choice
    for name in TCMALLOC_NAMES:
        if library := find_library(name):
            return library
    return find_mimalloc()


def preload_allocator() -> None:
    """Re-execute this process's own command line with the chosen allocator preloaded (returns if none)."""
    library = choose_allocator(os.environ)
    if library is None:
        return
    try:  # the command line as started (python -m ..., python -c ..., a wrapper script): re-run it unchanged
        command_line = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return
    argv = command_line.removesuffix(b"\0").split(b"\0")  # each argument ends with a NUL; empty ones stay
    environ = {**os.environ, "LD_PRELOAD": library, PRELOADED_VARIABLE: library}
    # gperftools' tcmalloc reports every allocation over 1 GiB on stderr; XLA's buffers often are.
    environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**50))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [arg.decode(errors="surrogateescape") for arg in argv], environ)


def describe_allocator() -> str:
    """A line for the log: which malloc this process runs with (the preload checked in /proc/self/maps)."""
    library = os.environ.get(PRELOADED_VARIABLE)
    if library and is_mapped(library):
        return f"{Path(library).name} (preloaded by qkv_vit; {CHOICE_VARIABLE}=system keeps glibc's)"
    if library:
        return f"glibc's malloc: the loader did not preload {library}"
    if os.environ.get("LD_PRELOAD"):
        return f"LD_PRELOAD={os.environ['LD_PRELOAD']} (set by the user)"
    return (
        "glibc's malloc (apt install libtcmalloc-minimal4 for a faster one)"
        if sys.platform.startswith("linux")
        else "the system's malloc"
    )


def is_mapped(library: str) -> bool:
    """Whether the library (a path or a soname such as libtcmalloc_minimal.so.4) is loaded in this process."""
    try:
        return Path(library).name.split(".so")[0] in Path("/proc/self/maps").read_text()
    except OSError:
        return False
