"""Each preprocessing op on its own (shape, dtype, range, determinism, agreement with PIL/timm) and inside tf.data."""

import io

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import tf_oracles

from qkv_vit.data import augment, randaugment
from qkv_vit.data._tensorflow import tf
from qkv_vit.data.config import IMAGENET_MEAN, IMAGENET_STD, get_config

SEED = tf.constant([3, 7], tf.int64)
OTHER_SEED = tf.constant([3, 8], tf.int64)


def natural_image(height=24, width=20, seed=0):
    """Smooth gradients plus noise: every grey level range, not flat, like a photo at low resolution."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width) + 60], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def encode(image, image_format="PNG"):
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format=image_format)
    return tf.constant(buffer.getvalue())


def assert_close_to_pil(ours, theirs, max_diff=2, mean_diff=0.6):
    diff = np.abs(np.asarray(ours, np.int32) - np.asarray(theirs, np.int32))
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max(), diff.mean())


# ---- RandAugment's ops against PIL, which timm uses ----

PIL_COLOUR_OPS = [
    ("autocontrast", lambda im: randaugment.autocontrast(im), lambda p: PIL.ImageOps.autocontrast(p)),
    ("equalize", lambda im: randaugment.equalize(im), lambda p: PIL.ImageOps.equalize(p)),
    ("invert", lambda im: randaugment.invert(im), lambda p: PIL.ImageOps.invert(p)),
    ("posterize1", lambda im: randaugment.posterize(im, 1), lambda p: PIL.ImageOps.posterize(p, 1)),
    ("posterize3", lambda im: randaugment.posterize(im, 3), lambda p: PIL.ImageOps.posterize(p, 3)),
    ("solarize26", lambda im: randaugment.solarize(im, 26), lambda p: PIL.ImageOps.solarize(p, 26)),
    ("solarize200", lambda im: randaugment.solarize(im, 200), lambda p: PIL.ImageOps.solarize(p, 200)),
    (
        "solarize_add",
        lambda im: randaugment.solarize_add(im, 99),
        lambda p: p.point([min(255, i + 99) if i < 128 else i for i in range(256)] * 3),
    ),
    ("color0.2", lambda im: randaugment.color(im, 0.2), lambda p: PIL.ImageEnhance.Color(p).enhance(0.2)),
    ("color1.8", lambda im: randaugment.color(im, 1.8), lambda p: PIL.ImageEnhance.Color(p).enhance(1.8)),
    ("contrast0.3", lambda im: randaugment.contrast(im, 0.3), lambda p: PIL.ImageEnhance.Contrast(p).enhance(0.3)),
    ("contrast1.7", lambda im: randaugment.contrast(im, 1.7), lambda p: PIL.ImageEnhance.Contrast(p).enhance(1.7)),
    (
        "brightness0.4",
        lambda im: randaugment.brightness(im, 0.4),
        lambda p: PIL.ImageEnhance.Brightness(p).enhance(0.4),
    ),
    (
        "brightness1.6",
        lambda im: randaugment.brightness(im, 1.6),
        lambda p: PIL.ImageEnhance.Brightness(p).enhance(1.6),
    ),
    ("sharpness0.1", lambda im: randaugment.sharpness(im, 0.1), lambda p: PIL.ImageEnhance.Sharpness(p).enhance(0.1)),
    ("sharpness1.9", lambda im: randaugment.sharpness(im, 1.9), lambda p: PIL.ImageEnhance.Sharpness(p).enhance(1.9)),
]


@pytest.mark.parametrize("name,ours,pil", PIL_COLOUR_OPS, ids=[op[0] for op in PIL_COLOUR_OPS])
def test_colour_op_matches_pil(name, ours, pil):
    image = natural_image()
    result = ours(tf.constant(image))
    assert result.dtype == tf.uint8 and result.shape == image.shape
    assert_close_to_pil(result, pil(PIL.Image.fromarray(image)))


def test_colour_ops_change_the_image():
    """Guards the PIL comparison above against ops that would pass by doing nothing."""
    image = natural_image()
    for _, ours, _ in PIL_COLOUR_OPS:
        assert np.abs(np.asarray(ours(tf.constant(image)), np.int32) - image).mean() > 1.0


def test_rotate_by_90_degrees_matches_pil():
    image = natural_image(16, 16)
    ours = randaugment.rotate(tf.constant(image), 90.0, fill=(0, 0, 0))
    np.testing.assert_array_equal(ours, np.asarray(PIL.Image.fromarray(image).rotate(90)))


@pytest.mark.parametrize("op", ["shear_x", "shear_y", "translate_x", "translate_y", "rotate"])
def test_geometric_op_is_identity_at_zero_and_fills_with_the_given_colour(op):
    image = natural_image()
    function = getattr(randaugment, op)
    np.testing.assert_array_equal(function(tf.constant(image), 0.0, fill=(1, 2, 3)), image)
    if op.startswith("translate"):  # moved by the whole image: only fill colour remains
        moved = function(tf.constant(image), float(max(image.shape)), fill=(10, 20, 30))
        np.testing.assert_array_equal(np.unique(np.asarray(moved).reshape(-1, 3), axis=0), [[10, 20, 30]])


def test_shear_matches_pil_away_from_the_borders():
    image = natural_image(20, 20)
    ours = np.asarray(randaugment.shear_x(tf.constant(image), 0.3, fill=(128, 128, 128)), np.int32)
    theirs = np.asarray(
        PIL.Image.fromarray(image).transform(
            (20, 20), PIL.Image.AFFINE, (1, 0.3, 0, 0, 1, 0), resample=PIL.Image.BILINEAR, fillcolor=(128, 128, 128)
        )
    )
    # PIL samples at pixel centres (+0.5), TF at integer coordinates: a shift of 0.15 px per row.
    assert np.abs(ours - theirs)[:, :12].mean() < 6  # the opposite shear gives ~38


@pytest.mark.parametrize("name", randaugment.OPS)
def test_each_randaugment_op_at_timm_magnitude_nine(name):
    image = natural_image()
    result = randaugment.apply_op(tf.constant(image), name, 9.0, sign=-1.0)
    assert result.dtype == tf.uint8 and result.shape == image.shape
    if name not in ("AutoContrast", "Equalize"):  # these two may leave an already-stretched image alone
        assert np.any(np.asarray(result) != image)


def test_randaugment_is_deterministic_per_seed_and_varies_across_seeds():
    image = tf.constant(natural_image())
    outputs = [np.asarray(randaugment.randaugment(image, tf.constant([0, i], tf.int64))) for i in range(12)]
    again = np.asarray(randaugment.randaugment(image, tf.constant([0, 0], tf.int64)))
    np.testing.assert_array_equal(outputs[0], again)
    assert len({o.tobytes() for o in outputs}) >= 6
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outputs)


def test_randaugment_with_probability_zero_is_identity():
    image = natural_image()
    np.testing.assert_array_equal(randaugment.randaugment(tf.constant(image), SEED, prob=0.0), image)


# ---- crop, flip, jitter, normalize, erasing, eval resize ----


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_random_resized_crop_shape_dtype_determinism(image_format):
    encoded = encode(natural_image(40, 30), image_format)
    crops = [augment.random_resized_crop(encoded, seed, 16) for seed in (SEED, SEED, OTHER_SEED)]
    assert crops[0].shape == (16, 16, 3) and crops[0].dtype == tf.uint8
    np.testing.assert_array_equal(crops[0], crops[1])
    assert np.any(np.asarray(crops[0]) != np.asarray(crops[2]))


def test_random_resized_crop_of_the_whole_image_is_a_resize():
    image = natural_image(20, 20)
    crop = augment.random_resized_crop(encode(image), SEED, 20, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(crop, image)


def test_random_resized_crop_covers_the_requested_area():
    """A crop of 25% of the area, upsampled 2x, shows a quarter of a 2x2-coloured image at most twice over."""
    quadrants = np.zeros((64, 64, 3), np.uint8)
    quadrants[:32, 32:] = 80
    quadrants[32:, :32] = 160
    quadrants[32:, 32:] = 240
    crop = np.asarray(augment.random_resized_crop(encode(quadrants), SEED, 32, scale=(0.25, 0.25), ratio=(1.0, 1.0)))
    flat_values = {v for v in np.unique(crop[..., 0]) if v in (0, 80, 160, 240)}
    assert 1 <= len(flat_values) <= 4
    assert crop.shape == (32, 32, 3)


def test_random_flip():
    image = tf.constant(natural_image())
    np.testing.assert_array_equal(augment.random_flip(image, SEED, 1.0), np.asarray(image)[:, ::-1])
    np.testing.assert_array_equal(augment.random_flip(image, SEED, 0.0), image)


def test_color_jitter_range_and_identity_at_zero():
    image = natural_image()
    np.testing.assert_array_equal(augment.color_jitter(tf.constant(image), SEED, 0.0), image)
    jittered = augment.color_jitter(tf.constant(image), SEED, 0.4)
    assert jittered.dtype == tf.uint8 and np.any(np.asarray(jittered) != image)


def test_normalize_values():
    image = np.array([[[0, 255, 128]]], np.uint8)
    out = np.asarray(tf_oracles.normalize(tf.constant(image), IMAGENET_MEAN, IMAGENET_STD))
    expected = (np.array([0, 1, 128 / 255]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
    assert out.dtype == np.float32


@pytest.mark.parametrize("mode", ["pixel", "const"])
def test_random_erasing_replaces_one_box(mode):
    image = tf.fill([32, 32, 3], 5.0)
    np.testing.assert_array_equal(tf_oracles.random_erasing(image, SEED, prob=0.0), image)
    erased = np.asarray(tf_oracles.random_erasing(image, SEED, prob=1.0, mode=mode))
    changed = np.any(erased != 5.0, axis=-1)
    rows, cols = np.nonzero(changed)
    box_area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert changed.sum() == box_area  # one filled rectangle
    assert 0.015 * 1024 <= box_area <= 0.4 * 1024
    if mode == "pixel":
        assert 0.5 < erased[changed].std() < 1.5  # N(0, 1) noise
    else:
        assert np.all(erased[changed] == 0.0)


def test_eval_resize_and_center_crop_matches_timm_with_pil():
    image = natural_image(40, 60)
    ours = np.asarray(augment.resize_and_center_crop(tf.constant(image), 32, crop_pct=0.875))
    # timm eval transform: Resize(floor(32 / 0.875) = 36, bicubic) on the short side, CenterCrop(32).
    resized = PIL.Image.fromarray(image).resize((54, 36), PIL.Image.BICUBIC)
    left, top = round((54 - 32) / 2), round((36 - 32) / 2)
    theirs = np.asarray(resized.crop((left, top, left + 32, top + 32)))
    assert ours.shape == (32, 32, 3)
    assert_close_to_pil(ours, theirs, max_diff=3, mean_diff=0.5)  # TF's and PIL's bicubic differ slightly


def test_train_and_eval_preprocess_output():
    config = get_config("xcit")
    config.image_size = 24
    encoded = encode(natural_image(30, 40), "JPEG")
    train = augment.train_preprocess(config)
    first, again = train(encoded, SEED), train(encoded, SEED)
    assert first.shape == (24, 24, 3) and first.dtype == tf.uint8  # the device normalizes, erases and mixes
    np.testing.assert_array_equal(first, again)
    evaluation = augment.eval_preprocess(config)(encoded)
    assert evaluation.shape == (24, 24, 3) and evaluation.dtype == tf.uint8


# ---- inside tf.data: graph mode and parallel map give what eager mode gives ----

GRAPH_OPS = {
    "random_resized_crop": lambda e, s: augment.random_resized_crop(e, s, 16),
    "randaugment": lambda e, s: randaugment.randaugment(augment.decode(e), s),
    "random_flip": lambda e, s: augment.random_flip(augment.decode(e), s),
    "color_jitter": lambda e, s: augment.color_jitter(augment.decode(e), s, 0.4),
    "random_erasing": lambda e, s: tf_oracles.random_erasing(tf.cast(augment.decode(e), tf.float32), s, prob=1.0),
    "eval": lambda e, s: augment.resize_and_center_crop(augment.decode(e), 16, 0.875),
}


@pytest.mark.parametrize("name", sorted(GRAPH_OPS))
def test_op_inside_tf_data_equals_eager(name):
    op = GRAPH_OPS[name]
    encoded = [encode(natural_image(seed=i)) for i in range(4)]
    seeds = [tf.constant([1, i], tf.int64) for i in range(4)]
    dataset = tf.data.Dataset.from_tensor_slices((tf.stack(encoded), tf.stack(seeds)))
    graph = list(dataset.map(op, num_parallel_calls=4, deterministic=True).as_numpy_iterator())
    for result, e, s in zip(graph, encoded, seeds):
        np.testing.assert_array_equal(result, op(e, s))


# ---- mixup / cutmix and label smoothing ----


def batch(size=8, pixels=16, classes=5):
    images = tf.random.stateless_normal([size, pixels, pixels, 3], [0, 1])
    labels = tf.constant(np.arange(size) % classes, tf.int32)
    return images, labels


def test_label_smoothing_only():
    images, labels = batch()
    mixed, soft = tf_oracles.mix_batch(
        images, labels, SEED, num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1
    )
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_allclose(np.asarray(soft)[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def test_mixup_blends_images_and_labels_with_the_same_lambda():
    images, labels = batch()
    mixed, soft = tf_oracles.mix_batch(
        images, labels, SEED, num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0
    )
    lam = float(np.asarray(soft)[0, labels[0]])  # example 0 is mixed with example 7 (label 2)
    np.testing.assert_allclose(mixed[0], lam * images[0] + (1 - lam) * images[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(soft).sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_whose_area_sets_the_label_weights():
    images, labels = batch()
    for i in range(6):
        mixed, soft = tf_oracles.mix_batch(
            images,
            labels,
            tf.constant([5, i], tf.int64),
            num_classes=5,
            mixup_alpha=0.0,
            cutmix_alpha=1.0,
            label_smoothing=0.0,
        )
        pasted = np.all(np.asarray(mixed[0]) == np.asarray(images[-1]), axis=-1)
        kept = np.all(np.asarray(mixed[0]) == np.asarray(images[0]), axis=-1)
        assert np.all(pasted | kept)
        np.testing.assert_allclose(np.asarray(soft)[0, labels[0]], kept.mean(), rtol=1e-6)


def test_mix_batch_is_deterministic_and_soft_labels_sum_to_one():
    images, labels = batch()
    first = tf_oracles.mix_batch(images, labels, SEED, num_classes=5)
    again = tf_oracles.mix_batch(images, labels, SEED, num_classes=5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.asarray(first[1]).sum(axis=1), 1.0, rtol=1e-6)
    assert first[1].dtype == tf.float32 and first[1].shape == (8, 5)
