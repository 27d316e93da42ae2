"""Mixup / CutMix per batch with label smoothing folded into soft targets (timm's Mixup, mode "batch").

Runs in TensorFlow on the host, after batching: each batch is mixed with itself reversed. With
probability `mix_prob` a batch is mixed; then CutMix is chosen with probability `switch_prob` (when
both are on), lam ~ Beta(alpha, alpha), and for CutMix lam is corrected to the pasted box's area.
"""

from __future__ import annotations

from qkv_vit.data._tensorflow import tf


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
