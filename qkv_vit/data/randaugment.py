"""RandAugment in TensorFlow with timm's semantics, e.g. "rand-m9-mstd0.5-inc1" (XCiT, DeiT).

No maintained TensorFlow package ships RandAugment, so the 15 image ops of timm's increasing-severity
set are written here, on uint8 HxWx3 images, following PIL's definitions (timm applies PIL ops).
Per image: `num_layers` ops are drawn uniformly with replacement; each is applied with probability
`prob` at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, magnitude_max], on
timm's 0..10 scale. All randomness is stateless, from one seed, so results are reproducible.

Known differences from timm/PIL: geometric ops interpolate bilinearly (TF's projective transform
has no bicubic; timm uses bicubic for XCiT) and use integer pixel centers; blends round instead of
truncating. Each op matches PIL to within a couple of grey levels (see tests/test_data_ops.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from qkv_vit.data._tensorflow import tf

# timm's _RAND_INCREASING_TRANSFORMS, in timm's order.
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
_LEVEL_DENOMINATOR = 10.0  # timm's magnitude scale: level / 10 is the fraction of each op's range
_TRANSLATE_FRACTION = 0.45  # timm's translate_pct


# ---- colour ops (PIL ImageOps / ImageEnhance) ----


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """PIL Image.blend(degenerate, image, factor): 0 gives degenerate, 1 the image, >1 extrapolates."""
    degenerate = tf.cast(degenerate, tf.float32)
    return _to_uint8(degenerate + factor * (tf.cast(image, tf.float32) - degenerate))


def _grey(image: tf.Tensor) -> tf.Tensor:
    """PIL's "L" conversion (ITU-R 601-2 luma), HxWx1 float."""
    return tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32)))


def color(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Saturation: blend with the grey image."""
    return blend(tf.tile(_grey(image), [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Blend with a flat image at the mean grey level."""
    mean = tf.round(tf.reduce_mean(_grey(image)))
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Blend with black."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor | float) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5, /13); border pixels stay as they are."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]]), tf.cast(image, tf.float32))
    return blend(degenerate, image, factor)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel, stretch [min, max] to [0, 255]; flat channels stay as they are."""
    pixels = tf.cast(image, tf.float32)
    low = tf.reduce_min(pixels, axis=[0, 1])
    high = tf.reduce_max(pixels, axis=[0, 1])
    scale = 255.0 / tf.maximum(high - low, 1.0)
    stretched = tf.floor((pixels - low) * scale)  # PIL truncates the lookup table values
    return _to_uint8(tf.where(high > low, stretched, pixels))


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    histogram = tf.math.bincount(tf.cast(channel, tf.int32), minlength=256, maxlength=256)
    last_nonzero = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))
    step = (tf.reduce_sum(histogram) - last_nonzero) // 255
    exclusive_cumsum = tf.cumsum(histogram, exclusive=True)
    lookup = tf.minimum((exclusive_cumsum + step // 2) // tf.maximum(step, 1), 255)
    equalized = tf.gather(lookup, tf.cast(channel, tf.int32))
    return tf.where(step > 0, equalized, tf.cast(channel, tf.int32))


def equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.equalize: per-channel histogram equalization."""
    channels = [_equalize_channel(image[:, :, c]) for c in range(3)]
    return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
    return 255 - image


def solarize(image: tf.Tensor, threshold: tf.Tensor | int) -> tf.Tensor:
    """Invert every pixel at or above the threshold (256: no change)."""
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.where(pixels >= threshold, 255 - pixels, pixels), tf.uint8)


def solarize_add(image: tf.Tensor, addition: tf.Tensor | int, threshold: int = 128) -> tf.Tensor:
    """Add to every pixel below the threshold, saturating at 255."""
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.where(pixels < threshold, tf.minimum(pixels + addition, 255), pixels), tf.uint8)


def posterize(image: tf.Tensor, bits: tf.Tensor | int) -> tf.Tensor:
    """Keep the `bits` most significant bits of each pixel (0 bits: black, 8: no change)."""
    shift = 8 - tf.cast(bits, tf.int32)
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.uint8)


# ---- geometric ops (PIL Image.transform / rotate) ----


def affine(image: tf.Tensor, matrix: Sequence[tf.Tensor | float], fill: Sequence[float]) -> tf.Tensor:
    """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f), PIL's convention; outside: fill."""
    fill = tf.constant(fill, tf.float32)
    a, b, c, d, e, f = (tf.cast(value, tf.float32) for value in matrix)
    transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
    # Shift by the fill colour so that TF's single scalar fill value (0) becomes a per-channel colour.
    shifted = tf.cast(image, tf.float32)[None] - fill
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=shifted,
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return _to_uint8(out[0] + fill)


def rotate(image: tf.Tensor, degrees: tf.Tensor | float, fill: Sequence[float]) -> tf.Tensor:
    """Rotate about the image centre (PIL: counter-clockwise for positive degrees)."""
    radians = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)  # PIL's sign convention
    height, width = (tf.cast(tf.shape(image)[i], tf.float32) for i in (0, 1))
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(radians), tf.sin(radians)
    return affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], fill)


def shear_x(image: tf.Tensor, factor: tf.Tensor | float, fill: Sequence[float]) -> tf.Tensor:
    return affine(image, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)


def shear_y(image: tf.Tensor, factor: tf.Tensor | float, fill: Sequence[float]) -> tf.Tensor:
    return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)


def translate_x(image: tf.Tensor, pixels: tf.Tensor | float, fill: Sequence[float]) -> tf.Tensor:
    return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)


def translate_y(image: tf.Tensor, pixels: tf.Tensor | float, fill: Sequence[float]) -> tf.Tensor:
    return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)


# ---- magnitude -> argument, as timm's *_level_to_arg ----


def op_branches(
    image: tf.Tensor, level: tf.Tensor, sign: tf.Tensor, fill: Sequence[float]
) -> list[Callable[[], tf.Tensor]]:
    """One thunk per entry of OPS, at timm's argument for `level` (0..10) and `sign` (+-1)."""
    fraction = tf.cast(level, tf.float32) / _LEVEL_DENOMINATOR
    enhance = tf.maximum(0.1, 1.0 + sign * fraction * 0.9)
    width, height = (tf.cast(tf.shape(image)[i], tf.float32) for i in (1, 0))
    translate = sign * fraction * _TRANSLATE_FRACTION
    return [
        lambda: autocontrast(image),
        lambda: equalize(image),
        lambda: invert(image),
        lambda: rotate(image, sign * fraction * 30.0, fill),
        lambda: posterize(image, 4 - tf.cast(tf.floor(fraction * 4), tf.int32)),
        lambda: solarize(image, 256 - tf.cast(tf.floor(fraction * 256), tf.int32)),
        lambda: solarize_add(image, tf.cast(tf.floor(fraction * 110), tf.int32)),
        lambda: color(image, enhance),
        lambda: contrast(image, enhance),
        lambda: brightness(image, enhance),
        lambda: sharpness(image, enhance),
        lambda: shear_x(image, sign * fraction * 0.3, fill),
        lambda: shear_y(image, sign * fraction * 0.3, fill),
        lambda: translate_x(image, translate * width, fill),
        lambda: translate_y(image, translate * height, fill),
    ]


def apply_op(
    image: tf.Tensor, name: str, level: float, sign: float = 1.0, fill: Sequence[float] = (128.0, 128.0, 128.0)
) -> tf.Tensor:
    """Applies one named op at a given level, e.g. for looking at what an op does."""
    return op_branches(image, tf.constant(level, tf.float32), tf.constant(sign, tf.float32), fill)[OPS.index(name)]()


def randaugment(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_layers: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    magnitude_max: float = 10.0,
    prob: float = 0.5,
    fill: Sequence[float] = (128.0, 128.0, 128.0),
) -> tf.Tensor:
    """timm's RandAugment on a uint8 HxWx3 image; `seed` is a stateless seed, shape [2]."""
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, max(num_layers, 1)))[:num_layers]:
        op_seed, apply_seed, level_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
        op_index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
        level = _magnitude(level_seed, magnitude, magnitude_std, magnitude_max)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, 1.0, -1.0)
        apply = tf.random.stateless_uniform([], apply_seed) < prob
        branches = op_branches(image, level, sign, fill)
        image = tf.cond(apply, lambda b=branches, i=op_index: tf.switch_case(i, b), lambda i=image: i)
        image = tf.ensure_shape(image, [None, None, 3])
    return image


def _magnitude(seed: tf.Tensor, magnitude: float, std: float, maximum: float) -> tf.Tensor:
    if std == float("inf"):  # timm: "mstd" > 100 means uniform in [0, magnitude]
        level = tf.random.stateless_uniform([], seed, 0.0, magnitude)
    elif std > 0:
        level = magnitude + std * tf.random.stateless_normal([], seed)
    else:
        level = tf.constant(magnitude, tf.float32)
    return tf.clip_by_value(level, 0.0, maximum)
