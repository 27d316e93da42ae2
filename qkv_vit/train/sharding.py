"""Device mesh and sharding rules: batch split over every device, parameters replicated or FSDP-sharded.

The mesh has a `data` axis and an `fsdp` axis (`config.mesh`, -1 = all remaining devices). The batch is
split over both axes, so every device sees its own examples: there is no tensor parallelism. With
`config.sharding = "fsdp"` each parameter and optimizer-state array of at least FSDP_MIN_SIZE_TO_SHARD_BYTES
is sharded over `fsdp` along its largest dimension that divides evenly (ZeRO-3 style, as big_vision's
`fsdp` rule with its min_size_to_shard_mb); XLA inserts the gathers. With "replicate" every device holds
everything.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
SHARDING_STRATEGIES = ("replicate", "fsdp")
# Smaller arrays stay replicated under "fsdp": gathering them would cost more than their copies take (16 KiB:
# 4096 float32 values, so that even XCiT-nano's kernels are sharded; big_vision's default is 4 MiB).
FSDP_MIN_SIZE_TO_SHARD_BYTES = 16 * 2**10


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device]) -> Mesh:
    """A (data, fsdp) mesh over `devices` (a Target's: present or not), sizes from config.mesh; one -1 takes the
    rest. ValueError for another axis name (an old config's "model"), or sizes the devices do not fill."""
    unknown = sorted(set(mesh_config.keys()) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"Unknown mesh axes {unknown}: the mesh has axes {MESH_AXES} (config.mesh.data, .fsdp).")
    devices = list(devices)
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"Only one mesh axis may be -1 (all remaining devices), got {dict(zip(MESH_AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, but {len(devices)} are present; "
            "set --config.mesh.data=-1 to use them all."
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: Mesh, strategy: str) -> Any:
    """A NamedSharding for every leaf of an abstract (eval_shape) pytree."""
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"Unknown sharding strategy {strategy!r}: choose one of {SHARDING_STRATEGIES}.")
    fsdp_size = mesh.shape["fsdp"]

    def rule(leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        size_bytes = int(np.prod(shape)) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
        if strategy == "replicate" or fsdp_size == 1 or size_bytes < FSDP_MIN_SIZE_TO_SHARD_BYTES:
            return replicated(mesh)
        for axis in np.argsort(shape)[::-1]:  # the largest dimension that divides evenly
            if shape[axis] % fsdp_size == 0:
                spec = [None] * len(shape)
                spec[axis] = "fsdp"
                return NamedSharding(mesh, P(*spec))
        return replicated(mesh)

    return jax.tree.map(rule, abstract_state)


def placed(abstract_tree: Any, shardings: Any) -> Any:
    """`abstract_tree`'s leaves (of jax.ShapeDtypeStruct) laid out as `shardings`' leaves: what a restore fills."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract_tree, shardings
    )


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble each process's numpy batch into global arrays sharded over the mesh."""
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local_batch.items()}


def prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]], size: int, sharding: NamedSharding
) -> Iterator[dict[str, jax.Array]]:
    """The global batches of `batches`, each put on its devices `size` batches ahead of its use.

    Transfers are asynchronous: while the step runs on one batch, the next `size` are already on their way
    (flax's prefetch_to_device, for jit's sharded global arrays). Reading ahead changes nothing about which
    batches come: an interrupted run resumes the stream at its step, whatever was read ahead.
    """
    iterator = iter(batches)
    queue = collections.deque(global_batch(batch, sharding) for batch in itertools.islice(iterator, size))
    while queue:
        yield queue.popleft()
        queue.extend(global_batch(batch, sharding) for batch in itertools.islice(iterator, 1))
