"""The in-memory train split held on the devices: the same batches as the host-resident stream (one device and
8 fake ones), the same training, exact resume across placements, and "auto" choosing by device memory."""

import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from conftest import REPO, fake_devices
from qkv_vit import data
from qkv_vit.data.errors import DataConfigError
from qkv_vit.train import device_data, sharding, train_and_evaluate
from qkv_vit.train.config import base_config


def memory_config(cache_dir):
    config = data.get_config("none", pipeline="in_memory")
    config.cache_dir = str(cache_dir)
    return config


def test_device_resident_batches_are_the_host_streams(tmp_path):
    config = memory_config(tmp_path)
    mesh = sharding.make_mesh(base_config().mesh, jax.devices())
    batch_sharding = sharding.batch_sharding(mesh)
    source = data.open_source(config)
    steps = source.steps_per_epoch(64)
    host = source.train_batches(64, seed=5, start_step=steps - 2)
    rows = source.train_rows(64, seed=5, start_step=steps - 2)
    resident = device_data.DeviceResidentBatches(source.train_arrays, rows, batch_sharding)
    for _ in range(4):  # across an epoch boundary
        wanted, got = next(host), next(resident)
        assert got["image"].dtype == np.uint8 and got["image"].sharding == batch_sharding
        assert np.array_equal(np.asarray(got["image"]), wanted["image"])
        assert np.array_equal(np.asarray(got["label"]), wanted["label"])


def test_eight_devices_each_gather_the_host_paths_shard(tmp_path):
    script = textwrap.dedent(f"""
        import jax
        import numpy as np
        from qkv_vit import data
        from qkv_vit.train import device_data, sharding
        from qkv_vit.train.config import base_config
        config = data.get_config("none", pipeline="in_memory")
        config.cache_dir = {str(tmp_path)!r}
        batch_sharding = sharding.batch_sharding(sharding.make_mesh(base_config().mesh, jax.devices()))
        source = data.open_source(config)
        host = source.train_batches(64, seed=1)
        resident = device_data.DeviceResidentBatches(source.train_arrays, source.train_rows(64, seed=1), batch_sharding)
        for _ in range(3):
            wanted, got = sharding.global_batch(next(host), batch_sharding), next(resident)
            for key in ("image", "label"):
                pairs = zip(wanted[key].addressable_shards, got[key].addressable_shards)
                assert all(a.device == b.device and np.array_equal(a.data, b.data) for a, b in pairs), key
        print(len(got["image"].addressable_shards))
    """)
    env = {**os.environ, **fake_devices(8), "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "8"


def fake_device(limit, in_use=0):
    return SimpleNamespace(memory_stats=lambda: {"bytes_limit": limit, "bytes_in_use": in_use})


def test_auto_places_the_split_where_it_fits_and_device_refuses_a_split_too_large():
    split = data.in_memory.ArraySplit(np.zeros((100, 8, 8, 3), np.uint8), np.zeros(100, np.int32))
    size = device_data.split_bytes(split)
    assert size == 100 * 8 * 8 * 3 + 400
    roomy, crowded, cpu = (
        fake_device(8 * size),
        fake_device(8 * size, in_use=6 * size),
        SimpleNamespace(memory_stats=lambda: None),
    )
    assert device_data.free_bytes([roomy, crowded]) == 2 * size and device_data.free_bytes([roomy, cpu]) is None
    assert device_data.on_devices("auto", split, [roomy, roomy])  # a quarter of 8x: fits
    assert not device_data.on_devices("auto", split, [roomy, crowded])  # a quarter of 2x: does not
    assert not device_data.on_devices("auto", split, [cpu]) and not device_data.on_devices("auto", split)
    assert device_data.on_devices("device", split, [crowded]) and device_data.on_devices("device", split, [cpu])
    assert not device_data.on_devices("host", split, [roomy])
    with pytest.raises(DataConfigError, match="placement='device': the train split takes .* Use data.placement='host'"):
        device_data.on_devices("device", split, [fake_device(size // 2)])


def test_device_placement_needs_the_in_memory_pipeline():
    config = data.get_config("none", source="digits")
    config.placement = "device"
    with pytest.raises(DataConfigError, match='placement="device".*pipeline="in_memory"'):
        data.validate_config(config)
    config.placement = "everywhere"
    with pytest.raises(DataConfigError, match="placement"):
        data.validate_config(config)


@pytest.mark.slow
def test_training_is_the_same_on_either_placement_and_resumes_across_them(tmp_path, tiny_config):
    tiny_config.data.pipeline = "in_memory"
    tiny_config.data.augment.update(randaugment_layers=0, crop_scale=(0.35, 1.0))
    tiny_config.total_steps = 6
    tiny_config.data.placement = "host"
    host = train_and_evaluate(tiny_config, tmp_path / "host")
    tiny_config.data.placement = "device"
    train_and_evaluate(tiny_config, tmp_path / "switched")
    for step in (4, 6):  # back to step 2, then on under the host placement
        shutil.rmtree(tmp_path / "switched" / "checkpoints" / str(step))
    tiny_config.data.placement = "host"
    switched = train_and_evaluate(tiny_config, tmp_path / "switched")
    for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(switched.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
