"""The benchmark scripts run end to end on a tiny model and end with one JSON line of sane results (no
timing is asserted); the PyTorch model they compare against is timm's XCiT, checked on the fixtures."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, require_fixtures

pytestmark = pytest.mark.slow  # trains, starts processes or converts real data: not in `pytest -m "not slow"`

BENCHMARKS = REPO / "benchmarks"
# A 1-block XCiT on 32x32 images; level-0 LLVM optimization keeps the compiles short (no timing is checked).
TINY_MODEL = ["--image-size", "32", "--depth", "1", "--embed-dim", "32", "--cls-attn-layers", "1"]
TINY_RUN = [*TINY_MODEL, "--batch-size", "4", "--steps", "2", "--warmup", "0"]
FAST_COMPILE = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}


def run_benchmark(script, *args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **FAST_COMPILE}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_positive_finite(*values):
    for value in values:
        assert value > 0 and math.isfinite(value), values


def check_train_step_result(result, qkv):
    assert result["benchmark"] == "train_step" and result["qkv"] == qkv
    assert result["batch_size"] == 4 and result["image_size"] == 32 and len(result["step_times_s"]) == 2
    assert_positive_finite(
        result["images_per_sec"],
        result["step_time_s"],
        result["compile_s"],
        result["params"],
        result["macs_per_image"],
        result["peak_memory_bytes"],
        result["final_loss"],
    )
    assert result["images_per_sec"] == pytest.approx(4 / result["step_time_s"])
    assert result["compiles_in_first_step"] >= 1 and result["recompiled_after_first_step"] is False
    assert result["platform"] == "cpu" and result["mfu"] is None  # no known peak for a CPU
    assert result["peak_memory_source"].startswith("process peak RSS")


def test_parallel_runs_times_processes_that_share_the_machine():
    result = run_benchmark(
        "parallel_runs.py", "--counts", "1,2", "--depth", "1", "--batch-size", "4", "--steps", "2", "--warmup", "0"
    )
    assert result["benchmark"] == "parallel_runs" and set(result["images_per_sec"]) == {"1", "2"}
    (one,), (two,) = result["rounds"]["1"], result["rounds"]["2"]
    assert one["processes"] == 1 and len(one["per_process_images_per_sec"]) == 1
    assert two["processes"] == 2 and len(two["per_process_images_per_sec"]) == 2 and len(two["peak_memory_bytes"]) == 2
    assert_positive_finite(*result["images_per_sec"].values(), *two["per_process_images_per_sec"])
    assert result["platform"] == "cpu" and result["params"] > 0


def test_parallel_estimate_reads_kernels_memory_and_flops_off_the_compiled_step():
    result = run_benchmark("parallel_estimate.py", "--depth", "1", "--kernel-us", "2", "4")
    assert result["benchmark"] == "parallel_estimate" and result["device_kind"] == "cpu" and result["depth"] == 1
    kernels = result["kernels_per_step"]
    assert kernels == sum(result["kernels_by_op"].values()) and kernels > 100  # every parameter's update is one
    assert result["process_memory_bytes"] == result["step_memory_bytes"] + 50_000 * 32 * 32 * 3
    assert result["one_process_images_per_sec"] == pytest.approx([128 / (kernels * 4e-6), 128 / (kernels * 2e-6)])
    assert_positive_finite(result["model_flops_per_step"], result["step_memory_bytes"], result["compile_s"])


def test_train_step_every_qkv_preset_in_one_go():
    result = run_benchmark("train_step.py", *TINY_RUN, "--all-qkv", "--presets", "linear,fsne_m8")
    assert result["benchmark"] == "train_step_all_qkv" and set(result["presets"]) == {"linear", "fsne_m8"}
    for preset, (run,) in result["runs"].items():
        check_train_step_result(run, preset)
    linear, fsne = result["presets"]["linear"], result["presets"]["fsne_m8"]
    assert linear["step_time_vs_linear"] == 1.0 and fsne["step_time_vs_linear"] > 0
    assert fsne["params"] != linear["params"]  # the presets really built different models


def test_infer_reports_each_batch_size():
    result = run_benchmark("infer.py", *TINY_MODEL, "--batch-sizes", "1,4", "--steps", "2", "--qkv", "psne")
    assert result["benchmark"] == "infer" and result["qkv"] == "psne"
    assert [row["batch_size"] for row in result["results"]] == [1, 4]
    for row in result["results"]:
        assert_positive_finite(row["images_per_sec"], row["call_time_s"], row["compile_s"])
        assert row["recompiled_after_first_call"] is False


def test_scaling_table_over_fake_devices_and_two_processes():
    result = run_benchmark("scaling.py", *TINY_RUN, "--devices", "2", "--processes", "2")
    rows = result["results"]
    assert [(row["processes"], row["devices"]) for row in rows] == [(1, 2), (2, 2)]
    assert rows[0]["mesh"] == {"data": 2, "fsdp": 1}
    for row in rows:
        assert_positive_finite(row["images_per_sec"], row["step_time_s"])
        assert row["recompiled_after_first_step"] is False


def test_versus_torch_runs_both_implementations():
    pytest.importorskip("torch", reason="the PyTorch comparison needs torch: pip install -e '.[torch]'")
    result = run_benchmark("versus_torch.py", *TINY_RUN, "--rounds", "1")
    assert result["benchmark"] == "versus_torch" and len(result["ours_rounds"]) == len(result["torch_rounds"]) == 1
    assert_positive_finite(result["ours_images_per_sec"], result["torch_images_per_sec"], result["speedup"])
    assert result["speedup"] == pytest.approx(result["ours_images_per_sec"] / result["torch_images_per_sec"])


def test_small_data_benchmark_runs_every_variant(tmp_path, data_cache):
    result = run_benchmark("small_data.py", "--smoke", "--path", "", "--cache-dir", str(tmp_path))
    assert set(result["median"]) == {"image_folder", "in_memory_host", "in_memory_device"} and result["depth"] == 1
    assert_positive_finite(*result["median"].values())
    for variant in ("in_memory_host", "in_memory_device"):
        wanted = result["median"][variant] / result["median"]["image_folder"]
        assert result["over_image_folder"][variant] == pytest.approx(wanted)


def test_the_pytorch_reference_of_the_short_recipe_trains_and_evaluates(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch reference needs torch: pip install -e '.[torch]'")
    result = run_benchmark("torch_cifar_short.py", "--smoke", "--path", "", "--cache-dir", str(tmp_path))
    assert result["steps"] == 6 and len(result["top1_per_epoch"]) == 2
    assert all(0.0 <= top1 <= 1.0 for top1 in result["top1_per_epoch"])


def test_input_pipeline_benchmark(data_cache):
    result = run_benchmark(
        "input_pipeline.py",
        "--cache-dir",
        str(data_cache),
        "--preset",
        "small",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--batches",
        "2",
        "--no-class-counts",
    )
    assert result["num_examples"] == {"train": 1437, "test": 360}  # the offline digits
    assert_positive_finite(result["median"])


@pytest.mark.parametrize("name", ["xcit_p8_d2_img64", "xcit_p16_d3_img96_tokensnorm"])
def test_torch_reference_is_timm_xcit(name):
    """qkv_vit/torch_xcit.py with the fixtures' timm weights gives timm's logits: it is the reference."""
    torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch: pip install -e '.[torch]'")
    from safetensors.torch import load_file

    from qkv_vit import torch_xcit

    fixture = np.load(require_fixtures() / f"{name}.npz")
    model = torch_xcit.Xcit(**json.loads(str(fixture["config"]))).eval()
    model.load_state_dict(load_file(str(require_fixtures() / f"{name}.safetensors")), strict=True)
    images = torch.from_numpy(fixture["images"]).permute(0, 3, 1, 2)  # fixtures are NHWC, PyTorch NCHW
    with torch.no_grad():
        logits = model(images).numpy()
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True).numpy()
    np.testing.assert_allclose(logits, fixture["logits"], atol=1e-5)
    np.testing.assert_allclose(pre_logits, fixture["pre_logits"], atol=1e-5)


def test_torch_reference_parameter_count_is_timms():
    pytest.importorskip("torch", reason="the PyTorch reference needs torch: pip install -e '.[torch]'")
    from qkv_vit import torch_xcit

    model = torch_xcit.create("xcit_nano_12_p16")
    assert sum(p.numel() for p in model.parameters()) == 3_053_224  # timm's published count


WITHOUT_TENSORFLOW = """
import runpy, sys

class Refuse:  # the GPU machines this script is for have none of these
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).parent))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_device_check_runs_without_tensorflow_and_records_every_measurement(tmp_path):
    """The one-command GPU check, on this CPU with a tiny model: every line of its JSONL is a measurement (or a
    skip with its reason), written as it goes. It builds the trainer's run from configs/imagenet.py and steps it
    with TensorFlow, tfds and clu refused: TF reads data, nothing more."""
    out = tmp_path / "device_check.jsonl"
    command = [
        sys.executable,
        "-c",
        WITHOUT_TENSORFLOW,
        str(BENCHMARKS / "device_check.py"),
        "--smoke",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["device", "copy", "train_step", "timm"]
    assert records[0]["backend"] == "cpu" and records[0]["device_count"] >= 1
    assert_positive_finite(records[1]["uint8_gb_per_s"], records[1]["float32_gb_per_s"])
    step = records[2]
    assert "error" not in step, step
    assert_positive_finite(step["images_per_s"], step["step_ms"], step["compile_s"], step["loss"])
    assert (step["layer_impl"], step["feed"], step["dtype"]) == ("flax", "host", "bfloat16")
    assert len(step["program"]) == 16  # the fingerprint qkv_vit.plan prints for the same config
    assert "images_per_s" in records[3] or "needs torch and timm" in records[3].get("skipped", "")
    assert json.loads(result.stdout.strip().splitlines()[-1])["measured"] == 3


def test_plan_slices_prints_a_row_per_plan_from_the_planners_json():
    """plan_slices.py's table row from one `python -m qkv_vit.plan` JSON summary (the planner itself is tested in
    tests/test_plan.py): the step-time range, images/s, the planner's MFU range and the cost range."""
    sys.path.insert(0, str(BENCHMARKS))
    import plan_slices

    plan = {
        "model": "xcit_nano_12_p16",
        "topology": "v5e:2x2",
        "device_kind": "TPU v5 lite",
        "global_batch_size": 1024,
        "per_chip_batch": 256,
        "fits": True,
        "images_per_s": [10_000.0, 20_000.0],
        "run_hours": [9.4, 12.6],
        "cost": [45.0, 60.5],
        "train": {
            "seconds": [0.05, 0.1],
            "mfu": [0.05, 0.1],
            "memory_bytes": 5 * 2**30,
            "fingerprint": "0123456789abcdef",
        },
    }
    row = plan_slices.row(plan)
    assert row == (
        "| nano_12_p16 | v5e:2x2 | 1024 | 256 | 5.0 | 50.0-100.0 | 10,000-20,000 | 5.0-10.0 | 9.4-12.6 | 45-60 | 01234567 |"
    )
    assert "error: boom" in plan_slices.row({"model": "m", "topology": "t", "batch": 8, "error": "boom"})
