"""Installing the package: its TensorFlow requirement is met by the TensorFlow already installed (Colab's `tensorflow`,
a CPU machine's `tensorflow-cpu`), so pip never puts a second distribution of the `tensorflow` module on top."""

import json
import runpy
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")  # its functions, without running setup()


def fake_distribution(site_dir: Path, name: str, version: str = "2.19.0") -> None:
    info = site_dir / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("installed", ["tensorflow", "tensorflow-cpu", "tf-nightly"])
def test_the_installed_tensorflow_is_found(tmp_path, installed):
    fake_distribution(tmp_path, installed)
    fake_distribution(
        tmp_path, "tensorflow-datasets", "4.9.9"
    )  # a tensorflow-* name that provides no module tensorflow
    assert SETUP["installed_tensorflow"]([str(tmp_path)]) == installed


def test_without_tensorflow_none_is_found(tmp_path):
    fake_distribution(tmp_path, "tensorflow-datasets", "4.9.9")
    assert SETUP["installed_tensorflow"]([str(tmp_path)]) is None


def resolved_requirements(tmp_path: Path, installed: str | None) -> list[str]:
    """What pip would install as the package's requirements into a fresh environment that holds `installed`
    (pip's real isolated build of the metadata; --dry-run installs nothing)."""
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if installed:
        fake_distribution(Path(purelib), installed)
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-deps", "--quiet"]
    subprocess.run([*command, "--report", str(report), "-e", str(ROOT)], check=True)
    return json.loads(report.read_text())["install"][0]["metadata"]["requires_dist"]


@pytest.mark.skipif(sysconfig.get_platform() != "linux-x86_64", reason="the default distribution is Linux x86-64's")
@pytest.mark.parametrize(
    "installed, required",
    [
        ("tensorflow", "tensorflow>=2.16"),  # Colab, GPU images: theirs is kept
        ("tensorflow-cpu", "tensorflow-cpu>=2.16"),
        (None, "tensorflow-cpu>=2.16"),  # a fresh CPU machine gets the smaller build
    ],
)
def test_pip_requires_the_tensorflow_the_environment_has(tmp_path, installed, required):
    requirements = resolved_requirements(tmp_path, installed)
    assert [r for r in requirements if r.split(">")[0] in SETUP["TENSORFLOW_DISTRIBUTIONS"]] == [required]


def test_the_tensorflow_distribution_can_be_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_VIT_TENSORFLOW", "tensorflow")
    assert "tensorflow>=2.16" in resolved_requirements(tmp_path, "tensorflow-cpu")
