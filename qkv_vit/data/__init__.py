"""Input pipelines: tfds / image folders / offline digits -> XCiT's augmentation -> numpy batches for JAX.

Everything here runs on the host; train and eval images leave it as uint8, and the trainer's step finishes them
on the device (qkv_vit.train.finishing). Typical use:

    from qkv_vit import data
    config = data.get_config("xcit", source="tfds", name="imagenet2012")
    train = data.build_train_iterator(config, global_batch_size=1024, seed=0, start_step=step)
    evaluation = data.build_eval_iterator(config, global_batch_size=1024)

The functions below choose the implementation by `config.source`: "in_memory" (qkv_vit.data.in_memory) needs no
TensorFlow and imports none; the others are tf.data pipelines (qkv_vit.data.pipeline, imported on first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from qkv_vit.data import in_memory
from qkv_vit.data.batching import local_batch_size, processes, train_seed
from qkv_vit.data.config import augment_config, get_config, validate_config
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.info import DatasetInfo, SkippedFiles

IN_MEMORY = "in_memory"
# Names served from the TensorFlow modules, imported when first asked for.
_TENSORFLOW_NAMES = {"EvalBatches": "qkv_vit.data.pipeline", "Source": "qkv_vit.data.sources"}


def __getattr__(name: str) -> Any:
    if name in _TENSORFLOW_NAMES:
        return getattr(importlib.import_module(_TENSORFLOW_NAMES[name]), name)
    raise AttributeError(f"module 'qkv_vit.data' has no attribute {name!r}")


def _pipeline():
    return importlib.import_module("qkv_vit.data.pipeline")


def open_source(config: ml_collections.ConfigDict):
    """The configured data set, prepared (a `Source`, or an `ArraySource` for "in_memory"); DataConfigError with
    the fix if it cannot be read."""
    if config.source == IN_MEMORY:
        return in_memory.open_in_memory(config)
    return importlib.import_module("qkv_vit.data.sources").open_source(config)


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """What the configured data holds (examples per split used, classes, skipped files)."""
    return open_source(config).info(config.num_classes)


def steps_per_epoch(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    *,
    process_count: int | None = None,
    local_device_count: int | None = None,
) -> int:
    """Train batches per epoch, the same on every process."""
    if config.source == IN_MEMORY:
        _, process_count = processes(0, process_count)
        local_batch_size(global_batch_size, process_count, local_device_count)
        return in_memory.train_steps(open_source(config), global_batch_size)
    return _pipeline().steps_per_epoch(
        config, global_batch_size, process_count=process_count, local_device_count=local_device_count
    )


def build_train_iterator(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    *,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    local_device_count: int | None = None,
    finish_on_host: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless train batches {"image" (B,H,W,3) uint8, "label" (B,) int32}, B = global_batch_size / process
    count, for the device to finish; `start_step` resumes the stream (the first batch is batch `start_step`).
    With `finish_on_host` (tf.data sources only) {"image" float32 normalized and erased, "label", "soft_label"}."""
    if config.source != IN_MEMORY:
        return _pipeline().build_train_iterator(
            config,
            global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            start_step=start_step,
            local_device_count=local_device_count,
            finish_on_host=finish_on_host,
        )
    if finish_on_host:
        raise DataConfigError("source='in_memory' finishes batches on the device only (finish_on_host=False).")
    return in_memory.train_batches(
        *_in_memory_stream(
            config, global_batch_size, seed, process_index, process_count, start_step, local_device_count
        )
    )


def build_train_rows(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    *,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    local_device_count: int | None = None,
) -> Iterator[np.ndarray]:
    """source="in_memory" only: the row indices (B,) of build_train_iterator's batches into the train split, for a
    caller that holds the split elsewhere (on the devices: qkv_vit.train.device_data)."""
    if config.source != IN_MEMORY:
        raise DataConfigError(f"Row indices need source='in_memory', not {config.source!r}.")
    return in_memory.train_rows(
        *_in_memory_stream(
            config, global_batch_size, seed, process_index, process_count, start_step, local_device_count
        )
    )


def _in_memory_stream(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    seed: int | None,
    process_index: int | None,
    process_count: int | None,
    start_step: int,
    local_device_count: int | None,
) -> tuple[in_memory.ArraySource, int, int, int, int, int]:
    """The in-memory train stream's arguments, checked: (source, global batch, seed, start step, process index,
    process count)."""
    seed = train_seed(config.seed, seed, start_step)
    process_index, process_count = processes(process_index, process_count)
    local_batch_size(global_batch_size, process_count, local_device_count)
    return open_source(config), global_batch_size, seed, start_step, process_index, process_count


def build_eval_iterator(
    config: ml_collections.ConfigDict,
    global_batch_size: int,
    split: str | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    finish_on_host: bool = False,
):
    """Re-iterable eval batches {"image" uint8, "label" int32, "mask" float32 (0 on padding)} of `split` (default:
    the eval split); every process runs the same number of batches and each example counts once."""
    if config.source != IN_MEMORY:
        return _pipeline().build_eval_iterator(
            config,
            global_batch_size,
            split,
            process_index=process_index,
            process_count=process_count,
            local_device_count=local_device_count,
            finish_on_host=finish_on_host,
        )
    if finish_on_host:
        raise DataConfigError("source='in_memory' finishes batches on the device only (finish_on_host=False).")
    process_index, process_count = processes(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, process_count, local_device_count)
    source = open_source(config)
    split = split or source.eval_split
    if split not in source.splits:
        raise DataConfigError(f"Bad split {split!r} for {source.description}. Valid splits: {sorted(source.splits)}.")
    arrays = source.splits[split]
    return in_memory.ArrayEvalBatches(arrays, local_batch, process_index, process_count)


__all__ = [
    "DataConfigError",
    "DatasetInfo",
    "EvalBatches",
    "SkippedFiles",
    "Source",
    "augment_config",
    "build_eval_iterator",
    "build_train_iterator",
    "dataset_info",
    "get_config",
    "local_batch_size",
    "open_source",
    "steps_per_epoch",
    "validate_config",
]
