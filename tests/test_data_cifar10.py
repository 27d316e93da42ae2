"""The real CIFAR-10 archive from ../shared/data (dev machines and CI): counts, classes, exact evaluation.

Skipped, with the reason, where the archive is absent (a user's machine): there, point
`QKV_VIT_SHARED` at a folder holding data/cifar10-jpeg.tar.gz, or see docs/data.md, "Small data sets in memory".
"""

import math

import numpy as np
import pytest

from conftest import SHARED, SHARED_ABSENT
from qkv_vit import data
from qkv_vit.data import sources

ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ARCHIVE.is_file(),
        reason=f"real CIFAR-10 archive not found at {ARCHIVE}: {SHARED_ABSENT}",
    ),
]  # slow: converts the real archive


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = data.get_config("small", source="image_folder")
    config.path = str(ARCHIVE)
    config.cache_dir = str(tmp_path_factory.mktemp("cache"))  # extracted and converted once for this module
    return config


def test_counts_and_classes(config):
    info = data.open_source(config).info
    assert (info.train_examples, info.eval_examples, info.num_classes, info.class_names) == (
        50_000,
        10_000,
        10,
        CLASSES,
    )
    source = sources.prepare_source(config)
    assert source.label_counts("train") == [5_000] * 10
    assert source.label_counts("test") == [1_000] * 10


@pytest.mark.parametrize("process_count,global_batch", [(1, 4096), (3, 3000)])
def test_top1_on_the_test_split_counts_exactly_10000_images(config, process_count, global_batch):
    correct = total = 0.0
    for index in range(process_count):
        batches = data.open_source(config).eval_batches(
            global_batch, process_index=index, process_count=process_count, local_device_count=1
        )
        assert len(batches) == math.ceil(math.ceil(10_000 / process_count) / (global_batch // process_count))
        for batch in batches:  # a classifier that always answers "airplane"
            correct += np.sum((batch["label"] == 0) * batch["mask"])
            total += np.sum(batch["mask"])
    assert (total, correct / total) == (10_000, 0.1)


def test_train_batches_from_the_archive(config):
    batch = next(
        data.open_source(config).train_batches(64, seed=0, process_index=0, process_count=1, local_device_count=1)
    )
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.uint8  # the device finishes it
    assert batch["image"].std() > 30  # real photos, not padding
    assert len(np.unique(batch["label"])) >= 5
