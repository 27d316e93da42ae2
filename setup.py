"""qkv_vit: XCiT and the SNE / P-SNE / F-SNE query-key-value embeddings in JAX/Flax."""

import os
import platform
import re
import site
import sys
from importlib import metadata

import setuptools

# Distributions that provide the `tensorflow` module. Two of them in one environment overwrite each other's files,
# so the requirement names the one already installed: Colab and GPU images preinstall `tensorflow` (big_vision and
# scenic require it), CPU-only machines are served by the smaller `tensorflow-cpu`.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu", "tensorflow-macos")
TENSORFLOW_VERSION = ">=2.16"


def installed_tensorflow(site_dirs: list[str]) -> str | None:
    """The first of TENSORFLOW_DISTRIBUTIONS installed in site_dirs, if any."""
    found = {re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() for dist in metadata.distributions(path=site_dirs)}
    return next((name for name in TENSORFLOW_DISTRIBUTIONS if name in found), None)


def target_site_dirs() -> list[str]:
    """Where the environment being installed into keeps its packages. pip builds in an isolated environment whose
    sys.path leaves them out, but site still names them: the interpreter and its prefix are the target's."""
    user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    return [d for d in dict.fromkeys([*site.getsitepackages(), *user, *sys.path]) if os.path.isdir(d)]


def tensorflow_requirement() -> str:
    """QKV_VIT_TENSORFLOW (a distribution name) if set, else the installed TensorFlow, else `tensorflow-cpu` where it
    has wheels (Linux x86-64, Windows) and `tensorflow` elsewhere (macOS, ARM)."""
    default = (
        "tensorflow-cpu"
        if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "darwin"
        else "tensorflow"
    )
    chosen = os.environ.get("QKV_VIT_TENSORFLOW") or installed_tensorflow(target_site_dirs()) or default
    return f"{chosen}{TENSORFLOW_VERSION}"


# Lower bounds are the oldest releases that have every API the package calls
# (flax linen + nn.Dropout broadcast_dims, orbax args.Composite/JsonSave, tfds folder_dataset, ...).
INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10.0",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.11.0",
    tensorflow_requirement(),
    "tensorflow-datasets>=4.9.6",
    "ml-collections>=0.1.1",
    "clu>=0.0.12",
    "tensorboard>=2.16",
    "safetensors>=0.4.0",
    "numpy>=1.26",
    "scikit-learn>=1.3",  # ships the offline default data set (8x8 digits)
    "pillow>=10.0",
    "matplotlib>=3.7",  # code-analysis plots
    "absl-py>=2.0",
    "importlib_resources>=6.0",  # tensorflow-datasets imports it when building a data set but does not declare it
    # mimalloc, preloaded by `python -m qkv_vit.main` where no tcmalloc is installed (qkv_vit/allocator.py).
    "cmeel-mimalloc>=3.4; sys_platform == 'linux'",
]

NOTEBOOK_RUNNER = ["nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"]

EXTRAS_REQUIRE = {
    # Reading PyTorch .pth/.pt files. On a CPU-only machine prefer the CPU wheel:
    # pip install torch --index-url https://download.pytorch.org/whl/cpu
    "torch": ["torch>=2.1"],
    # Compiling for TPU slices that are not here (python -m qkv_vit.plan); a TPU VM has libtpu already.
    "tpu": ["libtpu; sys_platform == 'linux'"],
    # The tests execute notebooks/*.ipynb in a Jupyter kernel, so dev includes what runs them.
    # ruff is pinned: another release may format differently, and CI checks the format (pyproject.toml).
    "dev": ["pytest>=7.4", "pytest-xdist>=3.5", "ruff==0.16.9", *NOTEBOOK_RUNNER],
    # Opening the notebooks locally: jupyter lab notebooks/
    "notebooks": [*NOTEBOOK_RUNNER, "jupyterlab>=4.0"],
}

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the functions above
    setuptools.setup(
        name="qkv_vit",
        version="0.1.0",
        description=__doc__,
        long_description=open("README.md", encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        packages=setuptools.find_packages(include=["qkv_vit", "qkv_vit.*"]),
        python_requires=">=3.10",
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS_REQUIRE,
        license="Apache-2.0",
    )
