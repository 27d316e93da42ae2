"""Per-image preprocessing in TensorFlow: decode, XCiT's train augmentation, eval resize/crop, uint8 out.

Train (timm's order): random-resized-crop (bicubic), or pad-and-crop -> horizontal flip -> RandAugment -> colour
jitter; the device then normalizes, erases and mixes (qkv_vit.train.finishing). Eval: resize the short side to
image_size / crop_pct (bicubic), center-crop image_size. Every random op is stateless and takes its own seed,
so a (seed, example index) pair always gives the same image, whatever the parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import ml_collections

from qkv_vit.data import randaugment as randaugment_lib
from qkv_vit.data._tensorflow import tf


def split_seed(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes to uint8 HxWx3 (grey and RGBA become RGB)."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _crop_window(
    shape: tf.Tensor, seed: tf.Tensor, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,  # no box found in 10 tries: the whole image
    )
    return tf.unstack(begin[:2]), tf.unstack(size[:2])


def decode_and_random_crop(
    encoded: tf.Tensor, seed: tf.Tensor, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tf.Tensor:
    """Random crop covering `scale` of the area at aspect ratio in `ratio`; JPEGs decode only the crop."""

    def jpeg():
        (top, left), (height, width) = _crop_window(tf.image.extract_jpeg_shape(encoded), seed, scale, ratio)
        return tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, height, width]), channels=3)

    return tf.ensure_shape(
        tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: random_crop(decode(encoded), seed, scale, ratio)), [None, None, 3]
    )


def random_crop(
    image: tf.Tensor, seed: tf.Tensor, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tf.Tensor:
    """The crop decode_and_random_crop takes, from an already decoded image (the same window for a seed)."""
    (top, left), (height, width) = _crop_window(tf.shape(image), seed, scale, ratio)
    return tf.slice(image, [top, left, 0], [height, width, 3])


def resize(image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor, method: str = "bicubic") -> tf.Tensor:
    """Antialiased resize (as PIL's), rounded back to uint8 because bicubic overshoots [0, 255]."""
    resized = tf.image.resize(image, tf.stack([height, width]), method=method, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def random_resized_crop(
    encoded: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    method: str = "bicubic",
) -> tf.Tensor:
    """torchvision's RandomResizedCrop (aspect ratio drawn uniformly, not log-uniformly)."""
    return tf.ensure_shape(
        resize(decode_and_random_crop(encoded, seed, scale, ratio), size, size, method), [size, size, 3]
    )


def pad_and_crop(image: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """torchvision's RandomCrop(size, padding) on a uint8 HxWx3 image: zeros added on every side, then a crop of
    the image's size at a uniformly drawn offset."""
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
    flip = tf.random.stateless_uniform([], seed) < prob
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """torchvision ColorJitter(strength, strength, strength) on uint8; brightness, contrast, saturation in order."""
    low = max(0.0, 1.0 - strength)
    factors = tf.random.stateless_uniform([3], seed, low, 1.0 + strength)
    image = randaugment_lib.brightness(image, factors[0])
    image = randaugment_lib.contrast(image, factors[1])
    return randaugment_lib.color(image, factors[2])


def resize_and_center_crop(image: tf.Tensor, size: int, crop_pct: float = 1.0, method: str = "bicubic") -> tf.Tensor:
    """timm's eval transform: short side to floor(size / crop_pct), keep aspect, center-crop size x size."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    short_target = math.floor(size / crop_pct)
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    long_target = tf.cast(short_target * long / short, tf.int32)  # truncates, as torchvision's Resize
    new_height = tf.where(height <= width, short_target, long_target)
    new_width = tf.where(height <= width, long_target, short_target)
    resized = resize(image, new_height, new_width, method)
    top = tf.cast(tf.round((new_height - size) / 2), tf.int32)
    left = tf.cast(tf.round((new_width - size) / 2), tf.int32)
    return tf.ensure_shape(tf.slice(resized, [top, left, 0], [size, size, 3]), [size, size, 3])


def train_preprocess(
    config: ml_collections.ConfigDict, decoded: bool = False
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """(encoded image, or with `decoded` a uint8 HxWx3 one; seed [2]) -> image_size x image_size x 3 uint8, with
    config.augment's per-image recipe up to colour jitter (the device normalizes, erases and mixes:
    qkv_vit.train.finishing)."""
    augment, size = config.augment, config.image_size
    fill = tuple(round(255 * m) for m in config.mean)  # timm fills rotations/shears with the mean colour

    def preprocess(source: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        # Five seeds, the fifth once the host's random erasing's: the same seed gives the same images as before.
        crop_seed, flip_seed, randaugment_seed, jitter_seed, _ = split_seed(seed, 5)
        if decoded:
            image = tf.ensure_shape(
                resize(random_crop(source, crop_seed, augment.crop_scale, augment.crop_aspect), size, size),
                [size, size, 3],
            )
        else:
            image = random_resized_crop(source, crop_seed, size, augment.crop_scale, augment.crop_aspect)
        if augment.crop_padding > 0:  # instead of a random-resized-crop: the one above kept the whole image
            image = pad_and_crop(image, split_seed(crop_seed, 2)[1], augment.crop_padding)
        if augment.flip_prob > 0:
            image = random_flip(image, flip_seed, augment.flip_prob)
        if augment.randaugment_layers > 0:
            image = randaugment_lib.randaugment(
                image,
                randaugment_seed,
                num_layers=augment.randaugment_layers,
                magnitude=augment.randaugment_magnitude,
                magnitude_std=augment.randaugment_magnitude_std,
                magnitude_max=augment.randaugment_magnitude_max,
                prob=augment.randaugment_prob,
                fill=fill,
            )
        if augment.color_jitter > 0:
            image = color_jitter(image, jitter_seed, augment.color_jitter)
        return image

    return preprocess


def eval_preprocess(config: ml_collections.ConfigDict) -> Callable[[tf.Tensor], tf.Tensor]:
    """encoded image -> image_size x image_size x 3 uint8 (the device normalizes): resize, center crop."""

    def preprocess(encoded: tf.Tensor) -> tf.Tensor:
        return resize_and_center_crop(decode(encoded), config.image_size, config.crop_pct)

    return preprocess
