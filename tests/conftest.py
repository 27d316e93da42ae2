"""Shared test helpers: where the read-only reference data lives (../shared beside the repository)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests run on CPU devices. Where libtpu is installed (the tpu extra) a JAX process that may look for a TPU
# takes libtpu's lock file, and the planner's TPU compiles in another test process would then abort on it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent JAX compilation cache for the session, inherited by the command-line runs the tests start:
# many tests compile the same tiny model's steps, and every resumed run recompiles what its first run
# compiled (the suite takes about 18% less time with it). Set before anything imports jax; a user's own wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _compilation_cache = tempfile.mkdtemp(prefix="qkv_vit_tests_jax_cache_")
    atexit.register(shutil.rmtree, _compilation_cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny test models compile in under 1 s

# XLA's CPU backend without LLVM's optimizations (-O0) compiles a program in about half the time and runs it more
# slowly. The tests compile hundreds of small programs and run each for a few steps, so the suite takes about a
# fifth less time (20m29s -> 16m03s on the 2-core dev machine, 2026-12-06); a test that runs a program for long, as
# a user would (the README quickstart), takes the flag out again: `full_optimization(env)`.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QKV_VIT_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
SHARED_ABSENT = (
    "the developers' data folder ../shared (reference outputs, CIFAR-10), beside the clone on developer machines and "
    "in CI, is not on this machine, so this test skips; QKV_VIT_SHARED=DIR names another place for it"
)
FIXTURE_NAMES = ("xcit_p8_d2_img64", "xcit_p16_d3_img96_tokensnorm")


def fake_devices(count: int) -> dict[str, str]:
    """Environment entries that give a JAX process `count` CPU devices, keeping the session's other XLA flags."""
    return {"XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={count}"}


def full_optimization(env: dict[str, str]) -> dict[str, str]:
    """`env` without the session's FAST_COMPILE flag: for a process that runs long, as a user's run does."""
    flags = env.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip()
    return {key: value for key, value in env.items() if key != "XLA_FLAGS"} | ({"XLA_FLAGS": flags} if flags else {})


def require_fixtures() -> Path:
    """The reference-output fixtures directory, or skip: it ships with the developers' ../shared, not the repo."""
    if not (FIXTURES / f"{FIXTURE_NAMES[0]}.npz").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES}: {SHARED_ABSENT}")
    return FIXTURES


def load_config(name: str = "quickstart", arg: str | None = "runlocal"):
    """configs/NAME.py's get_config(arg), imported by path as `python -m qkv_vit.main` does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One cache directory for prepared data sets (the digits tfds build) shared by every test."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def tiny_config(data_cache):
    """The quickstart config shrunk further: a 1-block XCiT on 32x32 digits, a few steps."""
    config = load_config("quickstart", "runlocal")
    config.model.update(embed_dim=32, depth=1, num_heads=4)
    config.data.cache_dir = str(data_cache)
    config.async_checkpointing = False
    return config
