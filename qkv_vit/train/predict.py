"""A model's outputs over a split, batch by batch: logits and pre-logit features of every real example once, labels
beside them.

The batches are a data source's eval batches (uint8, the run's eval preprocessing: resize, center crop; padded to
whole batches with mask 0), split over the devices of a mesh; the images are normalized on the device, as the
trainer's eval step does, and the padding is dropped on the host.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.experimental.multihost_utils
import numpy as np
from jax.sharding import Mesh

from qkv_vit.train import sharding
from qkv_vit.train.finishing import normalize

DEVICE_PREFETCH = 2  # batches on their way to the devices while one is evaluated


@dataclasses.dataclass(frozen=True)
class Predictions:
    logits: np.ndarray  # (N, classes) float32
    pre_logits: np.ndarray  # (N, embed_dim) float32: the features the head sees
    labels: np.ndarray  # (N,) int32
    label_sets: np.ndarray | None = None  # (N, LABEL_SET_SIZE) int32, -1 padded: every correct class (ImageNet ReaL)


def forward(model: Any, mean: tuple[float, ...], std: tuple[float, ...], mesh: Mesh) -> Callable:
    """jit of (variables, uint8 images (B, H, W, 3)) -> (logits (B, classes), pre-logits (B, D)), replicated over
    `mesh`. Build it once per model and reuse it: each new one compiles again."""

    def apply(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, captured = model.apply(variables, normalize(images, mean, std), train=False, mutable=["intermediates"])
        return logits, captured["intermediates"]["pre_logits"][0].astype(np.float32)

    return jax.jit(apply, out_shardings=sharding.replicated(mesh))


def predicted_batches(
    step: Callable, variables: Any, batches: Iterable[dict[str, np.ndarray]], mesh: Mesh
) -> Iterator[Predictions]:
    """The real examples of each of `batches` ({"image" uint8, "label", "mask"}: each example once over the
    processes) through a `forward` step with `variables` (replicated over `mesh`), batch by batch: a pass over a
    large split (class statistics of ImageNet's train split) never holds its logits at once."""
    variables = jax.device_put(variables, sharding.replicated(mesh))
    for batch in sharding.prefetch_to_device(batches, DEVICE_PREFETCH, sharding.batch_sharding(mesh)):
        logits, features = step(variables, batch["image"])
        keep = host_value(batch["mask"]) > 0
        label_sets = host_value(batch["label_set"])[keep] if "label_set" in batch else None
        yield Predictions(
            host_value(logits)[keep], host_value(features)[keep], host_value(batch["label"])[keep], label_sets
        )


def host_value(array: jax.Array) -> np.ndarray:
    """The whole of a global array on this host: a replicated one from a local copy, a sharded one gathered from
    every process."""
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    return np.asarray(jax.experimental.multihost_utils.process_allgather(array, tiled=True))
