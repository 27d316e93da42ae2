"""The in-memory pipeline: the same examples as tf.data on an image folder, disjoint and complete per process, device
crop and flip deterministic per seed and step, exact resume, and no TensorFlow needed."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from qkv_vit import data
from qkv_vit.data import cache, in_memory
from qkv_vit.data.testing import write_image_folder
from qkv_vit.train import train_and_evaluate
from qkv_vit.train.finishing import BatchFinishing, finish_train_batch, random_resized_crop

FOLDER = {"train": {"ant": 5, "bee": 7, "cat": 4}, "test": {"ant": 2, "bee": 3, "cat": 2}}


def memory_config(cache_dir, path=None, **augment):
    config = data.get_config("none", source="image_folder" if path else "digits", pipeline="in_memory")
    config.path, config.cache_dir = (str(path) if path else None), str(cache_dir)
    config.augment.update(augment)
    return config


def examples(batches) -> tuple[np.ndarray, np.ndarray]:
    """(labels, images) of every real example, ordered by label and colour: a split's content whatever the order."""
    labels, images = [], []
    for batch in batches:
        real = batch["mask"] > 0
        labels.append(batch["label"][real])
        images.append(batch["image"][real].astype(np.int32))
    labels, images = np.concatenate(labels), np.concatenate(images)
    order = np.lexsort((images.mean(axis=(1, 2))[:, 1], images.mean(axis=(1, 2))[:, 0], labels))
    return labels[order], images[order]


# PNG decodes to the same pixels; a JPEG differs by the IDCT: PIL's accurate integer IDCT against TensorFlow's
# default fast one (tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE") gives PIL's pixels exactly).
@pytest.mark.parametrize("image_format, tolerance", [("png", 0), ("jpg", 4)])
def test_in_memory_holds_the_image_folder_sources_examples(tmp_path, image_format, tolerance):
    """Labels and decoded pixels equal the tf.data image-folder source's (eval pipeline, same size), both splits."""
    write_image_folder(tmp_path / "folder", FOLDER, size=(16, 16), image_format=image_format)
    folder = data.get_config("none", source="image_folder")
    folder.path, folder.cache_dir, folder.image_size = str(tmp_path / "folder"), str(tmp_path / "cache"), 16
    memory = memory_config(tmp_path / "cache", tmp_path / "folder")
    memory.image_size = 16
    info = data.open_source(memory).info
    assert (info.train_examples, info.eval_examples, info.class_names) == (16, 7, ["ant", "bee", "cat"])
    for split in ("train", "test"):
        expected_labels, expected = examples(
            data.open_source(folder).eval_batches(4, split, process_index=0, process_count=1)
        )
        labels, images = examples(data.open_source(memory).eval_batches(4, split, process_index=0, process_count=1))
        assert np.array_equal(labels, expected_labels)
        assert np.abs(images - expected).max() <= tolerance


def test_decoded_once_then_read_from_the_cache(tmp_path):
    write_image_folder(tmp_path / "folder", FOLDER)
    config = memory_config(tmp_path / "cache", tmp_path / "folder")
    source = data.open_source(config)
    (entry,) = (tmp_path / "cache" / "in_memory").glob("*-v2")
    stamp = (entry / "train.images.npy").stat().st_mtime_ns
    again = data.open_source(config)
    assert (entry / "train.images.npy").stat().st_mtime_ns == stamp
    assert isinstance(source.splits["train"].images, np.memmap)  # shared through the page cache by every process
    assert np.array_equal(source.splits["train"].images, again.splits["train"].images)
    assert not source.splits["train"].images.flags.writeable
    assert source.splits["train"].images.shape == (16, 32, 32, 3)  # resized to the config's image_size


def test_a_process_that_decoded_the_same_entry_second_keeps_the_firsts(tmp_path):
    """Processes started together may all decode; the first rename wins, a later one leaves it in place."""
    write_image_folder(tmp_path / "folder", FOLDER)
    config = memory_config(tmp_path / "cache", tmp_path / "folder")
    data.open_source(config)
    (entry,) = (tmp_path / "cache" / "in_memory").glob("*-v2")
    late = tmp_path / "late"
    late.mkdir()
    (late / "meta.json").write_text("{}")
    cache.move_into_place(late, entry, "meta.json")
    assert json.loads((entry / "meta.json").read_text())["splits"] == ["test", "train"]
    unfinished = tmp_path / "cache" / "in_memory" / "unfinished"  # a directory in the way without the marker
    (unfinished / "part").mkdir(parents=True)
    cache.move_into_place(late, unfinished, "meta.json")
    assert sorted(p.name for p in unfinished.iterdir()) == ["meta.json"]


def test_bad_files_are_skipped_and_counted_or_named(tmp_path):
    write_image_folder(tmp_path / "folder", FOLDER)
    (tmp_path / "folder" / "train" / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    info = data.open_source(memory_config(tmp_path / "cache", tmp_path / "folder")).info
    assert info.train_examples == 16 and info.skipped_files.count == 1
    assert info.skipped_files.listed_in.read_text() == "train/ant/broken.jpg\n"
    with pytest.raises(data.DataConfigError, match="broken.jpg"):
        config = memory_config(tmp_path / "cache", tmp_path / "folder")
        config.bad_files = "error"
        data.open_source(config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"randaugment_layers": 2}, "augment.randaugment_layers run only in the tf.data pipelines"),
        ({"color_jitter": 0.4}, "augment.color_jitter"),
    ],
)
def test_host_only_augmentation_is_refused(tmp_path, change, message):
    with pytest.raises(data.DataConfigError, match=message):
        data.open_source(memory_config(tmp_path, **change))


def test_sub_splits_are_refused_with_the_fix(tmp_path):
    config = memory_config(tmp_path)
    config.eval_split = "train[90%:]"
    with pytest.raises(data.DataConfigError, match="set pipeline='tf_data' for sub-splits"):
        data.open_source(config)


def test_processes_read_disjoint_parts_that_cover_every_example(tmp_path):
    config = memory_config(tmp_path)  # the digits: 1,437 train / 360 test
    source = data.open_source(config)
    steps = data.open_source(config).steps_per_epoch(96, process_count=1, local_device_count=1)
    assert steps == 1437 // 96
    labels = source.splits["train"].labels
    ids = {}
    for process in range(3):
        batches = data.open_source(config).train_batches(
            96, seed=7, process_index=process, process_count=3, local_device_count=1
        )
        ids[process] = [next(batches) for _ in range(steps)]
    # Each global batch is the concatenation of the processes' parts, in the epoch's order, without repeats.
    order = in_memory.epoch_order(7, 0, len(labels))[: steps * 96]
    joined = np.concatenate([np.concatenate([ids[p][s]["label"] for p in range(3)]) for s in range(steps)])
    assert np.array_equal(joined, labels[order]) and len(set(order)) == len(order)
    # Evaluation: each process its own part, padded to the same number of batches, every example once.
    parts = [
        data.open_source(config).eval_batches(48, process_index=p, process_count=3, local_device_count=1)
        for p in range(3)
    ]
    assert len({len(part) for part in parts}) == 1
    assert sum(int(b["mask"].sum()) for part in parts for b in part) == 360


def test_the_stream_resumes_exactly_across_an_epoch(tmp_path):
    config = memory_config(tmp_path)
    steps = data.open_source(config).steps_per_epoch(128, process_count=1, local_device_count=1)
    straight = data.open_source(config).train_batches(
        128, seed=3, process_index=0, process_count=1, local_device_count=1
    )
    wanted = [next(straight) for _ in range(steps + 3)]
    resumed = data.open_source(config).train_batches(
        128, seed=3, start_step=steps - 1, process_index=0, process_count=1, local_device_count=1
    )
    for batch in wanted[steps - 1 :]:
        got = next(resumed)
        assert np.array_equal(got["image"], batch["image"]) and np.array_equal(got["label"], batch["label"])


def recipe(**changes) -> BatchFinishing:
    base = dict(mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, geometry=True, flip_prob=0.5)
    return BatchFinishing(**{**base, **changes})


def test_device_crop_and_flip_are_deterministic_per_key_and_flip_mirrors(tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (16, 8, 8, 3)).astype(np.uint8)
    batch = {"image": jnp.asarray(images), "label": jnp.arange(16) % 10}
    finish = jax.jit(lambda batch, key, r: finish_train_batch(batch, key, r), static_argnums=2)
    flips = recipe()
    first = np.asarray(finish(batch, jax.random.key(1), flips)["image"])
    assert np.array_equal(first, np.asarray(finish(batch, jax.random.key(1), flips)["image"]))
    assert not np.array_equal(first, np.asarray(finish(batch, jax.random.key(2), flips)["image"]))
    plain = (images / 255.0 - 0.5) / 0.25
    mirrored = [np.allclose(out, img[:, ::-1], atol=1e-6) for out, img in zip(first, plain)]
    unchanged = [np.allclose(out, img, atol=1e-6) for out, img in zip(first, plain)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and 0 < sum(mirrored) < 16
    cropped = np.asarray(finish(batch, jax.random.key(1), recipe(crop_scale=(0.2, 0.5), flip_prob=0.0))["image"])
    assert cropped.shape == plain.shape and not np.allclose(cropped, plain)


def test_random_resized_crop_with_the_whole_image_is_the_identity_and_stays_in_range():
    image = jnp.asarray(np.random.RandomState(1).randint(0, 256, (12, 12, 3)).astype(np.float32))
    assert np.array_equal(random_resized_crop(image, jax.random.key(0), (1.0, 1.0), (1.0, 1.0)), image)
    for seed in range(5):
        out = random_resized_crop(image, jax.random.key(seed), (0.08, 1.0), (3 / 4, 4 / 3))
        assert out.shape == image.shape and float(out.min()) >= 0 and float(out.max()) <= 255


@pytest.mark.slow
def test_training_in_memory_resumes_to_the_same_parameters(tmp_path, tiny_config):
    tiny_config.data.pipeline = "in_memory"
    tiny_config.data.augment.update(randaugment_layers=0, crop_scale=(0.35, 1.0))
    tiny_config.total_steps = 6
    straight = train_and_evaluate(tiny_config, tmp_path / "straight")
    train_and_evaluate(tiny_config, tmp_path / "resumed")
    for step in (4, 6):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    resumed = train_and_evaluate(tiny_config, tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_in_memory_source_needs_no_tensorflow(tmp_path):
    """Reading, batching and evaluating with TensorFlow and tfds unimportable (as on a machine without them)."""
    code = f"""
import sys
for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None  # any import of them now fails
from qkv_vit import data
config = data.get_config("none", pipeline="in_memory")
config.cache_dir = {str(tmp_path)!r}
batch = next(data.open_source(config).train_batches(32, seed=0, process_index=0, process_count=1, local_device_count=1))
evaluation = data.open_source(config).eval_batches(64, process_index=0, process_count=1, local_device_count=1)
print(batch["image"].shape, sum(int(b["mask"].sum()) for b in evaluation))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["(32,", "32,", "32,", "3)", "360"]


@pytest.mark.slow
def test_training_in_memory_needs_no_tensorflow_tfds_or_clu(tmp_path):
    """The command trains and evaluates with TensorFlow, tfds and clu unimportable (as on a GPU machine without
    them), the train split held on the device as a GPU's would be: metrics.jsonl is written, no TensorBoard
    events, and the console says both."""
    code = f"""
import sys, runpy
for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None
sys.argv = ["main", "--config=configs/quickstart.py:runlocal", "--workdir={tmp_path / "run"}",
            "--config.data.pipeline=in_memory", "--config.data.cache_dir={tmp_path / "cache"}",
            "--config.data.placement=device"]
runpy.run_module("qkv_vit.main", run_name="__main__")
"""
    env = {**os.environ, "QKV_VIT_ALLOCATOR": "system"}  # no re-execution: it would lose the blocked modules
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no TensorBoard events" in run.stderr and "Finished: val/top1" in run.stderr
    assert "In-memory train split (" in run.stderr and "on every device" in run.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val/count"] == 360
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
