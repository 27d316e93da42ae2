"""Input: a configured data set, opened once as a DataSource that serves one process's batches as numpy arrays.

Where the data come from (`config.source`: the offline digits, a tfds data set, an image folder or archive) is apart
from how batches are made (`config.pipeline`): tf.data on the host (qkv_vit.data.pipeline, imported on first use),
or gathers from arrays decoded once (qkv_vit.data.in_memory, which needs no TensorFlow and imports none). Either
way images leave as uint8, and the trainer's step finishes them on the device (qkv_vit.train.finishing):

    from qkv_vit import data
    source = data.open_source(data.get_config("xcit", source="tfds", name="imagenet2012"))
    train = source.train_batches(global_batch_size=1024, seed=0, start_step=step)
    evaluation = source.eval_batches(global_batch_size=1024)
"""

from __future__ import annotations

import importlib

import ml_collections

from qkv_vit.data import in_memory
from qkv_vit.data.batching import local_batch_size
from qkv_vit.data.catalog import known_train_examples
from qkv_vit.data.config import augment_config, get_config, validate_config
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.in_memory import ArraySource, ArraySplit
from qkv_vit.data.info import DatasetInfo, SkippedFiles
from qkv_vit.data.protocol import Batch, DataSource


def open_source(config: ml_collections.ConfigDict) -> DataSource:
    """config.data's data set, prepared and opened; DataConfigError with the fix if it cannot be read."""
    if config.pipeline == "in_memory":
        return in_memory.open_in_memory(config)
    return importlib.import_module("qkv_vit.data.pipeline").open_tf_data(config)


def crops_on_device(config: ml_collections.ConfigDict) -> bool:
    """Whether config.data's pipeline ships train batches uncropped for the device to crop and flip
    (DataSource.crops_on_device), known without opening the data."""
    return in_memory.ArraySource.crops_on_device if config.pipeline == "in_memory" else False


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """What config.data's data set holds and which parts a run uses (opens it: prepares it if needed)."""
    return open_source(config).info


__all__ = [
    "ArraySource",
    "ArraySplit",
    "Batch",
    "DataConfigError",
    "DataSource",
    "DatasetInfo",
    "SkippedFiles",
    "augment_config",
    "crops_on_device",
    "dataset_info",
    "get_config",
    "known_train_examples",
    "local_batch_size",
    "open_source",
    "validate_config",
]
