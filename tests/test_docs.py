"""The README and docs/ say what works: every command in a ```bash block runs (or, for a training command, builds
its config and model, as test_configs does for config docstrings; launchers with --dry-run), every ```python block
executes, every relative link resolves, and the README's quickstart runs exactly as written, its console output on
two screens. A command no checker knows fails here: a new kind of command needs its checker."""

import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from conftest import full_optimization, load_config
from qkv_vit.train import trainer
from qkv_vit.train.config import check_config, check_fits
from qkv_vit.train.target import Target

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
USER_PAGES = [page for page in PAGES if page.name != "development.md"]  # development.md is for developers
SCREEN_LINES = 24  # a terminal's classic height
CONVERTED = "converted/nano"  # where the docs convert XCiT-N12/16's PyTorch weights to
SETUP = runpy.run_path(str(REPO / "setup.py"), run_name="setup")  # its EXTRAS_REQUIRE, without running setup()


def fenced(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[tuple[str, str]]:
    """(command, trailing comment) pairs: continuation lines joined, `a && b` split."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        command, _, comment = line.partition("  # ")
        if command.strip().startswith("#") or not command.strip():
            continue
        found += [(part.strip(), comment.strip()) for part in command.split("&&")]
    return found


def documented_commands() -> list[tuple[str, str, str]]:
    return [(page.name, *c) for page in PAGES for block in fenced(page, "bash") for c in commands(block)]


def command_id(case) -> str:
    return f"{case[0]}: {case[1][:90]}"


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory, data_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QKV_VIT_CACHE", str(data_cache))  # the digits, prepared once for every command here
        yield make_user_dir(tmp_path_factory)


def make_user_dir(tmp_path_factory) -> Path:
    """A user's working directory: a copy of the repository's configs/, its launch/, a finished quickstart run (runlocal) at
    workdirs/quickstart, and, where torch is installed, XCiT-N12/16 weights as a .pth file (random, in timm's
    layout) under the name the docs use for the official file."""
    home = tmp_path_factory.mktemp("user")
    # A copy, not a link: configs/cifar10.py then looks for its data beside this clone, which has no ../shared.
    shutil.copytree(REPO / "configs", home / "configs", ignore=shutil.ignore_patterns("__pycache__"))
    (home / "launch").symlink_to(REPO / "launch")
    run = run_command(
        home,
        [
            "-m",
            "qkv_vit.main",
            "--config=configs/quickstart.py:runlocal",
            "--workdir=workdirs/quickstart",
        ],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    try:
        import torch

        from qkv_vit import torch_xcit

        torch.save(torch_xcit.create("xcit_nano_12_p16").state_dict(), home / "xcit_nano_12_p16_224.pth")
    except ImportError:
        return home
    converted = run_command(
        home, ["-m", "qkv_vit.convert", "xcit_nano_12_p16_224.pth", CONVERTED, "--model", "xcit_nano_12_p16"]
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    return home


def run_command(
    cwd: Path, args: list[str], timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def training_config(argv: list[str], cwd: Path):
    """The config `python -m qkv_vit.main ARGV` would train, parsed by the flags main uses (config_flags reads
    --config.KEY overrides from sys.argv itself, so it is swapped during the parse)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    saved, sys.argv = sys.argv, ["main", *argv]
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        values(sys.argv)
        return values.config
    finally:
        sys.argv = saved
        os.chdir(previous)


# Image folders a README command may read: made by the README's own commands, or the user's own (its "Your own
# data" section). Anything else, ../shared above all, exists only on developer machines.
README_DATA = {"data/my_images"} | {
    command.split("--image_folder")[1].split()[0].strip("=")
    for block in fenced(REPO / "README.md", "bash")
    for command, _ in commands(block)
    if "qkv_vit.data.prepare" in command and "--image_folder" in command
}


def check_readme_data(config, cwd: Path) -> None:
    """A README training command reads data a user's clone has: what the README makes, or the user's own folder."""
    if config.data.source != "image_folder":
        return
    path = os.path.relpath(os.path.abspath(os.path.join(cwd, config.data.path)), cwd)
    assert path in README_DATA, f"a README command reads {config.data.path}, which a user's clone does not have"


def check_training_command(argv: list[str], comment: str, cwd: Path, page: str = "") -> None:
    expected_exit = re.search(r"exit code (\d+)", comment)
    if expected_exit:  # a documented failure: run it, it fails before any data is read
        run = run_command(cwd, ["-m", "qkv_vit.main", *argv])
        errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert run.returncode == int(expected_exit.group(1)) and len(errors) == 1, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        return
    if CONVERTED in " ".join(argv) and not (cwd / CONVERTED).exists():
        pytest.skip("fine-tuning converted weights needs a .pth file converted with the torch extra")
    config = training_config(argv, cwd)
    if page == "README.md":
        check_readme_data(config, cwd)
    previous = os.getcwd()
    os.chdir(cwd)  # init_from and other relative paths are the user's
    try:
        check_config(config)
        check_fits(config, trainer.build_model(config, config.data.num_classes), Target.present())
    finally:
        os.chdir(previous)


PLAN_FLAGS = {"--topology": r"v\d+[a-z]*:\d+(x\d+)+", "--chip-config": r"megacore", "--price-per-chip-hour": r"[\d.]+"}


def check_plan_command(argv: list[str], cwd: Path) -> None:
    """A documented `python -m qkv_vit.plan`: its own flags well formed, its config valid and buildable. Compiling
    for a TPU is tests/test_plan.py's (libtpu lets one process compile at a time; this file runs beside it)."""
    rest, args = [], iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name in PLAN_FLAGS:
            value = value or next(args)
            assert re.fullmatch(PLAN_FLAGS[name], value), arg
        elif arg not in ("--nomax-batch", "--max-batch"):
            rest.append(arg)
    config = training_config(rest, cwd)
    check_config(config)
    trainer.build_model(config, config.data.num_classes)


def check_pip_install(args: list[str]) -> None:
    """`.ci/run` installs the package with its extras from scratch; here: every extra named exists."""
    targets = [arg for arg in args if not arg.startswith("-")]
    assert targets, args
    for target in targets:
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target.strip("\"'"))
        assert extras, f"pip install {target}: the docs install this package only"
        assert set(filter(None, (extras.group(1) or "").split(","))) <= set(SETUP["EXTRAS_REQUIRE"])


def check_ci_command(command: str, args: list[str]) -> None:
    """pytest and ruff run in .ci/run; a variant must name an existing marker or file."""
    ci = (REPO / ".ci" / "run").read_text()
    if command in ci:
        return
    for arg in args:
        if arg.startswith("tests/"):
            assert (REPO / arg).is_file(), arg
    if "-m" in args[3:]:
        marker = args[args.index("-m", 3) + 1].replace("not ", "")
        assert marker in (REPO / "pyproject.toml").read_text()


def check_tfds_build(args: list[str]) -> None:
    """Building a tfds data set needs the data (and a network): the flags given must be tfds's own."""
    help_text = subprocess.run(["tfds", "build", "--help"], capture_output=True, text=True, check=True).stdout
    for arg in args[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in help_text, arg


TOOLS = (
    "qkv_vit.params",
    "qkv_vit.sweep",
    "qkv_vit.results",
    "qkv_vit.analysis",
    "qkv_vit.data.inspect",
    "qkv_vit.evaluate",
)


def check_export_command(argv: list[str], cwd: Path) -> None:
    """A documented `python -m qkv_vit.export WEIGHTS OUT`: skipped where it needs torch (a .pth file to write, or
    converted weights, which the user dir has only with torch); OUT removed first, so the command may run again."""
    needs_torch = "--safetensors" not in argv or CONVERTED in argv[0]
    if needs_torch and importlib.util.find_spec("torch") is None:
        pytest.skip(
            "writing a .pth file, or converted weights to export, needs the torch extra: pip install -e '.[torch]'"
        )
    assert (cwd / argv[0]).exists(), f"the user dir has no {argv[0]} to export"
    shutil.rmtree(cwd / argv[1], ignore_errors=True)


def offline_prepare_args(argv: list[str], cwd: Path) -> list[str]:
    """`qkv_vit.data.prepare NAME [--data_dir D] [--manual_dir M] [--image_folder F]` with the offline digits for
    NAME and the directories moved into the user's (tfds's default data_dir there too): ImageNet or CIFAR cannot be
    fetched here, the flags and the code path are the same."""
    moved = [arg.split("=")[0] + "=" + str(cwd / arg.split("=")[1].lstrip("/")) if "=" in arg else arg for arg in argv]
    moved = [
        str(cwd / arg.lstrip("/")) if previous in ("--data_dir", "--manual_dir", "--image_folder") else arg
        for previous, arg in zip(["", *moved], moved)
    ]
    if not any(arg.startswith("--data_dir") for arg in moved):
        moved.append(f"--data_dir={cwd / 'tensorflow_datasets'}")
    return ["sklearn_digits", *moved[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("case", documented_commands(), ids=command_id)
def test_documented_command_works(case, user_dir):
    page, command, comment = case
    args = shlex.split(command)
    if args[:2] == ["pip", "install"]:
        return check_pip_install(args[2:])
    if args[:3] == ["python", "-m", "pytest"] or args[0] == "ruff":
        return check_ci_command(command, args)
    if args[:2] == ["tfds", "build"]:
        return check_tfds_build(args)
    assert args[:2] == ["python", "-m"], f"no checker for `{command}`: add one to tests/test_docs.py"
    module, argv = args[2], args[3:]
    if module == "qkv_vit.main":
        return check_training_command(argv, comment, user_dir, page)
    if module == "qkv_vit.plan":
        return check_plan_command(argv, user_dir)
    if module.startswith("launch."):
        argv = argv if "--dry-run" in argv else [*argv, "--dry-run"]
    elif module == "qkv_vit.data.prepare":
        argv = offline_prepare_args(argv, user_dir)
    elif module == "qkv_vit.convert":
        if not (user_dir / argv[0]).exists():
            pytest.skip("converting a .pth file needs the torch extra: pip install -e '.[torch]'")
        shutil.rmtree(user_dir / argv[1], ignore_errors=True)  # converted when the user dir was made
    elif module == "qkv_vit.export":
        check_export_command(argv, user_dir)
    else:
        assert module in TOOLS, f"no checker for `{command}`: add one to tests/test_docs.py"
    run = run_command(user_dir, ["-m", module, *argv])
    assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


def python_blocks() -> list[tuple[str, int, str]]:
    return [(page.name, i, block) for page in PAGES for i, block in enumerate(fenced(page, "python"))]


@pytest.mark.slow
@pytest.mark.parametrize("case", python_blocks(), ids=lambda case: f"{case[0]} block {case[1]}")
def test_documented_python_runs(case, user_dir):
    _, _, code = case
    if "xcit_nano_12_p16_224.pth" in code and not (user_dir / "xcit_nano_12_p16_224.pth").exists():
        pytest.skip("reading a .pth file needs the torch extra: pip install -e '.[torch]'")
    if "torch_xcit" in code and importlib.util.find_spec("torch") is None:
        pytest.skip("the PyTorch XCiT needs the torch extra: pip install -e '.[torch]'")
    for exported in re.findall(r'export_weights\([^,]+, "([^"]+)"', code):
        shutil.rmtree(user_dir / exported, ignore_errors=True)  # the block may run again in the same user dir
    run = run_command(user_dir, ["-c", code])
    assert run.returncode == 0, run.stderr[-3000:]


def test_documented_commands_were_found():
    found = {page for page, _, _ in documented_commands()}
    assert {
        "README.md",
        "training.md",
        "experiments.md",
        "launching.md",
        "models.md",
        "data.md",
        "evaluation.md",
    } <= found


def slug(header: str) -> str:
    """GitHub's anchor for a markdown header."""
    return re.sub(r"[^\w\- ]", "", header.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#][^)]*?|#[^)]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            headers = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert anchor in {slug(h) for h in headers}, f"{page.name}: {target}"


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda page: page.name)
def test_user_pages_need_nothing_a_users_clone_lacks(page):
    text = page.read_text()
    assert "../shared" not in text and "PAPER.md" not in text


def test_readme_is_a_door_not_a_manual():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 300
    setup = fenced(REPO / "README.md", "bash")[0].strip().splitlines()
    assert len(setup) == 2 and setup[0].startswith("pip install -e . && python -m qkv_vit.main")
    assert setup[1] == 'pip install -e ".[dev,tpu]" && python -m pytest -q'
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written_and_fits_on_two_screens(tmp_path):
    """The README's first command, with only its workdir moved into a temp dir."""
    command = fenced(REPO / "README.md", "bash")[0].splitlines()[0].split(" && ")[1]
    args = shlex.split(command.replace("--workdir=workdirs/quickstart", f"--workdir={tmp_path / 'quickstart'}"))
    assert args[:3] == ["python", "-m", "qkv_vit.main"]
    run = run_command(REPO, args[1:], env=full_optimization(dict(os.environ)))  # 600 steps: as a user runs them
    assert run.returncode == 0, run.stderr[-3000:]
    console = (run.stdout + run.stderr).splitlines()
    assert len(console) <= 2 * SCREEN_LINES, "\n".join(console)
    assert "Finished: val/top1" in console[-1] and str(tmp_path / "quickstart") in console[-1]
    top1 = float(re.search(r"val/top1 ([\d.]+)", console[-1]).group(1))
    assert top1 >= 0.97  # the README says about 99%
    assert not [line for line in console if "ownload" in line]


@pytest.mark.slow
def test_the_readmes_own_data_command_learns_a_small_folder(tmp_path, data_cache, monkeypatch):
    """The README's own-data command, as written, on a folder of 2 classes x 20 train images (red-ish and blue-ish
    noise) with a tiny model: above chance on the held-out images."""
    block = fenced(REPO / "README.md", "bash")
    (command, _), *_ = [c for text in block for c in commands(text) if "path=data/my_images" in c[0]]
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 10)):
        for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (tmp_path / "data" / "my_images" / split / label).mkdir(parents=True)
            for i in range(count):
                noise = rng.normal(0, 50, (32, 32, 3)) + colour
                image = Image.fromarray(noise.clip(0, 255).astype(np.uint8))
                image.save(tmp_path / "data" / "my_images" / split / label / f"{i}.png")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.setenv("QKV_VIT_CACHE", str(data_cache))
    tiny = ["--config.model.depth=1", "--config.model.embed_dim=32", "--config.model.num_heads=4"]
    run = run_command(tmp_path, [*shlex.split(command)[1:], *tiny])
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "workdirs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val/top1" in r][-1]
    assert final["step"] == 30 * (40 // 16) and final["val/top1"] > 0.5  # 2 classes: chance is 0.5


def test_readme_commands_may_read_only_data_a_users_clone_has(tmp_path):
    config = load_config("cifar10", "recipe=short")  # on this machine: whatever configs/cifar10.py finds
    config.data.path = str(REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")  # a developer machine's
    with pytest.raises(AssertionError, match="which a user's clone does not have"):
        check_readme_data(config, tmp_path)
    assert "data/cifar10" in README_DATA  # made by the README's prepare command
    config.data.path = "data/cifar10"
    check_readme_data(config, tmp_path)
