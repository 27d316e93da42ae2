"""Train/eval batches: format, determinism, exact resume, repeated augmentation, per-process sharding, exact eval."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qkv_vit import data
from qkv_vit.data import sources
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.testing import ids_from_images, write_image_folder

# Flat-colour images whose colour is their id: 50 train and 23 test examples in 3 classes.
FOLDER = {"train": {"ant": 20, "bee": 17, "cat": 13}, "test": {"ant": 7, "bee": 5, "cat": 11}}
ONE_PROCESS = dict(process_index=0, process_count=1, local_device_count=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "images"
    ids = write_image_folder(root, FOLDER)
    return root, ids


def folder_config(folder, cache_dir, preset="none", **overrides):
    config = data.get_config(preset, source="image_folder")
    config.path, config.cache_dir, config.image_size = str(folder[0]), str(cache_dir), 8
    config.update(overrides)
    return config


def digits_config(cache_dir, preset="xcit", **overrides):
    config = data.get_config(preset)
    config.cache_dir, config.image_size = str(cache_dir), 16
    config.update(overrides)
    return config


def split_ids(folder, split):
    return sorted(i for name, i in folder[1].items() if name.startswith(split + "/"))


# ---- train batches ----


def test_train_batches_leave_the_host_as_uint8_for_the_device_to_finish(cache_dir):
    batch = next(data.open_source(digits_config(cache_dir)).train_batches(32, seed=0, **ONE_PROCESS))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    evaluation = next(iter(data.open_source(digits_config(cache_dir)).eval_batches(32, **ONE_PROCESS)))
    assert evaluation["image"].dtype == np.uint8 and evaluation["mask"].dtype == np.float32


def take(iterator, count):
    return list(itertools.islice(iterator, count))


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_batches_other_seed_other_batches(cache_dir):
    config = digits_config(cache_dir)
    first = take(data.open_source(config).train_batches(64, seed=1, **ONE_PROCESS), 2)
    assert_same_batches(first, take(data.open_source(config).train_batches(64, seed=1, **ONE_PROCESS), 2))
    other = take(data.open_source(config).train_batches(64, seed=2, **ONE_PROCESS), 1)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_resuming_at_step_k_continues_the_stream_exactly(cache_dir):
    config = digits_config(cache_dir)  # full recipe: random crops, RandAugment, erasing, mixup, repeats x3
    steps = data.open_source(config).steps_per_epoch(256, process_count=1, local_device_count=1)
    assert steps == 1437 // 256
    fresh = take(data.open_source(config).train_batches(256, seed=3, **ONE_PROCESS), steps + 3)
    for start in (2, steps + 1):  # inside the first epoch, and inside the second
        resumed = take(
            data.open_source(config).train_batches(256, seed=3, start_step=start, **ONE_PROCESS), steps + 3 - start
        )
        assert_same_batches(fresh[start:], resumed)


def test_each_epoch_sees_distinct_examples_in_a_new_order(folder, cache_dir):
    config = folder_config(folder, cache_dir)
    batches = take(data.open_source(config).train_batches(8, seed=0, **ONE_PROCESS), 12)  # 2 epochs of 50 // 8 = 6
    epochs = [np.concatenate([ids_from_images(b["image"]) for b in batches[e * 6 : (e + 1) * 6]]) for e in (0, 1)]
    for ids in epochs:
        assert len(set(ids)) == 48 and set(ids) <= set(split_ids(folder, "train"))
    assert not np.array_equal(epochs[0], epochs[1])
    names = sources.prepare_source(config).class_names
    id_to_label = {i: names.index(name.split("/")[1]) for name, i in folder[1].items()}
    labels = np.concatenate([b["label"] for b in batches[:6]])
    assert [id_to_label[i] for i in epochs[0]] == labels.tolist()


def test_repeated_augmentation_repeats_each_image_in_the_same_batch_a_round_apart(folder, cache_dir, tmp_path):
    config = folder_config(folder, cache_dir, repeated_augmentation=3)
    batches = take(data.open_source(config).train_batches(6, seed=0, **ONE_PROCESS), 8)  # one epoch: 48 = 16 x 3
    for batch in batches:  # two images x three copies, ordered copy by copy: a b a b a b
        ids = ids_from_images(batch["image"]).reshape(3, 2)
        assert np.all(ids == ids[:1]) and ids[0, 0] != ids[0, 1]
    assert len({i for batch in batches for i in ids_from_images(batch["image"])}) == 16
    # With the real recipe the copies share the label but are augmented differently.
    digits = digits_config(tmp_path, preset="xcit", repeated_augmentation=3)
    digits.augment.mixup_alpha = digits.augment.cutmix_alpha = 0.0
    batch = next(data.open_source(digits).train_batches(12, seed=0, **ONE_PROCESS))
    assert np.all(batch["label"].reshape(3, -1) == batch["label"].reshape(3, -1)[:1])
    assert not np.array_equal(batch["image"][0], batch["image"][4])  # copies of one image, augmented differently


def test_default_process_and_devices_come_from_jax(cache_dir):
    import jax

    batch = next(
        data.open_source(digits_config(cache_dir, preset="none")).train_batches(4 * jax.local_device_count(), seed=0)
    )
    assert batch["image"].shape[0] == 4 * jax.local_device_count() // jax.process_count()


# ---- per-process sharding ----


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_parts_that_cover_the_split(folder, cache_dir, process_count):
    source = sources.prepare_source(folder_config(folder, cache_dir))
    names_seen = []
    for index in range(process_count):
        split = tfds.split_for_jax_process("train", process_index=index, process_count=process_count)
        records = source.builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        names_seen.append({r["file_name"].decode() for r in records.as_numpy_iterator()})
    assert sum(len(names) for names in names_seen) == 50
    assert set.union(*names_seen) == {name for name in folder[1] if name.startswith("train/")}


@pytest.mark.parametrize("process_count", [2, 4])
def test_train_iterators_of_different_processes_get_different_examples(folder, cache_dir, process_count):
    config = folder_config(folder, cache_dir)
    local_batch = 2
    per_process = []
    for index in range(process_count):
        iterator = data.open_source(config).train_batches(
            local_batch * process_count,
            seed=0,
            process_index=index,
            process_count=process_count,
            local_device_count=1,
        )
        steps = (50 // process_count) // local_batch  # one epoch
        per_process.append(set(np.concatenate([ids_from_images(b["image"]) for b in take(iterator, steps)])))
        assert len(per_process[-1]) == steps * local_batch
    assert sum(map(len, per_process)) == len(set.union(*per_process))


# ---- exact evaluation ----


@pytest.mark.parametrize("process_count,global_batch", [(1, 1), (1, 5), (1, 64), (2, 4), (4, 8), (4, 100)])
def test_eval_counts_every_example_exactly_once(folder, cache_dir, process_count, global_batch):
    config = folder_config(folder, cache_dir)
    seen, lengths = [], set()
    for index in range(process_count):
        batches = data.open_source(config).eval_batches(
            global_batch, process_index=index, process_count=process_count, local_device_count=1
        )
        lengths.add(len(batches))
        count = 0
        for batch in batches:
            count += 1
            assert batch["image"].shape == (global_batch // process_count, 8, 8, 3)
            real = batch["mask"] == 1.0
            seen.extend(ids_from_images(batch["image"][real]))
            assert np.all(batch["image"][~real] == 0) and np.all(batch["label"][~real] == 0)
        assert count == len(batches)
    assert len(lengths) == 1  # every process runs the same number of batches
    assert sorted(seen) == split_ids(folder, "test")


def test_eval_top1_denominator_is_the_split_size_and_eval_is_reiterable(folder, cache_dir):
    config = folder_config(folder, cache_dir)
    batches = data.open_source(config).eval_batches(10, **ONE_PROCESS)
    correct = total = 0.0
    for batch in batches:  # a classifier that always says class 0 ("ant": 7 of the 23 test images)
        correct += np.sum((batch["label"] == 0) * batch["mask"])
        total += np.sum(batch["mask"])
    assert (correct, total) == (7, 23)
    first, second = list(batches), list(batches)
    assert_same_batches(first, second)


def test_eval_of_another_split_and_wrong_split(folder, cache_dir):
    config = folder_config(folder, cache_dir)
    batches = data.open_source(config).eval_batches(16, split="train", **ONE_PROCESS)
    assert sum(b["mask"].sum() for b in batches) == 50 and batches.num_examples == 50
    with pytest.raises(data.DataConfigError, match=r"(?i)choose one of its splits"):
        data.open_source(config).eval_batches(16, split="validation", **ONE_PROCESS)


def test_pad_and_crop_replaces_random_resized_crop(cache_dir):
    config = digits_config(cache_dir)
    config.augment.crop_padding = 4
    with pytest.raises(DataConfigError, match=r"crop_padding=4 \(pad-and-crop\) replaces random-resized-crop"):
        data.validate_config(config)
    config.augment.update(crop_scale=(1.0, 1.0), crop_aspect=(1.0, 1.0))
    padded = next(data.open_source(config).train_batches(32, seed=0, **ONE_PROCESS))["image"]
    config.augment.crop_padding = 0
    plain = next(data.open_source(config).train_batches(32, seed=0, **ONE_PROCESS))["image"]
    assert padded.shape == plain.shape == (32, 16, 16, 3) and not np.array_equal(padded, plain)
