"""The in-memory pipeline's train split held on the devices (`config.data.placement`), each batch gathered there.

With placement "device" the train images (N, S, S, 3) uint8 and labels (N,) int32 are copied once to every
device (replicated, so each device gathers its own shard of a batch without any image crossing devices); per
step the host then sends only row indices, 4 bytes an image instead of S x S x 3, and does no other work. The
rows are those of the host-resident stream (`ArraySource.train_rows`: the epoch's permutation, each
process its slice of every global batch), so both placements give the same batches pixel for pixel, and a run
resumed under the other placement continues exactly.

"auto" (the default) picks the devices when every process's devices report their memory (GPUs, TPUs) and the
split takes at most DEVICE_MEMORY_FRACTION of what each has free; a CPU backend reports none, and there the
devices' memory is the host's anyway, so the split stays on the host and batches are prefetched
(`sharding.prefetch_to_device`). Every process must choose alike (the gather is one program over all
devices), so "auto" asks all of them. Evaluation batches always come from the host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.in_memory import ArraySplit
from qkv_vit.train import sharding
from qkv_vit.train.checkpointing import all_processes_agree

# "auto" lets the split take this much of a device's free memory, leaving the rest to the training step's
# activations and temporaries (the parameters and optimizer state are already on the device when it asks).
DEVICE_MEMORY_FRACTION = 0.25


def split_bytes(split: ArraySplit) -> int:
    return split.images.nbytes + split.labels.nbytes


def free_bytes(devices: Sequence[Any]) -> int | None:
    """The least free memory of `devices` in bytes, or None where a device reports none (a CPU)."""
    free = []
    for device in devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free)


def on_devices(placement: str, split: ArraySplit, devices: Sequence[Any] | None = None) -> bool:
    """Whether the train split goes on the devices (default: this process's): "host" no; "device" yes, or
    DataConfigError where a device reports less free memory than the split takes; "auto" if it fits in
    DEVICE_MEMORY_FRACTION of every process's devices (all processes get the same answer)."""
    if placement == "host":
        return False
    size = split_bytes(split)
    free = free_bytes(jax.local_devices() if devices is None else devices)
    if placement == "device":
        if free is not None and size > free:
            raise DataConfigError(
                f"data.placement='device': the train split takes {size / 2**30:.2f} GiB but a device has "
                f"{free / 2**30:.2f} GiB free. Use data.placement='host' (or 'auto'), or a smaller data.image_size."
            )
        return True
    return all_processes_agree(free is not None and size <= DEVICE_MEMORY_FRACTION * free)


def replicate(array: np.ndarray, batch_sharding: NamedSharding) -> jax.Array:
    """A host array copied whole to every device of the batch sharding's mesh (each process gives its own, equal,
    copy)."""
    replicated = sharding.replicated(batch_sharding.mesh)
    return jax.make_array_from_callback(array.shape, replicated, lambda index: array[index])


def _gather(images: jax.Array, labels: jax.Array, rows: jax.Array) -> dict[str, jax.Array]:
    return {"image": images[rows], "label": labels[rows]}


class DeviceResidentBatches(Iterator[dict[str, jax.Array]]):
    """Train batches {"image" (B, S, S, 3) uint8, "label" (B,) int32} gathered on the devices, laid out by
    `sharding` as the host path's `sharding.global_batch` lays them out; `rows`: this process's row indices per
    step (ArraySource.train_rows)."""

    def __init__(self, split: ArraySplit, rows: Iterator[np.ndarray], batch_sharding: NamedSharding):
        self.images, self.labels = replicate(split.images, batch_sharding), replicate(split.labels, batch_sharding)
        self.rows, self.batch_sharding = rows, batch_sharding
        self.gather = jax.jit(_gather, out_shardings=batch_sharding)

    def __next__(self) -> dict[str, jax.Array]:
        local_rows = {"rows": np.asarray(next(self.rows), np.int32)}
        rows = sharding.global_batch(local_rows, self.batch_sharding)["rows"]  # laid out as the host path's batches
        return self.gather(self.images, self.labels, rows)


def log_placement(resident: bool, split: ArraySplit) -> None:
    where = "on every device" if resident else "on the host, batches prefetched to the devices"
    logging.info("In-memory train split (%.1f MiB): %s.", split_bytes(split) / 2**20, where)
