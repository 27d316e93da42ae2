"""Planning a run for devices that are not here: the one path from config to program (build_run for a Target), and
`python -m qkv_vit.plan` compiling the trainer's program for TPU slices on this CPU host.

The TPU compiles run in subprocesses, one at a time: libtpu lets one process per machine compile for a TPU (a lock
file), and the other test processes run with JAX_PLATFORMS=cpu so that they never take it (conftest.py).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import pytest

from conftest import REPO
from qkv_vit import data
from qkv_vit.data.errors import DataConfigError
from qkv_vit.errors import ConfigError
from qkv_vit.plan import hlo, planning
from qkv_vit.plan.chips import Chip, GiB
from qkv_vit.train import program, sharding, trainer
from qkv_vit.train.config import base_config, check_fits
from qkv_vit.train.target import Target

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'"
)
# A one-block XCiT-N12/16 at 32x32 with the whole ImageNet recipe (bf16, BatchNorm groups of 64, erasing, mixing).
TINY_IMAGENET = [
    "--config=configs/imagenet.py:model=nano_12_p16",
    "--config.model.depth=1",
    "--config.model.cls_attn_layers=1",
    "--config.data.image_size=32",
]
ASKING_JAX = ("devices", "device_count", "local_devices", "local_device_count", "process_count", "default_backend")


def run_python(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def plan_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode in (0, 5), result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_run_config():
    config = base_config()
    config.model_name = "xcit_nano_12_p16"
    config.model.update(embed_dim=32, depth=1, num_heads=2, cls_attn_layers=1)
    config.data.image_size = 32
    config.data.augment.erasing_prob = 0.25
    config.global_batch_size = 16
    config.total_steps, config.optimizer.warmup_steps = 10, 2
    return config


def test_building_a_run_for_given_devices_never_asks_jax_which_devices_it_has(monkeypatch):
    """Every choice comes from the Target: its device count, mesh, platform (CPU kernels, erasing one by one)."""
    target = Target(tuple(jax.devices()[:1]), "given")
    for name in ASKING_JAX:
        monkeypatch.setattr(jax, name, lambda *a, _name=name, **k: pytest.fail(f"jax.{_name}() was called"))
    config = tiny_run_config()
    model = trainer.build_model(config, config.data.num_classes)
    check_fits(config, model, target)
    run = trainer.build_run(config, None, None, model, target=target)
    assert trainer.models.layer_impl_of(run.model) == "cpu"
    lowered = program.lower_train_step(run)
    assert "optimization_barrier" in lowered.as_text()  # the CPU kernels' mark
    assert program.fingerprint(lowered) == program.fingerprint(program.lower_train_step(run))


@needs_libtpu
def test_a_run_built_for_a_tpu_slice_on_a_cpu_host_is_the_tpu_program():
    """Built for v5e:2x2 here, with JAX's device questions patched to fail: flax's layers, erasing batched."""
    script = textwrap.dedent(
        f"""
        import jax
        from configs import imagenet
        from qkv_vit import models
        from qkv_vit.train import program, trainer
        from qkv_vit.train.config import check_fits
        from qkv_vit.train.target import Target
        config = imagenet.get_config("model=nano_12_p16")
        config.model.update(depth=1, cls_attn_layers=1)
        config.data.image_size, config.global_batch_size = 32, 64
        target = Target.topology("v5e:2x2")
        for name in {ASKING_JAX!r}:
            setattr(jax, name, lambda *a, _name=name, **k: (_ for _ in ()).throw(AssertionError(_name)))
        model = trainer.build_model(config, None)
        check_fits(config, model, target)
        run = trainer.build_run(config, None, None, model, target=target)
        text = program.lower_train_step(run).as_text()
        print(models.layer_impl_of(run.model), run.steps.train_step is not None,
              "optimization_barrier" in text, run.target.platform)
        """
    )
    result = run_python(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["flax", "True", "False", "tpu"]


@needs_libtpu
@pytest.mark.slow
def test_plan_compiles_the_imagenet_recipe_for_a_v5e_2x2_slice():
    result = run_python(
        ["-m", "qkv_vit.plan", *TINY_IMAGENET, "--topology=v5e:2x2", "--config.global_batch_size=256", "--nomax-batch"]
    )
    plan = plan_json(result)
    assert (plan["chips"], plan["processes"], plan["per_chip_batch"], plan["layer_impl"]) == (4, 1, 64, "flax")
    assert plan["fits"] is True and result.returncode == 0
    train = plan["train"]
    assert 0 < train["memory_bytes"] < plan["hbm_bytes"] and train["flops"] > 0 and train["bytes_accessed"] > 0
    for estimate in ("bandwidth_seconds", "cost_model_seconds", "cycles_seconds"):
        assert 0 < train[estimate] < 1, estimate
    low, high = train["seconds"]  # MFU against v5e's bfloat16 peak, 197 TFLOP/s, at the slowest and fastest
    assert train["mfu"] == pytest.approx([train["flops"] / 197e12 / high, train["flops"] / 197e12 / low])
    assert re.fullmatch(r"[0-9a-f]{16}", train["fingerprint"]) and train["fingerprint"] != plan["eval"]["fingerprint"]
    # Gradients and BatchNorm statistics are all-reduced over the 4 chips; the gradients (the largest) in float32.
    assert {(c["op"], c["group_size"]) for c in train["collectives"]} == {("all-reduce", 4)}
    assert max(train["collectives"], key=lambda c: c["bytes"])["dtypes"] == ["f32"]
    # 500,400 steps: ImageNet's 1,281,167 images (data.catalog) at 256 a step, 400 epochs; priced at v5e's list price.
    assert (plan["steps_per_epoch"], plan["total_steps"]) == (5004, 2_001_600)
    assert plan["cost"][0] == pytest.approx(plan["chip_hours"][0] * 1.20)
    assert plan["images_per_s"][0] <= plan["images_per_s"][1]
    for line in ("Train step (program", "Eval step (program", "Memory: fits.", "Throughput:", "Run: 2001600 steps"):
        assert line in result.stdout, line


@needs_libtpu
@pytest.mark.slow
def test_plan_compiles_for_a_256_chip_64_process_slice_and_warns_of_what_changes_there():
    result = run_python(
        [
            "-m",
            "qkv_vit.plan",
            *TINY_IMAGENET,
            "--topology=v5e:16x16",
            "--config.global_batch_size=1024",
            "--nomax-batch",
            "--price-per-chip-hour=2",
            "--config.gradient_all_reduce_dtype=bfloat16",
        ]
    )
    plan = plan_json(result)
    assert (plan["chips"], plan["processes"], plan["per_chip_batch"]) == (256, 64, 4)
    # BatchNorm's groups of 64 images span 16 chips: their statistics are summed over all 256, as the gradients.
    assert {c["group_size"] for c in plan["train"]["collectives"]} == {256}
    assert max(plan["train"]["collectives"], key=lambda c: c["bytes"])["dtypes"] == ["bf16"]
    warnings = " ".join(plan["warnings"])
    assert "BatchNorm groups of 64 images span the chips' shards of 4 images" in warnings and "mixes" in warnings
    assert plan["cost"][1] == pytest.approx(plan["chip_hours"][1] * 2)


@needs_libtpu
@pytest.mark.slow
def test_plan_shows_what_fsdp_compiles_to():
    result = run_python(
        ["-m", "qkv_vit.plan", *TINY_IMAGENET, "--topology=v5e:2x2", "--config.global_batch_size=256",
         "--config.sharding=fsdp", "--config.mesh.fsdp=4", "--config.mesh.data=1", "--nomax-batch"]
    )  # fmt: skip
    plan = plan_json(result)
    ops = {c["op"] for c in plan["train"]["collectives"]}
    assert "all-gather" in ops  # the sharded parameters, gathered for the step
    if "reduce-scatter" not in ops:  # XLA all-reduces the gradients in full: said, not hidden
        assert any("no reduce-scatter" in warning for warning in plan["warnings"])


@needs_libtpu
def test_a_topology_that_does_not_exist_is_one_error_line():
    result = run_python(["-m", "qkv_vit.plan", *TINY_IMAGENET, "--topology=v5e:3x7x9x2"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # libtpu logs its own lines
    assert result.returncode == 2 and result.stdout == "" and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: Cannot describe TPU topology 'v5e:3x7x9x2': ") and "v5e:16x16" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_trainer_logs_the_fingerprint_the_planner_prints_for_the_same_config_and_devices(tmp_path):
    """Planned for this machine's CPU devices, then trained: the program that ran is the program planned."""
    config = ["--config=configs/quickstart.py:runlocal"]
    plan = plan_json(run_python(["-m", "qkv_vit.plan", *config]))
    trained = run_python(["-m", "qkv_vit.main", *config, f"--workdir={tmp_path}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"Train step program {plan['train']['fingerprint']} on " in (tmp_path / "log.txt").read_text()
    assert plan["layer_impl"] == "cpu" and plan["fits"] is None  # a CPU has no chip figures


def test_a_run_without_data_takes_its_length_from_the_catalog_or_says_what_to_set():
    config = base_config()
    config.data = data.get_config("xcit", source="tfds", name="imagenet2012")
    config.global_batch_size, config.total_epochs, config.optimizer.warmup_epochs = 1024, 2.0, 1.0
    target = Target(tuple(jax.devices()[:1]), "given")
    assert trainer.epoch_length(config, None, target) == 1_281_167 // 1024
    config.data.train_split = "train[:90%]"
    with pytest.raises(DataConfigError, match="not in qkv_vit/data/catalog.py.*set config.total_steps"):
        trainer.epoch_length(config, None, target)
    config.total_steps, config.optimizer.warmup_steps = 100, 10
    assert trainer.epoch_length(config, None, target) is None


def test_a_mesh_axis_the_mesh_does_not_have_is_an_error_not_ignored():
    with pytest.raises(ValueError, match=r"Unknown mesh axes \['model'\]"):
        sharding.make_mesh({"data": -1, "model": 1}, jax.devices())


def test_collectives_are_read_from_every_form_of_replica_groups():
    text = textwrap.dedent(
        """
        %all-reduce.1 = (bf16[128]{0}, f32[4,8]{1,0}) all-reduce(%a, %b), replica_groups=mesh['axis_0'=16,'axis_1'=16] {'axis_1'}, to_apply=%add
          %ag = f32[64]{0} all-gather(%c), replica_groups=[2,4]<=[8], dimensions={0}
          ROOT %rs = bf16[8]{0} reduce-scatter(%d), replica_groups={{0,1},{2,3}}, dimensions={0}
        %x = f32[2]{0} add(%e, %f), metadata={"estimated_cycles":"30"}, backend_config={"estimated_cycles":"12"}
        """
    )
    found = hlo.collectives(text, device_count=256)
    assert [(c.op, c.dtypes, c.arrays, c.bytes, c.group_size) for c in found] == [
        ("all-reduce", ("bf16", "f32"), 2, 128 * 2 + 32 * 4, 16),
        ("all-gather", ("f32",), 1, 256, 4),
        ("reduce-scatter", ("bf16",), 1, 16, 2),
    ]
    assert hlo.summed_cycles(text) == 42
    assert hlo.grouped(found)[0].startswith("1 all-reduce (bf16/f32) over groups of 16 chips: 2 arrays")


def test_a_v4_or_v5p_topology_without_megacore_is_refused_before_libtpu_is_asked():
    """Their VMs run a chip as one device; planned per TensorCore, every per-chip figure would be half a chip's."""
    for name in ("v4:2x2x2", "v5p:2x2x4"):
        with pytest.raises(ConfigError, match="add --chip-config megacore"):
            Target.topology(name)


def test_the_largest_batch_that_fits_is_read_off_two_compiles_linear_in_the_batch(monkeypatch):
    """Memory m(b) = fixed + per-image x b through the compiles at b and b / 2; the largest b with m(b) <= HBM."""
    chip = Chip("test", 16 * GiB, 1e12, 1e14, 1e9, 1.0)
    config = tiny_run_config()
    config.global_batch_size = 64  # 16 per chip on 4 chips; the half compile is at 8 per chip
    four = Target(tuple(jax.devices()[:1]) * 4, "four")
    monkeypatch.setattr(planning, "planned_run", lambda config, target: config.global_batch_size)
    monkeypatch.setattr(program, "lower_train_step", lambda run: run)
    compiled = {32: 1 * GiB + 8 * 100 * 2**20}  # the half batch's step: 1 GiB fixed, 100 MiB per image
    monkeypatch.setattr(planning, "compile_step", lambda batch, target: planning.StepCost(
        "x", compiled[batch], None, None, None, None, None, None, ()))  # fmt: skip
    largest = planning.largest_batch(config, four, 1 * GiB + 16 * 100 * 2**20, chip)
    assert largest == (15 * 1024) // 100  # (16 GiB - 1 GiB) / 100 MiB
