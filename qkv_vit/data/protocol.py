"""What every data source gives the trainer: batches of one process from a step on, evaluation batches, the length of
an epoch, and what the data hold. `qkv_vit.data.open_source(config)` opens the configured one, once per run.

Two implementations, by how the batches are made (config.data.pipeline): `pipeline.TFDataSource` streams them
through tf.data on the host (any source: tfds, an image folder or archive, the digits), `in_memory.ArraySource`
gathers them from arrays decoded once (image folders, archives and the digits, without TensorFlow).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from qkv_vit.data.info import DatasetInfo

Batch = dict[str, np.ndarray]


class DataSource(Protocol):
    """A configured data set, opened: the batches of this process (or the given `process_index` of
    `process_count`), each of global_batch_size / process_count examples, which must split over the local devices
    (DataConfigError otherwise)."""

    info: DatasetInfo  # the splits used, their sizes, the class names

    def steps_per_epoch(
        self, global_batch_size: int, *, process_count: int | None = None, local_device_count: int | None = None
    ) -> int:
        """Train batches per epoch, the same on every process."""
        ...

    def train_batches(
        self,
        global_batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        local_device_count: int | None = None,
    ) -> Iterator[Batch]:
        """Endless train batches {"image" (B,H,W,3) uint8, "label" (B,) int32} for the device to finish
        (qkv_vit.train.finishing), a pure function of `seed`: the first is batch `start_step` of the stream that
        starts at 0, so a resumed run reads exactly the batches an uninterrupted one would."""
        ...

    def eval_batches(
        self,
        global_batch_size: int,
        split: str | None = None,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        local_device_count: int | None = None,
    ) -> Iterable[Batch]:
        """Re-iterable batches {"image" uint8, "label" int32, "mask" float32 (0 on padding)} of `split` (default:
        the eval split): every process runs the same number of batches and each example counts once."""
        ...
