"""TensorFlow versions of what the device does to a train batch (qkv_vit.train.finishing): timm's normalization,
RandomErasing (one box) and Mixup / CutMix per batch (mode "batch", label smoothing folded into the targets).
The trainer does not use them; the tests hold the device's ops against them, as oracles.

Mixing: each batch is mixed with itself reversed. With probability `mix_prob` a batch is mixed; then CutMix is
chosen with probability `switch_prob` (when both are on), lam ~ Beta(alpha, alpha), and for CutMix lam is corrected
to the pasted box's area.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qkv_vit.data._tensorflow import tf
from qkv_vit.data.augment import split_seed


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """uint8 [0, 255] to float32 (x / 255 - mean) / std."""
    return (tf.cast(image, tf.float32) / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_erasing(
    image: tf.Tensor,
    seed: tf.Tensor,
    prob: float = 0.25,
    area: Sequence[float] = (0.02, 1 / 3),
    aspect_min: float = 0.3,
    mode: str = "pixel",
    attempts: int = 10,
) -> tf.Tensor:
    """timm RandomErasing (one box) on a normalized float image; "pixel" fills N(0, 1) noise, "const" zeros."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    apply_seed, area_seed, aspect_seed, top_seed, left_seed, noise_seed = split_seed(seed, 6)
    image_area = tf.cast(height * width, tf.float32)
    target = tf.random.stateless_uniform([attempts], area_seed, area[0], area[1]) * image_area
    log_aspect = tf.random.stateless_uniform([attempts], aspect_seed, math.log(aspect_min), -math.log(aspect_min))
    box_heights = tf.cast(tf.round(tf.sqrt(target * tf.exp(log_aspect))), tf.int32)
    box_widths = tf.cast(tf.round(tf.sqrt(target / tf.exp(log_aspect))), tf.int32)
    fits = (box_heights < height) & (box_widths < width)  # timm keeps the first attempt that fits
    first = tf.argmax(tf.cast(fits, tf.int32))
    box_height, box_width = box_heights[first], box_widths[first]
    top = tf.random.stateless_uniform([], top_seed, 0, tf.maximum(height - box_height + 1, 1), dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, tf.maximum(width - box_width + 1, 1), dtype=tf.int32)
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    inside = (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width)
    erase = (tf.random.stateless_uniform([], apply_seed) < prob) & tf.reduce_any(fits)

    def erased():  # noise for the whole image costs as much as the rest: only draw it when erasing
        noise = tf.random.stateless_normal(tf.shape(image), noise_seed) if mode == "pixel" else tf.zeros_like(image)
        return tf.where(inside, noise, image)

    return tf.cond(erase, erased, lambda: image)


def smooth_labels(labels: tf.Tensor, num_classes: int, smoothing: float) -> tf.Tensor:
    """One-hot float32 targets: 1 - smoothing + smoothing / num_classes on the label, smoothing / num_classes off it."""
    off = smoothing / num_classes
    return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off, dtype=tf.float32)


def _beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
    if alpha <= 0:
        return tf.constant(1.0)
    x_seed, y_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    x = tf.random.stateless_gamma([], x_seed, alpha)
    y = tf.random.stateless_gamma([], y_seed, alpha)
    return tf.where(x + y > 0, x / tf.maximum(x + y, 1e-30), 1.0)


def _cutmix_box(height: tf.Tensor, width: tf.Tensor, lam: tf.Tensor, seed: tf.Tensor):
    """timm's rand_bbox: a box of side sqrt(1 - lam) around a uniform centre, clipped to the image."""
    y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    cut = tf.sqrt(1.0 - lam)
    cut_height = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
    cut_width = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
    centre_y = tf.random.stateless_uniform([], y_seed, 0, height, dtype=tf.int32)
    centre_x = tf.random.stateless_uniform([], x_seed, 0, width, dtype=tf.int32)
    top = tf.clip_by_value(centre_y - cut_height // 2, 0, height)
    bottom = tf.clip_by_value(centre_y + cut_height // 2, 0, height)
    left = tf.clip_by_value(centre_x - cut_width // 2, 0, width)
    right = tf.clip_by_value(centre_x + cut_width // 2, 0, width)
    rows = tf.range(height)[:, None, None]
    cols = tf.range(width)[None, :, None]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    box_fraction = tf.cast((bottom - top) * (right - left), tf.float32) / tf.cast(height * width, tf.float32)
    return inside, 1.0 - box_fraction


def mix_batch(
    images: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    mix_prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(B,H,W,C) float images, (B,) int labels -> mixed images, (B, num_classes) soft labels summing to 1."""
    targets = smooth_labels(labels, num_classes, label_smoothing)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or mix_prob <= 0:
        return images, targets
    apply_seed, switch_seed, mixup_seed, cutmix_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5)
    )
    apply = tf.random.stateless_uniform([], apply_seed) < mix_prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], switch_seed) < switch_prob
    else:
        use_cutmix = tf.constant(cutmix_alpha > 0)
    lam_mixup = _beta(mixup_seed, mixup_alpha)
    inside, lam_cutmix = _cutmix_box(
        tf.shape(images)[1], tf.shape(images)[2], _beta(cutmix_seed, cutmix_alpha), box_seed
    )
    reversed_images = tf.reverse(images, axis=[0])
    mixed = tf.cond(
        apply,
        lambda: tf.cond(
            use_cutmix,
            lambda: tf.where(inside[None], reversed_images, images),
            lambda: lam_mixup * images + (1.0 - lam_mixup) * reversed_images,
        ),
        lambda: images,
    )
    lam = tf.where(apply, tf.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
    soft = lam * targets + (1.0 - lam) * tf.reverse(targets, axis=[0])
    return mixed, soft
