"""The same training on 1 device, 8 fake devices (data; data x model with FSDP) and 2 processes gives the
same result; a SIGTERM'd run leaves a checkpoint and resumes to exactly the uninterrupted parameters.

These runs do not mix images (mixup_alpha = cutmix_alpha = 0): mixing pairs images within each device's shard
(qkv_vit.train.finishing), so it depends on the device count by design; random erasing does not.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import REPO, fake_devices
from qkv_vit import data
from qkv_vit.data.pipeline import TFDataSource
from qkv_vit.train import train_and_evaluate
from qkv_vit.train.logging_utils import read_metrics
from qkv_vit.weights import read_weights

pytestmark = pytest.mark.slow  # trains, starts processes or converts real data: not in `pytest -m "not slow"`

TOLERANCE = 2e-5  # float32, different reduction orders across devices


def cli(workdir, *overrides, env_extra=None, data_cache=None):
    command = [
        sys.executable,
        "-m",
        "qkv_vit.main",
        "--config=configs/quickstart.py:runlocal",
        f"--workdir={workdir}",
        "--config.model.embed_dim=32",
        "--config.model.depth=1",
        f"--config.data.cache_dir={data_cache}",
        "--config.data.augment.mixup_alpha=0.0",
        *overrides,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    return command, env


def run_cli(workdir, *overrides, env_extra=None, data_cache=None, timeout=300):
    command, env = cli(workdir, *overrides, env_extra=env_extra, data_cache=data_cache)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def max_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.fixture
def prepared(tiny_config, data_cache):
    data.open_source(tiny_config.data)  # build the digits data set once, before processes race for it
    tiny_config.total_steps = 6
    tiny_config.data.augment.update(mixup_alpha=0.0, cutmix_alpha=0.0)
    return tiny_config


def test_one_device_equals_eight_devices_data_and_fsdp(tmp_path, prepared, data_cache):
    reference = train_and_evaluate(prepared, tmp_path / "one")
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO / "tests")!r})
        import jax
        from conftest import load_config
        from qkv_vit.train import train_and_evaluate
        assert jax.device_count() == 8, jax.devices()
        for name, mesh, strategy in [("data8", dict(data=8, fsdp=1), "replicate"), ("fsdp", dict(data=4, fsdp=2), "fsdp")]:
            config = load_config("quickstart", "runlocal")
            config.model.update(embed_dim=32, depth=1, num_heads=4)
            config.data.cache_dir = {str(data_cache)!r}
            config.total_steps = 6
            config.data.augment.update(mixup_alpha=0.0, cutmix_alpha=0.0)
            config.mesh.update(mesh)
            config.sharding = strategy
            state = train_and_evaluate(config, {str(tmp_path)!r} + "/" + name)
            if strategy == "fsdp":
                kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]
                assert "fsdp" in str(kernel.sharding.spec), kernel.sharding
    """)
    env = {**os.environ, **fake_devices(8), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one_losses = [m["train/loss"] for m in read_metrics(tmp_path / "one") if "train/loss" in m]
    for name in ("data8", "fsdp"):
        variables = read_weights(tmp_path / name).variables
        assert max_difference(variables["params"], jax.device_get(reference.params)) < TOLERANCE
        assert max_difference(variables["batch_stats"], jax.device_get(reference.batch_stats)) < TOLERANCE
        losses = [m["train/loss"] for m in read_metrics(tmp_path / name) if "train/loss" in m]
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROCESS_STREAM = TFDataSource.train_batches


def two_process_stream(source, global_batch_size, *, seed, start_step):
    """What a 2-process job feeds: each global batch is process 0's local batch, then process 1's."""
    parts = [
        PROCESS_STREAM(
            source,
            global_batch_size,
            seed=seed,
            start_step=start_step,
            process_index=i,
            process_count=2,
            local_device_count=1,
        )
        for i in range(2)
    ]
    while True:
        batches = [next(part) for part in parts]
        yield {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_two_processes_train_together_like_one(tmp_path, prepared, data_cache, monkeypatch):
    port = free_port()
    procs = []
    for process_id in range(2):
        command, env = cli(
            tmp_path / "multi",
            "--config.total_steps=6",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
            data_cache=data_cache,
        )
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=400) for p in procs]
    if any(p.returncode for p in procs) and "collectives" in (outputs[0][1] + outputs[1][1]).lower():
        pytest.skip("this jaxlib cannot run CPU collectives between processes (gloo)")
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    monkeypatch.setattr(TFDataSource, "train_batches", two_process_stream)
    reference = train_and_evaluate(prepared, tmp_path / "single")
    variables = read_weights(tmp_path / "multi").variables
    assert max_difference(variables["params"], jax.device_get(reference.params)) < TOLERANCE
    final_eval = [m for m in read_metrics(tmp_path / "multi") if "val/count" in m][-1]
    assert final_eval["val/count"] == 360  # each process evaluated its half; together every example once


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path, prepared, data_cache):
    steps = [
        "--config.total_steps=100",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=0",
        "--config.checkpoint_every_steps=1000",
    ]
    prepared.update(total_steps=100, log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=1000)
    straight = train_and_evaluate(prepared, tmp_path / "straight")

    command, env = cli(tmp_path / "interrupted", *steps, data_cache=data_cache)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(m.get("step", 0) >= 3 for m in read_metrics(tmp_path / "interrupted")):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "interrupted" / "checkpoints").iterdir())
    assert len(saved) == 1 and 3 <= saved[0] < 100  # the signal's checkpoint, and only it
    assert read_weights(tmp_path / "interrupted").variables["params"]  # loadable

    run_cli(tmp_path / "interrupted", *steps, data_cache=data_cache)
    resumed = read_weights(tmp_path / "interrupted").variables
    assert max_difference(resumed["params"], jax.device_get(straight.params)) == 0.0
    assert max_difference(resumed["batch_stats"], jax.device_get(straight.batch_stats)) == 0.0


GHOST_BN = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from qkv_vit import models
images = np.random.default_rng(0).standard_normal((16, 32, 32, 3)).astype(np.float32)
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))  # the trainer's kind of mesh (automatic axes)
results = {}
for impl, group in (("flax", 2), ("flax", 4)):  # groups inside one device's 2 images, and across two (the cpu
    # kernels' groups are checked against flax's in test_layers.py)
    model = models.create("xcit_nano_12_p8", embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1, num_classes=5,
                          layer_impl=impl, batch_norm_group_size=group)
    variables = model.init(jax.random.key(0), images[:2])
    run = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, stats = run(variables, jax.device_put(images, NamedSharding(mesh, PartitionSpec("data"))))
    results[f"{impl}{group}"] = np.asarray(logits)
    results[f"{impl}{group}_var"] = np.asarray(stats["batch_stats"]["blocks_0"]["local_mp"]["bn"]["var"])
# Mixing pairs images within each device's shard: image i's target mixes its label with its shard partner's.
from qkv_vit.train.finishing import BatchFinishing, finish_train_batch

recipe = BatchFinishing(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=16, mixup_alpha=0.8, cutmix_alpha=1.0)
labels = np.arange(16, dtype=np.int32)
batch = {"image": np.zeros((16, 8, 8, 3), np.uint8), "label": labels}
put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
finished = jax.jit(lambda b, k: finish_train_batch(b, k, recipe, mesh))(jax.tree.map(put, batch), jax.random.key(0))
shard = 16 // jax.device_count()
partners = [start + shard - 1 - (i - start) for start in range(0, 16, shard) for i in range(start, start + shard)]
for i, soft in enumerate(np.asarray(finished["soft_label"])):
    assert set(np.flatnonzero(soft > 1e-6)) <= {i, partners[i]}, (i, soft)
results["partners"] = np.asarray(partners)
np.savez(sys.argv[1], **results)
"""


def test_ghost_batch_norm_is_the_same_on_one_and_eight_devices_and_mixing_stays_in_each_shard(tmp_path, monkeypatch):
    """Groups of G consecutive images of the global batch: the result does not depend on the device count.
    Mixup / cutmix pair each image with one of its own device's shard (the script asserts it)."""
    env = {**os.environ, **fake_devices(8), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", GHOST_BN, str(tmp_path / "8.npz")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert jax.device_count() == 1
    monkeypatch.setattr(sys, "argv", ["ghost", str(tmp_path / "1.npz")])
    exec(compile(GHOST_BN, "GHOST_BN", "exec"), {"__name__": "ghost_bn"})  # the same script on this 1-device process
    outputs = {devices: dict(np.load(tmp_path / f"{devices}.npz")) for devices in (1, 8)}
    for key, value in outputs[1].items():
        if key != "partners":
            np.testing.assert_allclose(outputs[8][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    assert list(outputs[8]["partners"]) == [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14]
    assert list(outputs[1]["partners"]) == list(range(15, -1, -1))  # one device: the whole batch reversed
    assert np.abs(outputs[1]["flax2"] - outputs[1]["flax4"]).max() > 1e-4  # the group size matters


BATCH_NORM_ACROSS_SHARDS = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from qkv_vit import models
from qkv_vit.train import sharding
mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, jax.devices())
axes = mesh.axis_names
x = jax.random.normal(jax.random.key(0), (24, 3, 3, 5)) * 3 + 1  # 6 images per device
# Groups inside a shard (2, 3), spanning whole shards (12, 24, None) and straddling them (4, 8); the cpu kernels
# normalize only groups inside a shard (across shards both impls share the same code).
for impl, groups in (("flax", (None, 2, 3, 4, 8, 12, 24)), ("cpu", (2, 3))):
    layer = models.layer_fields(impl)["batch_norm_layer"]
    for group in groups:
        one = layer(use_running_average=False, group_size=group)
        variables = one.init(jax.random.key(1), x)

        def loss(params, module, x):
            y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y)), (y, updates["batch_stats"])

        expected = jax.value_and_grad(loss, has_aux=True)(variables["params"], one, x)
        sharded = layer(use_running_average=False, group_size=group, axis_name=axes)

        def on_shard(params, x):
            (l, (y, stats)), grads = jax.value_and_grad(loss, has_aux=True)(
                jax.lax.pcast(params, axes, to="varying"), sharded, x)
            return (jax.lax.psum(l, axes), (y, stats)), jax.lax.psum(grads, axes)

        got = jax.jit(jax.shard_map(on_shard, mesh=mesh, in_specs=(P(), P(axes)),
                                    out_specs=((P(), (P(axes), P())), P())))(variables["params"], x)
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=f"{impl} {group}")
print("ok")
"""


def test_batch_norm_groups_across_device_shards_equal_one_device():
    """Under shard_map (the train step's gradients) BatchNorm's groups may lie inside a device's shard, span whole
    shards or straddle them: outputs, running statistics and gradients are those of one device."""
    env = {**os.environ, **fake_devices(4), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", BATCH_NORM_ACROSS_SHARDS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


DISTILLED_STEP = """
import sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import load_config
from qkv_vit.train.target import Target
from qkv_vit.train.trainer import build_run
config = load_config("quickstart", "runlocal")
config.model.update(embed_dim=32, depth=1, num_heads=4)
config.data.num_classes = 10
config.data.augment.update(mixup_alpha=0.0, cutmix_alpha=0.0)
config.total_steps, config.optimizer.warmup_steps = 2, 0
config.optimizer.update(lr=1e-3, scale_lr_by_batch=False)  # updates well above the tolerance
config.distillation.update(type="soft", tau=2.0, teacher_model="regnety_test")  # random teacher, 10 classes
if jax.device_count() > 1:
    config.mesh.update(data=2, fsdp=2)
    config.sharding = "fsdp"
run = build_run(config, None, None, target=Target.present())
state = jax.jit(run.steps.init_state, out_shardings=run.steps.state_sharding)()
teacher = run.steps.init_teacher()
initial = jax.tree.leaves(jax.device_get(state.params))
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), "label": np.arange(16, dtype=np.int32) % 10}
batch = {key: jax.device_put(value, run.steps.batch_sharding) for key, value in batch.items()}
for _ in range(2):
    state, metrics = run.steps.train_step(state, batch, teacher)
leaves = jax.tree.leaves(jax.device_get(state.params))
arrays = {**{f"p{i}": leaf for i, leaf in enumerate(leaves)}, **{f"i{i}": leaf for i, leaf in enumerate(initial)}}
np.savez(sys.argv[1], loss=np.asarray(metrics["loss"]), **arrays)
"""


def test_a_distilled_step_is_the_same_on_one_device_and_on_four_with_fsdp(tmp_path, monkeypatch):
    """The teacher (random regnety_test variables, sharded as the parameters under FSDP) supervises each device's
    shard: two steps on 4 devices (data 2 x fsdp 2) give one device's loss and parameters."""
    env = {**os.environ, **fake_devices(4), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", DISTILLED_STEP, str(tmp_path / "4.npz")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["distilled", str(tmp_path / "1.npz")])
    exec(compile(DISTILLED_STEP, "DISTILLED_STEP", "exec"), {"__name__": "distilled"})
    one, four = (dict(np.load(tmp_path / f"{devices}.npz")) for devices in (1, 4))
    assert one.keys() == four.keys() and np.isfinite(one["loss"])
    for key, value in one.items():
        np.testing.assert_allclose(four[key], value, rtol=1e-5, atol=TOLERANCE, err_msg=key)
    moved = max(np.abs(one[f"p{i}"] - one[f"i{i}"]).max() for i in range(len(one) // 2))
    assert moved > 50 * TOLERANCE  # the steps moved the parameters well beyond what the comparison allows
