"""The notebooks: stored clean and valid, and run top to bottom in a real Jupyter kernel on small settings.

Each notebook reads QKV_VIT_NOTEBOOK_SMOKE=1 (a 2-block model, a few steps) and QKV_VIT_NOTEBOOK_WORKDIR
(here a temp dir) in its parameters cell; the kernel starts in the repository root, as in a checkout.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # trains, starts processes or converts real data: not in `pytest -m "not slow"`

nbformat = pytest.importorskip("nbformat", reason='nbformat is not installed: pip install -e ".[dev]"')
nbclient = pytest.importorskip("nbclient", reason='nbclient is not installed: pip install -e ".[dev]"')
kernelspec = pytest.importorskip("ipykernel.kernelspec", reason='ipykernel is not installed: pip install -e ".[dev]"')

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_NAMES = ("quickstart.ipynb", "code_analysis.ipynb")
QKV_VARIANTS = ("fsne_m8", "linear")  # the quickstart notebook's QKV_VARIANTS


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory, data_cache):
    """A `python3` kernel that is this interpreter, the smoke switch, and a temp workdir root."""
    root = tmp_path_factory.mktemp("notebooks")
    kernelspec.write_kernel_spec(root / "jupyter" / "kernels" / "python3")  # argv: sys.executable -m ipykernel_launcher
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        env.setenv("JUPYTER_PATH", str(root / "jupyter"))  # searched first: our python3 spec wins
        env.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        env.setenv("QKV_VIT_NOTEBOOK_SMOKE", "1")
        env.setenv("QKV_VIT_NOTEBOOK_WORKDIR", str(root / "workdirs"))
        env.setenv("QKV_VIT_CACHE", str(data_cache))  # the digits tfds build, shared with the other tests
        yield root / "workdirs"


def run_notebook(name: str) -> nbformat.NotebookNode:
    """Execute every cell; a cell that raises fails the test with its traceback (CellExecutionError)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, startup_timeout=120, resources={"metadata": {"path": str(REPO)}}
    )
    return client.execute()


def outputs(nb: nbformat.NotebookNode, cell_source_part: str) -> list[dict]:
    """The outputs of the one code cell whose source contains cell_source_part."""
    cells = [c for c in nb.cells if c.cell_type == "code" and cell_source_part in c.source]
    assert len(cells) == 1, f"expected one cell containing {cell_source_part!r}, found {len(cells)}"
    return cells[0].outputs


def stdout(cell_outputs: list[dict]) -> str:
    return "".join(o.text for o in cell_outputs if o.output_type == "stream" and o.name == "stdout")


def images(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_stored_valid_without_outputs_and_opens_in_colab(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code_cells), f"{name}: clear outputs before saving"
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.language_info.name == "python"
    assert "colab" in nb.metadata
    parameters = [c for c in code_cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "QKV_VIT_NOTEBOOK_SMOKE" in parameters[0].source


def test_quickstart_notebook_runs_and_plots(notebook_env):
    nb = run_notebook("quickstart.ipynb")

    assert f"qkv_vit checkout: {REPO}" in stdout(outputs(nb, "def find_checkout"))  # found, nothing installed
    built = stdout(outputs(nb, "jax.eval_shape(model.init"))
    assert "fsne_m8" in built and "2,867,656" in built and "(2, 1000)" in built
    table = "".join(o.data.get("text/markdown", "") for o in outputs(nb, "params.format_table"))
    assert "| xcit_nano_12_p16 | fsne_m8 (h=128, m=8) | 2,867,656 |" in table and table.count("xcit_nano_12_p16") == 7

    attention = outputs(nb, "models.capture(")
    assert any("image/png" in o.get("data", {}) for o in attention), "the attention cell showed no figure"
    curves = outputs(nb, "plt.subplots(1, 2")
    assert any("image/png" in o.get("data", {}) for o in curves), "the curves cell showed no figure"
    for qkv in QKV_VARIANTS:
        run = notebook_env / f"quickstart_{qkv}"
        records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        assert any("train/loss" in r for r in records), qkv
        last_eval = [r for r in records if "val/top1" in r][-1]
        num_params = json.loads((run / "model.json").read_text())["num_params"]
        summary = f"{qkv:10s} {num_params:>9,} params   held-out top-1 after {last_eval['step']} steps: {100 * last_eval['val/top1']:.1f}%"
        assert summary in stdout(curves)


def test_code_analysis_notebook_runs_and_shows_the_report(notebook_env):
    nb = run_notebook("code_analysis.ipynb")

    report = json.loads((notebook_env / "code_analysis" / "codes.json").read_text())
    assert list(report["layers"]) == ["blocks_0", "blocks_1"] and report["code_size"] == 8
    assert report["embedding"]["method"] == "pca"
    assert (
        json.loads((notebook_env / "code_analysis" / "tsne" / "codes.json").read_text())["embedding"]["method"]
        == "tsne"
    )
    assert len(images(nb)) == 4, "expected norms, cosines, PCA and t-SNE plots inline"
    printed = json.loads(stdout(outputs(nb, "json.dumps(summary")))
    assert printed == {key: value for key, value in report.items() if key != "embedding"}
    assert "of independent random 8-d vectors" in stdout(outputs(nb, "random_abs_cosine ="))


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_the_install_cell_installs_a_clone_that_imports_only_as_a_namespace_package(name, tmp_path):
    """Colab's situation: the repository cloned into ./qkv_vit (a folder without __init__.py, so `import qkv_vit`
    finds an empty namespace package) and the package not installed: the cell must pip-install the clone. Where
    the package is installed (this environment) it installs nothing."""
    clone = tmp_path / "qkv_vit"
    (clone / "configs").mkdir(parents=True)
    (clone / "configs" / "quickstart.py").write_text("")
    (clone / "qkv_vit").mkdir()
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    install_cell = next("".join(c["source"]) for c in cells if "def is_installed" in "".join(c["source"]))
    script = (
        "import importlib.util, subprocess\n"
        "print('namespace', importlib.util.find_spec('qkv_vit') is not None)\n"  # the trap an import check falls in
        "subprocess.run = lambda args, **kwargs: print('RUN', *args)\n" + install_cell
    )
    # -S -E: no site-packages (nor PYTHONPATH), so the package is not installed there, as on a fresh Colab runtime.
    fresh = subprocess.run(
        [sys.executable, "-S", "-E", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert fresh.returncode == 0, fresh.stderr
    assert (
        "namespace True" in fresh.stdout and f"RUN {sys.executable} -m pip install --quiet -e {clone}" in fresh.stdout
    )
    installed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert installed.returncode == 0 and "RUN" not in installed.stdout, installed.stderr
