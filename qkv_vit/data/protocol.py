"""What every data source gives the trainer: batches of one process from a step on, evaluation batches, the length of
an epoch, and what the data hold. `qkv_vit.data.open_source(config)` opens the configured one, once per run.

Two implementations, by how the batches are made (config.data.pipeline): `pipeline.TFDataSource` streams them
through tf.data on the host (any source: tfds, an image folder or archive, the digits), `in_memory.ArraySource`
gathers them from arrays decoded once (image folders, archives and the digits, without TensorFlow). The public
methods here check the arguments and split the global batch over processes and devices once for both; an
implementation makes the batches of one process's share (the `_` methods).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from qkv_vit.data.batching import check_stream_position, local_batch_size, processes
from qkv_vit.data.info import DatasetInfo

if TYPE_CHECKING:
    from qkv_vit.data.in_memory import ArraySplit

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Stream:
    """One process's train stream: its seed, first step, which process of how many, and its batch size."""

    seed: int
    start_step: int
    process_index: int
    process_count: int
    local_batch: int  # global batch / process count


class DataSource(abc.ABC):
    """A configured data set, opened: the batches of this process (or of `process_index` of `process_count`), each
    of global_batch_size / process_count examples, which must split over the local devices (DataConfigError
    otherwise; None: JAX's process index, count and local devices)."""

    info: DatasetInfo  # the splits used, their sizes, the class names
    # Whether train batches come uncropped and unflipped, for the device to crop and flip (BatchFinishing.geometry).
    crops_on_device: ClassVar[bool] = False

    @property
    def train_arrays(self) -> ArraySplit | None:
        """The decoded train split where the source holds one (the devices may hold it: train_rows), else None."""
        return None

    def steps_per_epoch(
        self, global_batch_size: int, *, process_count: int | None = None, local_device_count: int | None = None
    ) -> int:
        """Train batches per epoch, the same on every process."""
        _, process_count = processes(0, process_count)
        return self._steps_per_epoch(
            local_batch_size(global_batch_size, process_count, local_device_count), process_count
        )

    def stream(
        self,
        global_batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        local_device_count: int | None = None,
    ) -> Stream:
        """The train stream these arguments describe, checked."""
        check_stream_position(seed, start_step)
        process_index, process_count = processes(process_index, process_count)
        local_batch = local_batch_size(global_batch_size, process_count, local_device_count)
        return Stream(seed, start_step, process_index, process_count, local_batch)

    def train_batches(self, global_batch_size: int, **stream: int | None) -> Iterator[Batch]:
        """Endless train batches {"image" (B,H,W,3) uint8, "label" (B,) int32} of the stream (`stream`'s keyword
        arguments: seed, start_step, process_index, ...) for the device to finish (qkv_vit.train.finishing), a pure
        function of the seed: the first is batch `start_step` of the stream that starts at 0, so a resumed run reads
        exactly the batches an uninterrupted one would."""
        return self._train_batches(self.stream(global_batch_size, **stream))

    def train_rows(self, global_batch_size: int, **stream: int | None) -> Iterator[np.ndarray]:
        """Endless (B,) int64 row indices into `train_arrays` of the stream (`stream`'s arguments): the rows of
        train_batches' batches, for a caller that holds the split elsewhere (qkv_vit.train.device_data)."""
        return self._train_rows(self.stream(global_batch_size, **stream))

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
        process_index, process_count = processes(process_index, process_count)
        local_batch = local_batch_size(global_batch_size, process_count, local_device_count)
        return self._eval_batches(split or self.info.eval_split, local_batch, process_index, process_count)

    @abc.abstractmethod
    def _steps_per_epoch(self, local_batch: int, process_count: int) -> int: ...

    @abc.abstractmethod
    def _train_batches(self, stream: Stream) -> Iterator[Batch]: ...

    def _train_rows(self, stream: Stream) -> Iterator[np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} holds no train arrays to give rows of.")

    @abc.abstractmethod
    def _eval_batches(
        self, split: str, local_batch: int, process_index: int, process_count: int
    ) -> Iterable[Batch]: ...
