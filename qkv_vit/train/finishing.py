"""Finishing a batch on the device, inside the jitted step: the float32 work no host does.

The input pipeline ships uint8 images (after crop, flip, RandAugment and colour jitter) and int32 labels: a
quarter of float32's bytes, and none of the per-pixel float work on the host. The step then normalizes them,
applies random erasing per image and mixup / cutmix, and folds label smoothing into soft targets, with timm's
algorithms (RandomErasing, Mixup in "batch" mode; the tests hold them against TensorFlow versions,
tests/tf_oracles.py) and stateless keys derived from the run's seed and the step, so
an interrupted run resumes bit for bit.

Semantics on several devices, as big_vision: each device finishes its own shard of the batch, so no image
crosses devices. Erasing draws one key per image from the image's position in the global batch (the same on
any number of devices); mixing pairs images within each shard (each shard with itself reversed, one draw of
lambda and of mixup-or-cutmix per shard), so a run with mixing depends on the device count, as timm's
per-GPU mixing does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

ERASING_ATTEMPTS = 10  # timm's RandomErasing tries this many boxes and keeps the first that fits
ERASING_STREAM, MIXING_STREAM, GEOMETRY_STREAM = 1, 2, 3  # fold_in tags: independent keys for a step's random ops
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes, then falls back to the centre


@dataclasses.dataclass(frozen=True)
class BatchFinishing:
    """What the device does to a uint8 batch (from config.data and its `augment` group)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    # Crop and flip here too (the in-memory pipeline, whose host does no per-image work); else the host did them.
    geometry: bool = False
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_aspect: tuple[float, float] = (1.0, 1.0)
    crop_padding: int = 0  # pad-and-crop instead of random-resized-crop (the two are exclusive: data config)
    flip_prob: float = 0.0
    erasing_prob: float = 0.0
    erasing_area: tuple[float, float] = (0.02, 1 / 3)
    erasing_aspect_min: float = 0.3
    erasing_mode: str = "pixel"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    # Erase one image at a time (lax.map) rather than all at once (vmap): the faster way on CPU devices only.
    erase_one_by_one: bool = False

    @classmethod
    def from_config(cls, data_config: Any, num_classes: int, geometry: bool, platform: str) -> BatchFinishing:
        """From config.data; `geometry`: whether the batches come uncropped (DataSource.crops_on_device);
        `platform`: of the devices the step is built for ("cpu", "gpu", "tpu")."""
        augment = data_config.augment
        return cls(
            tuple(data_config.mean),
            tuple(data_config.std),
            num_classes,
            geometry,
            tuple(augment.crop_scale),
            tuple(augment.crop_aspect),
            augment.crop_padding,
            augment.flip_prob,
            augment.erasing_prob,
            tuple(augment.erasing_area),
            augment.erasing_aspect_min,
            augment.erasing_mode,
            augment.mixup_alpha,
            augment.cutmix_alpha,
            augment.mix_prob,
            augment.mix_switch_prob,
            augment.label_smoothing,
            erase_one_by_one=platform == "cpu",
        )

    @property
    def crops(self) -> bool:
        return self.geometry and (self.crop_scale != (1.0, 1.0) or self.crop_aspect != (1.0, 1.0))

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """[0, 255] images (B, H, W, 3), uint8 or float, to float32 (x / 255 - mean) / std, as the host's
    `augment.normalize`."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_resized_crop(
    image: jax.Array, key: jax.Array, scale: tuple[float, float], ratio: tuple[float, float]
) -> jax.Array:
    """torchvision's RandomResizedCrop on one float image (H, W, C), resized back to (H, W) (bicubic, antialiased):
    the first of 10 boxes of area fraction U(scale) and log-uniform aspect in `ratio` that fits, else the centre
    crop of the largest box within `ratio`."""
    height, width = image.shape[:2]
    area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
    target = jax.random.uniform(area_key, (CROP_ATTEMPTS,), minval=scale[0], maxval=scale[1]) * (height * width)
    aspect = jnp.exp(
        jax.random.uniform(aspect_key, (CROP_ATTEMPTS,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    )
    widths = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    heights = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = jnp.argmax(fits)
    # The fallback: the whole image, narrowed to the nearest aspect within `ratio` (torchvision's).
    in_ratio = min(max(width / height, ratio[0]), ratio[1])
    fallback_w = min(width, round(height * in_ratio))
    fallback_h = min(height, round(width / in_ratio))
    box_w = jnp.where(fits[first], widths[first], fallback_w)
    box_h = jnp.where(fits[first], heights[first], fallback_h)
    top = jnp.where(fits[first], jax.random.randint(top_key, (), 0, height - box_h + 1), (height - fallback_h) // 2)
    left = jnp.where(fits[first], jax.random.randint(left_key, (), 0, width - box_w + 1), (width - fallback_w) // 2)
    scale_yx = jnp.stack([height / box_h, width / box_w]).astype(jnp.float32)
    translation = -jnp.stack([top, left]).astype(jnp.float32) * scale_yx
    resized = jax.image.scale_and_translate(
        image, image.shape, (0, 1), scale_yx, translation, method="cubic", antialias=True
    )
    return jnp.clip(resized, 0.0, 255.0)  # bicubic overshoots; the host pipeline clips too


def pad_and_crop(image: jax.Array, key: jax.Array, padding: int) -> jax.Array:
    """torchvision's RandomCrop(size, padding) on one image (H, W, C): zeros added on every side, then the (H, W)
    window at a uniformly drawn offset in [0, 2 x padding] on each axis."""
    top_key, left_key = jax.random.split(key)
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = jax.random.randint(top_key, (), 0, 2 * padding + 1)
    left = jax.random.randint(left_key, (), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)


def crop_and_flip_each(images: jax.Array, keys: jax.Array, finishing: BatchFinishing) -> jax.Array:
    """Pad-and-crop or random-resized-crop (when the finishing crops) and horizontal flip of each float image with
    its own key."""

    def one(image: jax.Array, key: jax.Array) -> jax.Array:
        crop_key, flip_key = jax.random.split(key)
        if finishing.crop_padding:
            image = pad_and_crop(image, crop_key, finishing.crop_padding)
        elif finishing.crops:
            image = random_resized_crop(image, crop_key, finishing.crop_scale, finishing.crop_aspect)
        flip = jax.random.uniform(flip_key) < finishing.flip_prob
        return jnp.where(flip, image[:, ::-1], image)

    return jax.vmap(one)(images, keys)


def random_erasing(
    image: jax.Array, key: jax.Array, prob: float, area: tuple[float, float], aspect_min: float, mode: str
) -> jax.Array:
    """timm's RandomErasing (one box) on one normalized image (H, W, C): with probability `prob`, the first of
    10 boxes of area fraction U(area) and log-uniform aspect in [aspect_min, 1 / aspect_min] that fits is filled
    with N(0, 1) noise ("pixel") or zeros ("const")."""
    height, width = image.shape[:2]
    apply_key, area_key, aspect_key, top_key, left_key, noise_key = jax.random.split(key, 6)
    target = jax.random.uniform(area_key, (ERASING_ATTEMPTS,), minval=area[0], maxval=area[1]) * (height * width)
    log_aspect = jax.random.uniform(
        aspect_key, (ERASING_ATTEMPTS,), minval=math.log(aspect_min), maxval=-math.log(aspect_min)
    )
    box_heights = jnp.round(jnp.sqrt(target * jnp.exp(log_aspect))).astype(jnp.int32)
    box_widths = jnp.round(jnp.sqrt(target / jnp.exp(log_aspect))).astype(jnp.int32)
    fits = (box_heights < height) & (box_widths < width)
    first = jnp.argmax(fits)
    box_height, box_width = box_heights[first], box_widths[first]
    top = jax.random.randint(top_key, (), 0, jnp.maximum(height - box_height + 1, 1))
    left = jax.random.randint(left_key, (), 0, jnp.maximum(width - box_width + 1, 1))
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    inside = (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width)
    erase = (jax.random.uniform(apply_key) < prob) & jnp.any(fits)

    def erased() -> jax.Array:  # under vmap both branches run; under lax.map only the taken one
        fill = jax.random.normal(noise_key, image.shape, image.dtype) if mode == "pixel" else jnp.zeros_like(image)
        return jnp.where(inside, fill, image)

    return jax.lax.cond(erase, erased, lambda: image)


def erase_each(images: jax.Array, keys: jax.Array, finishing: BatchFinishing) -> jax.Array:
    """random_erasing on each image (B, H, W, C) with its own key.

    With finishing.erase_one_by_one (CPU devices) one image at a time (lax.map), so that the N(0, 1) noise, which
    dominates the cost there, is drawn only for the images erased (a quarter at XCiT's 0.25); else batched
    (vmap: GPU and TPU), where the noise is cheap and a loop over images is not. The values are the same either
    way.
    """

    def one(image: jax.Array, key: jax.Array) -> jax.Array:
        return random_erasing(
            image,
            key,
            finishing.erasing_prob,
            finishing.erasing_area,
            finishing.erasing_aspect_min,
            finishing.erasing_mode,
        )

    if finishing.erase_one_by_one:
        return jax.lax.map(lambda pair: one(*pair), (images, keys))
    return jax.vmap(one)(images, keys)


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot float32 targets with label smoothing: 1 - s + s / C on the label, s / C elsewhere."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def _beta(key: jax.Array, alpha: float) -> jax.Array:
    return jax.random.beta(key, alpha, alpha) if alpha > 0 else jnp.float32(1.0)


def _cutmix_box(height: int, width: int, lam: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """timm's rand_bbox: a box of side sqrt(1 - lam) around a uniform centre, clipped; (mask, 1 - its area)."""
    y_key, x_key = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_height, cut_width = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    centre_y, centre_x = jax.random.randint(y_key, (), 0, height), jax.random.randint(x_key, (), 0, width)
    top, bottom = jnp.clip(centre_y - cut_height // 2, 0, height), jnp.clip(centre_y + cut_height // 2, 0, height)
    left, right = jnp.clip(centre_x - cut_width // 2, 0, width), jnp.clip(centre_x + cut_width // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside, 1.0 - ((bottom - top) * (right - left)) / (height * width)


def mix(images: jax.Array, labels: jax.Array, key: jax.Array, finishing: BatchFinishing) -> tuple[jax.Array, jax.Array]:
    """timm's Mixup in "batch" mode on (B, H, W, C) images: the batch mixed with itself reversed; with probability
    mix_prob, cutmix (probability mix_switch_prob when both are on) or mixup with lam ~ Beta(alpha, alpha), lam
    corrected to the pasted box's area for cutmix. Returns (images, (B, classes) soft targets summing to 1)."""
    targets = smooth_labels(labels, finishing.num_classes, finishing.label_smoothing)
    if not finishing.mixes:
        return images, targets
    apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 5)
    apply = jax.random.uniform(apply_key) < finishing.mix_prob
    if finishing.mixup_alpha > 0 and finishing.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < finishing.mix_switch_prob
    else:
        use_cutmix = jnp.asarray(finishing.cutmix_alpha > 0)
    lam_mixup = _beta(mixup_key, finishing.mixup_alpha)
    inside, lam_cutmix = _cutmix_box(
        images.shape[1], images.shape[2], _beta(cutmix_key, finishing.cutmix_alpha), box_key
    )
    reversed_images = images[::-1]
    cutmixed = jnp.where(inside[None], reversed_images, images)
    mixed_up = lam_mixup * images + (1.0 - lam_mixup) * reversed_images
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
    mixed = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed_up), images)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def finish_train_batch(
    batch: dict[str, jax.Array], key: jax.Array, finishing: BatchFinishing, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """{"image" uint8, "label"} -> {"image" float32, "label", "soft_label"}: crop and flip (finishing.geometry),
    normalize, erase, mix per shard.

    `mesh`: the batch is sharded over all of its axes (the trainer's layout) and each device finishes its own
    shard (erasing keys still follow each image's position in the global batch); None: one shard.
    """
    streams = (ERASING_STREAM, MIXING_STREAM, GEOMETRY_STREAM)
    keys = jnp.stack([jax.random.key_data(jax.random.fold_in(key, stream)) for stream in streams])

    def finish_shard(images: jax.Array, labels: jax.Array, keys: jax.Array, shard: jax.Array) -> tuple:
        erasing_key, mixing_key, geometry_key = (jax.random.wrap_key_data(data) for data in keys)
        first = shard * images.shape[0]  # this shard's first image in the global batch

        def per_image(stream_key: jax.Array) -> jax.Array:  # one key per image, from its global position
            return jax.vmap(lambda index: jax.random.fold_in(stream_key, first + index))(jnp.arange(images.shape[0]))

        if finishing.geometry:
            images = crop_and_flip_each(images.astype(jnp.float32), per_image(geometry_key), finishing)
        images = normalize(images, finishing.mean, finishing.std)
        if finishing.erasing_prob > 0:
            images = erase_each(images, per_image(erasing_key), finishing)
        return mix(images, labels, jax.random.fold_in(mixing_key, shard), finishing)

    if mesh is None or mesh.size == 1:
        mixed, soft = finish_shard(batch["image"], batch["label"], keys, 0)
    else:
        axes = tuple(mesh.axis_names)
        mixed, soft = jax.shard_map(
            lambda images, labels, keys: finish_shard(images, labels, keys, jax.lax.axis_index(axes)),
            mesh=mesh,
            in_specs=(P(axes), P(axes), P()),
            out_specs=(P(axes), P(axes)),
        )(batch["image"], batch["label"], keys)
    return {"image": mixed, "label": batch["label"], "soft_label": soft}
