"""XCiT model: exact parameter counts, shapes for any size, BatchNorm state, drop path, dtypes, errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkv_vit import models

# XCiT with the layers models.create gives (layer_impl="auto": the CPU kernels on a CPU, which run these tests
# faster); the layers compute the same values either way (tests/test_layers.py).
XCiT = functools.partial(models.XCiT, **models.layer_fields("auto"))

# Exact parameter counts with 1000 classes. The five marked (ref) are timm's published counts (fixtures
# README, docs/models.md); every entry also equals reference_param_count below, derived from the PyTorch modules.
PARAM_COUNTS = {
    "xcit_nano_12_p16": 3_053_224,  # ref
    "xcit_nano_12_p8": 3_049_016,  # ref
    "xcit_tiny_12_p16": 6_716_272,  # ref
    "xcit_tiny_12_p8": 6_706_504,
    "xcit_tiny_24_p16": 12_116_896,  # ref
    "xcit_tiny_24_p8": 12_107_128,
    "xcit_small_12_p16": 26_253_304,  # ref
    "xcit_small_12_p8": 26_213_032,
    "xcit_small_24_p16": 47_671_384,
    "xcit_small_24_p8": 47_631_112,
    "xcit_medium_24_p16": 84_395_752,
    "xcit_medium_24_p8": 84_323_624,
    "xcit_large_24_p16": 189_096_136,
    "xcit_large_24_p8": 188_932_648,
}

TINY = dict(embed_dim=32, depth=2, num_heads=4, cls_attn_layers=1, num_classes=5)


def reference_param_count(patch_size, embed_dim, depth, num_heads, cls_attn_layers=2, num_classes=1000, **_):
    """Parameters of timm's Xcit, written out module by module from its source (biases included)."""
    d = embed_dim
    widths = [3] + [d // k for k in ((8, 4, 2, 1) if patch_size == 16 else (4, 2, 1))]
    patch_embed = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:]))  # conv (no bias) + BN
    pos_embed = 64 * d + d
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    xca_block = 3 * 2 * d + (3 * d * d + 3 * d) + num_heads + (d * d + d) + (2 * (9 * d + d) + 2 * d) + mlp + 3 * d
    class_block = 2 * 2 * d + 4 * (d * d + d) + mlp + 2 * d
    return (
        patch_embed
        + pos_embed
        + d
        + depth * xca_block
        + cls_attn_layers * class_block
        + 2 * d
        + d * num_classes
        + num_classes
    )


def init(model, image_size=32, batch=2, seed=0):
    images = jax.random.normal(jax.random.key(seed), (batch, image_size, image_size, 3))
    return model.init(jax.random.key(1), images), images


def test_every_named_model_has_a_count():
    assert sorted(PARAM_COUNTS) == sorted(models.list_models())


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_is_exact(name):
    model = models.create(name)
    assert models.count_params(models.init_shapes(model)["params"]) == PARAM_COUNTS[name]
    assert reference_param_count(**models.architecture(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("patch_size", [16, 8])
@pytest.mark.parametrize("image_size", [32, 64, pytest.param(224, marks=pytest.mark.slow)])
def test_output_shape_and_finite_for_any_size(patch_size, image_size):
    model = XCiT(patch_size=patch_size, **TINY)
    variables, images = init(model, image_size)
    logits = jax.jit(model.apply)(variables, images)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()


@pytest.mark.slow  # compiles over a mesh of fake devices
@pytest.mark.parametrize("qkv", ["linear", "fsne_m8"])  # Dense, and the non-linear embeddings' own matmuls
def test_batch_sharded_over_an_explicit_mesh(qkv):
    """Inputs sharded over jax.make_mesh's (explicit) data axis, a batch of one included, give the logits of
    unsharded inputs: no layer merges the batch axis away (explicit sharding rejects that)."""
    from jax.sharding import NamedSharding, PartitionSpec

    model = models.create("xcit_nano_12_p16", qkv=qkv, **{**TINY, "depth": 1})
    mesh = jax.make_mesh((1,), ("data",))
    for batch in (1, 2):
        variables, images = init(model, batch=batch)
        sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
        logits = jax.jit(model.apply)(variables, sharded)
        np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-5, atol=1e-5)


def test_non_square_images():
    model = XCiT(patch_size=16, **TINY)
    variables, _ = init(model, 32)
    images = jnp.ones((1, 48, 80, 3))
    assert model.apply(variables, images).shape == (1, 5)
    grid = model.apply(variables, images, method="patch_tokens")
    assert grid.shape == (1, 3, 5, 32)


def test_features_before_the_head():
    model = XCiT(patch_size=16, **TINY)
    variables, images = init(model, 32)
    tokens = model.apply(variables, images, method="forward_features")
    features = model.apply(variables, images, method="pre_logits")
    assert tokens.shape == (2, 1 + 4, 32) and features.shape == (2, 32)
    np.testing.assert_allclose(features, tokens[:, 0])
    head = variables["params"]["head"]
    np.testing.assert_allclose(model.apply(variables, images), features @ head["kernel"] + head["bias"], atol=1e-5)
    headless = XCiT(patch_size=16, **{**TINY, "num_classes": 0})
    headless_vars = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "head"}}
    np.testing.assert_allclose(headless.apply(headless_vars, images), features, atol=1e-6)


def test_average_pooling_uses_patch_tokens():
    model = XCiT(patch_size=16, global_pool="avg", **TINY)
    variables, images = init(model, 32)
    tokens = model.apply(variables, images, method="forward_features")
    np.testing.assert_allclose(model.apply(variables, images, method="pre_logits"), tokens[:, 1:].mean(1), atol=1e-6)


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
    model = XCiT(patch_size=8, **TINY)
    variables, images = init(model, 32)
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(changed))  # every BatchNorm (patch stages, LPIs) moved its running stats
    _, eval_updates = model.apply(variables, images, train=False, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], eval_updates["batch_stats"])


def test_train_mode_normalizes_with_batch_statistics():
    model = XCiT(patch_size=8, **TINY)
    variables, images = init(model, 32)
    train_logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert not np.allclose(train_logits, model.apply(variables, images, train=False))


@pytest.mark.slow  # compiles the training-mode forward pass several times
def test_drop_path_is_off_in_eval_and_stochastic_in_train():
    model = XCiT(patch_size=16, drop_path_rate=0.5, **{**TINY, "depth": 4})
    plain = XCiT(patch_size=16, **{**TINY, "depth": 4})
    variables, images = init(model, 32, batch=8)
    np.testing.assert_array_equal(model.apply(variables, images), plain.apply(variables, images))

    def train_logits(seed):
        out, _ = model.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)}
        )
        return out

    a, b = train_logits(0), train_logits(1)
    np.testing.assert_array_equal(a, train_logits(0))  # deterministic given the rng
    assert not np.allclose(a, b)
    reference, _ = plain.apply(variables, images, train=True, mutable=["batch_stats"])
    assert not np.allclose(a, reference)


def test_drop_path_drops_whole_samples():
    from qkv_vit.models.layers import drop_path

    x = jnp.ones((64, 5, 7))
    out = drop_path(0.5, train=True).apply({}, x, rngs={"dropout": jax.random.key(0)})
    per_sample = np.asarray(out).reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample.min(1) == per_sample.max(1)).all()  # each sample kept or dropped as a whole
    assert 10 < (per_sample[:, 0] == 0).sum() < 54


def test_bfloat16_compute_keeps_float32_params():
    model = XCiT(patch_size=16, dtype=jnp.bfloat16, **TINY)
    variables, images = init(model, 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits = model.apply(variables, images)
    reference = XCiT(patch_size=16, **TINY).apply(variables, images)
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.1)


def test_create_applies_overrides():
    model = models.create("xcit_nano_12_p16", num_classes=10, drop_path_rate=0.1)
    assert (model.embed_dim, model.depth, model.num_heads, model.num_classes) == (128, 12, 4, 10)
    assert model.drop_path_rate == 0.1 and not model.tokens_norm
    assert models.create("xcit_tiny_24_p8").eta == 1e-5


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: models.create("xcit_huge_12_p16"), "Unknown model 'xcit_huge_12_p16'"),
        (lambda: models.create("xcit_nano_12_p16", qkv_bias=False), "Unknown XCiT option"),
        (lambda: XCiT(patch_size=14, **TINY), "patch_size must be 16 or 8"),
        (lambda: XCiT(patch_size=16, embed_dim=36, depth=1, num_heads=4), "multiple of 8"),
        (lambda: XCiT(patch_size=16, embed_dim=32, depth=1, num_heads=3), "not divisible by 3 heads"),
        (lambda: XCiT(patch_size=16, drop_path_rate=1.0, **TINY), "drop_path_rate must be in"),
        (lambda: XCiT(patch_size=16, global_pool="max", **TINY), "global_pool"),
    ],
)
def test_bad_configuration_is_a_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_image_size_not_divisible_by_patch_is_a_clear_error():
    model = XCiT(patch_size=16, **TINY)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        model.init(jax.random.key(0), jnp.zeros((1, 40, 48, 3)))


def test_a_recorded_architecture_builds_its_model_with_the_constructor_alone():
    """What model.json and converted weights store, read back: XCiT(**architecture_from_json(...)) is the model the
    weights belong to (with the standard layers), from_architecture the same with the layers of "auto"."""
    model = models.create("xcit_nano_12_p8", qkv="fsne_m8", num_classes=3, depth=1, layer_impl="cpu")
    stored = json.loads(json.dumps(models.architecture_of(model)))
    assert stored["layer_impl"] == "cpu" and stored["dtype"] == "float32"
    options = models.architecture_from_json(stored)
    assert models.architecture_of(models.XCiT(**options)) == {**stored, "layer_impl": "flax"}
    assert models.from_architecture(options) == model.clone(**models.layer_fields("auto"))
