"""The device finishes uint8 batches as the host would have: the same normalization, random erasing and
mixup / cutmix (timm's algorithms, label smoothing folded into the targets), drawn from the same distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import tf_oracles

from qkv_vit.data import augment
from qkv_vit.data._tensorflow import tf
from qkv_vit.train import finishing

SAMPLES = 2000  # draws per distribution: standard errors of about 1% of the quantities compared
XCIT = finishing.BatchFinishing(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    num_classes=5,
    erasing_prob=0.25,
    erasing_area=(0.02, 1 / 3),
    erasing_aspect_min=0.3,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    mix_prob=1.0,
    mix_switch_prob=0.5,
    label_smoothing=0.1,
)


def test_normalization_and_smoothed_targets_equal_the_hosts():
    images = np.random.default_rng(0).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    host = np.stack([tf_oracles.normalize(tf.constant(image), XCIT.mean, XCIT.std).numpy() for image in images])
    np.testing.assert_allclose(finishing.normalize(images, XCIT.mean, XCIT.std), host, rtol=1e-6, atol=1e-6)
    labels = np.array([0, 3, 4, 1], np.int32)
    np.testing.assert_allclose(
        finishing.smooth_labels(labels, 5, 0.1),
        tf_oracles.smooth_labels(tf.constant(labels), 5, 0.1).numpy(),
        rtol=1e-6,
    )


@tf.function
def host_erased_fractions(count: int) -> tf.Tensor:
    """Fractions of a 24x24 image's pixels the host's random_erasing changes, over `count` seeds."""

    def fraction(i: tf.Tensor) -> tf.Tensor:
        image = tf.fill([24, 24, 3], 7.0)
        erased = tf_oracles.random_erasing(image, tf.stack([tf.constant(3, tf.int64), i]), 0.25, (0.02, 1 / 3), 0.3)
        return tf.reduce_mean(tf.cast(tf.reduce_any(erased != 7.0, axis=-1), tf.float32))

    return tf.map_fn(fraction, tf.range(count, dtype=tf.int64), fn_output_signature=tf.float32)


def test_random_erasing_draws_boxes_as_the_host_does():
    device_erase = jax.jit(
        jax.vmap(finishing.random_erasing, in_axes=(0, 0, None, None, None, None)), static_argnums=(2, 3, 4, 5)
    )
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(SAMPLES))
    images = np.full((SAMPLES, 24, 24, 3), 7.0, np.float32)
    device = np.asarray(device_erase(images, keys, 0.25, (0.02, 1 / 3), 0.3, "pixel"))
    device_fractions = np.mean(np.any(device != 7.0, axis=-1), axis=(1, 2))
    host_fractions = host_erased_fractions(tf.constant(SAMPLES)).numpy()
    for fractions in (device_fractions, host_fractions):
        erased = fractions[fractions > 0]
        assert abs(len(erased) / SAMPLES - 0.25) < 0.03  # the erasing probability
        assert erased.min() >= 0.015 and erased.max() <= 1 / 3 + 0.03  # the area range, up to rounding
    assert abs(np.mean(device_fractions > 0) - np.mean(host_fractions > 0)) < 0.04
    device_areas, host_areas = device_fractions[device_fractions > 0], host_fractions[host_fractions > 0]
    np.testing.assert_allclose(
        np.quantile(device_areas, [0.25, 0.5, 0.75]), np.quantile(host_areas, [0.25, 0.5, 0.75]), atol=0.03
    )
    noise = device[device_fractions > 0][np.any(device[device_fractions > 0] != 7.0, axis=-1)]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # "pixel" mode: N(0, 1)
    const = np.asarray(
        finishing.random_erasing(jnp.full((24, 24, 3), 7.0), jax.random.key(1), 1.0, (0.2, 0.3), 0.3, "const")
    )
    assert set(np.unique(const)) == {0.0, 7.0}


def lam_of(images, mixed, soft, labels):
    """The mixing weight a batch was mixed with, read from its soft targets: lam x t + (1 - lam) x t reversed."""
    targets = finishing.smooth_labels(labels, 5, 0.1)
    difference = np.asarray(targets - targets[::-1])
    column = np.argmax(np.abs(difference[0]))
    return float((soft[0, column] - targets[::-1][0, column]) / difference[0, column])


def test_mixing_targets_follow_timms_formula_and_match_the_images():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
    for seed in range(40):
        mixed, soft = finishing.mix(images, labels, jax.random.key(seed), XCIT)
        mixed, soft = np.asarray(mixed), np.asarray(soft)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
        lam = lam_of(images, mixed, soft, labels)
        from_reversed = np.isclose(mixed, np.asarray(images)[::-1]) & ~np.isclose(mixed, np.asarray(images))
        if np.allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5):
            continue  # mixup: the images are mixed with the targets' weight
        # cutmix: the box pasted from the reversed batch covers 1 - lam of the image
        np.testing.assert_allclose(np.mean(from_reversed[0].all(axis=-1)), 1 - lam, atol=1e-6)


def test_mixing_draws_lam_and_the_switch_as_the_host_does():
    images = np.zeros((2, 8, 8, 3), np.float32)
    images[1] = 1.0  # the first image's mean is the share taken from the second
    labels = np.array([0, 1], np.int32)

    def draws(mix_once):
        shares, cutmixed = [], []
        for i in range(SAMPLES // 4):
            mixed, _ = mix_once(i)
            pixels = np.asarray(mixed)[0]
            shares.append(pixels.mean())
            cutmixed.append(np.all((pixels == 0) | (pixels == 1)) and 0 < pixels.mean() < 1)
        return np.array(shares), np.array(cutmixed)

    host_mix = tf.function(
        lambda seed: tf_oracles.mix_batch(tf.constant(images), tf.constant(labels), seed, num_classes=5)
    )
    host_shares, host_cut = draws(lambda i: host_mix(tf.constant([9, i], tf.int64)))
    device_mix = jax.jit(lambda key: finishing.mix(images, labels, key, XCIT))
    device_shares, device_cut = draws(lambda i: device_mix(jax.random.key(i)))
    assert abs(host_cut.mean() - device_cut.mean()) < 0.08 and abs(device_cut.mean() - 0.5) < 0.08  # switch prob
    # The share taken from the other image: mixup 1 - lam, lam ~ Beta(0.8, 0.8); cutmix the box, lam ~ Beta(1, 1).
    np.testing.assert_allclose(
        np.quantile(device_shares, [0.1, 0.25, 0.5, 0.75, 0.9]),
        np.quantile(host_shares, [0.1, 0.25, 0.5, 0.75, 0.9]),
        atol=0.06,
    )


def test_finishing_a_batch_normalizes_erases_each_image_and_mixes():
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "label": np.arange(8, dtype=np.int32) % 5}
    recipe = finishing.BatchFinishing(mean=XCIT.mean, std=XCIT.std, num_classes=5, erasing_prob=1.0)
    finished = jax.jit(lambda b, k: finishing.finish_train_batch(b, k, recipe))(batch, jax.random.key(0))
    normalized = np.asarray(finishing.normalize(batch["image"], recipe.mean, recipe.std))
    erased = np.any(~np.isclose(np.asarray(finished["image"]), normalized, atol=1e-5), axis=-1)  # (8, 16, 16)
    assert np.all(erased.mean(axis=(1, 2)) > 0.01)  # every image erased (probability 1)
    assert len({tuple(np.argwhere(erased[i])[0]) for i in range(8)}) > 1  # each in its own place
    np.testing.assert_allclose(finished["soft_label"], np.eye(5)[batch["label"]])  # no smoothing, no mixing here
    again = jax.jit(lambda b, k: finishing.finish_train_batch(b, k, recipe))(batch, jax.random.key(0))
    np.testing.assert_array_equal(finished["image"], again["image"])  # keys from (seed, step): exact resume


def windows_of_padded(image: np.ndarray, padding: int) -> list[np.ndarray]:
    """Every (H, W) window of `image` zero-padded by `padding` on each side: what pad-and-crop may return."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    height, width = image.shape[:2]
    span = range(2 * padding + 1)
    return [padded[top : top + height, left : left + width] for top in span for left in span]


def test_pad_and_crop_takes_every_window_of_the_zero_padded_image_on_host_and_device():
    """torchvision's RandomCrop(size, padding): each draw is one of the (2p + 1)^2 windows, deterministic per key,
    and all of them come; the same on the device (in-memory pipeline) and in tf.data."""
    image = np.arange(6 * 6 * 3).reshape(6, 6, 3) % 251 + 1  # no zeros: padding shows
    windows = windows_of_padded(image, 2)
    device = jax.jit(lambda key: finishing.pad_and_crop(jnp.asarray(image, jnp.float32), key, 2))
    host = lambda seed: augment.pad_and_crop(tf.constant(image, tf.uint8), tf.constant([seed, 7]), 2).numpy()  # noqa: E731
    for draw in (lambda seed: np.asarray(device(jax.random.key(seed))), host):
        seen = set()
        for seed in range(120):
            out = draw(seed)
            assert np.array_equal(out, draw(seed)) and out.shape == image.shape
            matches = [index for index, window in enumerate(windows) if np.array_equal(out, window)]
            assert len(matches) == 1
            seen.add(matches[0])
        assert len(seen) == len(windows)  # 25 windows, 120 draws: each comes (a miss has odds below 1e-9)


def test_the_in_memory_recipe_pads_and_crops_instead_of_resizing():
    recipe = finishing.BatchFinishing(mean=(0.0,) * 3, std=(1 / 255,) * 3, num_classes=2, geometry=True, crop_padding=1)
    images = jnp.asarray(np.arange(4 * 5 * 5 * 3).reshape(4, 5, 5, 3) % 200 + 1, jnp.uint8)
    out = np.asarray(
        finishing.finish_train_batch({"image": images, "label": jnp.zeros(4, jnp.int32)}, jax.random.key(0), recipe)[
            "image"
        ]
    )
    for finished, image in zip(out, np.asarray(images)):
        assert any(np.allclose(finished, window) for window in windows_of_padded(image.astype(np.float32), 1))
