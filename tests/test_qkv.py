"""The SNE / P-SNE / F-SNE query-key-value embeddings: exact parameter budgets, the algebra they must
satisfy, F-SNE's efficient form, gradients into the codes, and that every variant trains."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkv_vit import models
from qkv_vit.models.flops import count_macs
from qkv_vit.models.qkv import NonlinearQKV, QKVSpec, qkv_params_per_block
from qkv_vit.params import main as params_main

# XCiT with the layers models.create gives (layer_impl="auto": the CPU kernels on a CPU, which run these tests
# faster); the layers compute the same values either way (tests/test_layers.py).
XCiT = functools.partial(models.XCiT, **models.layer_fields("auto"))

BASELINE = {"xcit_nano_12_p16": 3_053_224, "xcit_tiny_12_p16": 6_716_272}

VARIANTS = {
    "linear": dict(qkv_embed="linear"),
    "sne": dict(qkv_embed="sne"),
    "sne_h64": dict(qkv_embed="sne", qkv_hidden_dim=64),
    "psne_first": dict(qkv_embed="psne"),
    "psne_first_h96": dict(qkv_embed="psne", qkv_hidden_dim=96),
    "psne_second": dict(qkv_embed="psne", shared_layer="second"),
    "psne_second_h64": dict(qkv_embed="psne", shared_layer="second", qkv_hidden_dim=64),
    "fsne_m4": dict(qkv_embed="fsne", code_size=4),
    "fsne_m8": dict(qkv_embed="fsne", code_size=8),
    "fsne_m16": dict(qkv_embed="fsne", code_size=16),
    "fsne_m8_h192": dict(qkv_embed="fsne", code_size=8, qkv_hidden_dim=192),
    "fsne_add": dict(qkv_embed="fsne", code_mode="add"),
    "sne_in_class_attention": dict(qkv_embed="sne", qkv_in_class_attention=True),
    "fsne_in_class_attention": dict(qkv_embed="fsne", code_size=8, qkv_in_class_attention=True),
}


def paper_qkv_params(d, options):
    """docs/models.md's table of parameters per block (our reading of the papers' abstracts), written out independently of the library."""
    h, m = options.get("qkv_hidden_dim") or d, options.get("code_size", 8)
    embed = options["qkv_embed"]
    if embed == "linear":
        return 3 * d * d + 3 * d
    if embed == "sne":
        return 3 * (d * h + h + h * d + d)
    if embed == "psne" and options.get("shared_layer", "first") == "first":
        return d * h + h + 3 * (h * d + d)
    if embed == "psne":
        return 3 * (d * h + h) + h * d + d
    if options.get("code_mode", "concat") == "concat":
        return (d + m) * h + h + h * d + d + 3 * m
    return d * h + h + h * d + d + 3 * d


def paper_total(name, options):
    config = models.MODEL_CONFIGS[name]
    d, depth = config["embed_dim"], config["depth"]
    delta = paper_qkv_params(d, options) - (3 * d * d + 3 * d)
    blocks = depth + (2 if options.get("qkv_in_class_attention") else 0)
    return BASELINE[name] + blocks * delta


def trainable_params(model):
    return models.count_params(models.init_shapes(model)["params"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(BASELINE))
def test_param_count_matches_paper_formula(name, variant):
    options = VARIANTS[variant]
    model = models.create(name, **options)
    assert trainable_params(model) == paper_total(name, options)
    assert qkv_params_per_block(model.qkv_spec, model.embed_dim) == paper_qkv_params(model.embed_dim, options)


def test_paper_budget_lines():
    count = lambda **options: trainable_params(models.create("xcit_nano_12_p16", **options))  # noqa: E731
    assert count(qkv="fsne_m8") == 2_867_656  # the abstract's 2.9M model
    assert count(qkv="fsne_m8_wide") == 3_071_176  # the abstract's 3.1M model
    for budget_matched in ("sne", "psne", "psne_second"):  # h chosen to match XCiT-N12/16's 3,053,224
        assert abs(count(qkv=budget_matched) - 3_053_224) < 0.001 * 3_053_224


def random_embedding(spec, dim=12, tokens=5, seed=0):
    """An embedding module with every parameter (biases and codes included) random and non-zero."""
    module = NonlinearQKV(spec, dim)
    x = jax.random.normal(jax.random.key(seed), (2, tokens, dim))
    params = module.init(jax.random.key(seed + 1), x)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    params = jax.tree.unflatten(tree, [jax.random.normal(k, p.shape) * 0.5 for k, p in zip(keys, leaves)])
    return module, params, x


@pytest.mark.parametrize("code_mode", ["concat", "add"])
def test_efficient_fsne_equals_the_concatenation_formula(code_mode):
    spec = QKVSpec(qkv_embed="fsne", code_size=3, code_mode=code_mode, qkv_hidden_dim=7)
    module, params, x = random_embedding(spec)
    out = module.apply({"params": params}, x)
    w1, b1, w2, b2, codes = (
        params[k] for k in ("hidden_kernel", "hidden_bias", "output_kernel", "output_bias", "codes")
    )
    for t in range(3):
        code = jnp.broadcast_to(codes[t], x.shape[:2] + codes[t].shape)
        first_input = jnp.concatenate([x, code], axis=-1) if code_mode == "concat" else x + code
        naive = jax.nn.relu(first_input @ w1 + b1) @ w2 + b2
        np.testing.assert_allclose(out[:, :, t], naive, rtol=1e-5, atol=1e-5)


def test_fsne_with_equal_codes_gives_equal_queries_keys_values():
    module, params, x = random_embedding(QKVSpec(qkv_embed="fsne", code_size=4))
    params = {**params, "codes": jnp.broadcast_to(params["codes"][0], params["codes"].shape)}
    out = module.apply({"params": params}, x)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    params["codes"] = params["codes"].at[1].add(1.0)
    assert not np.allclose(module.apply({"params": params}, x)[:, :, 0], module.apply({"params": params}, x)[:, :, 1])


def explicit_linear_map(spec, params, dim):
    """With an identity activation each embedding is x A_t + a_t: A_t and a_t from the weights by matrix algebra."""
    w1, b1, w2, b2 = (params[k] for k in ("hidden_kernel", "hidden_bias", "output_kernel", "output_bias"))
    shared_first, shared_second = spec.layers_shared()
    maps = []
    for t in range(3):
        w1_t, b1_t = (w1, b1) if shared_first else (w1[t], b1[t])
        w2_t, b2_t = (w2, b2) if shared_second else (w2[t], b2[t])
        if spec.qkv_embed == "fsne" and spec.code_mode == "concat":
            b1_t = params["codes"][t] @ w1_t[dim:] + b1_t
            w1_t = w1_t[:dim]
        elif spec.qkv_embed == "fsne":
            b1_t = params["codes"][t] @ w1_t + b1_t
        maps.append((w1_t @ w2_t, b1_t @ w2_t + b2_t))
    return maps


@pytest.mark.parametrize(
    "spec",
    [
        QKVSpec(qkv_embed="sne", qkv_hidden_dim=6, qkv_activation="identity"),
        QKVSpec(qkv_embed="psne", shared_layer="first", qkv_hidden_dim=6, qkv_activation="identity"),
        QKVSpec(qkv_embed="psne", shared_layer="second", qkv_hidden_dim=6, qkv_activation="identity"),
        QKVSpec(qkv_embed="fsne", code_size=3, qkv_hidden_dim=6, qkv_activation="identity"),
        QKVSpec(qkv_embed="fsne", code_mode="add", qkv_hidden_dim=6, qkv_activation="identity"),
    ],
    ids=["sne", "psne_first", "psne_second", "fsne_concat", "fsne_add"],
)
def test_identity_activation_collapses_to_a_linear_map(spec):
    module, params, x = random_embedding(spec, dim=12)
    out = module.apply({"params": params}, x)
    for t, (matrix, bias) in enumerate(explicit_linear_map(spec, params, 12)):
        assert matrix.shape == (12, 12)
        np.testing.assert_allclose(out[:, :, t], x @ matrix + bias, rtol=1e-4, atol=1e-4)
    relu = module.clone(spec=QKVSpec(**{**spec.__dict__, "qkv_activation": "relu"}))
    assert not np.allclose(relu.apply({"params": params}, x), out)  # the non-linearity matters


TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1, num_classes=8)


def train(model, steps, learning_rate=3e-3):
    """Adam on one fixed batch (memorization); returns the losses and the first and last parameters."""
    images = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    labels = jnp.arange(16) % 8
    variables = model.init(jax.random.key(1), images)
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

    params, batch_stats, opt_state = variables["params"], variables["batch_stats"], optimizer.init(variables["params"])
    losses, first_grads = [], None
    for _ in range(steps):
        params, batch_stats, opt_state, loss, grads = step(params, batch_stats, opt_state)
        losses.append(float(loss))
        first_grads = first_grads or grads
    return losses, variables["params"], params, first_grads


@pytest.mark.slow  # trains a model for several steps
def test_gradients_reach_the_codes():
    model = XCiT(**{**TINY, "depth": 2}, qkv_embed="fsne", code_size=4, qkv_in_class_attention=True)
    _, before, after, grads = train(model, steps=2)
    code_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(before)[0] if "codes" in str(path)]
    assert len(code_paths) == 3  # two XCA blocks and one class-attention block
    for block in ("blocks_0", "blocks_1", "cls_attn_blocks_0"):
        assert np.abs(grads[block]["attn"]["qkv"]["codes"]).min() > 0
        assert not np.allclose(before[block]["attn"]["qkv"]["codes"], after[block]["attn"]["qkv"]["codes"])


@pytest.mark.slow  # trains each variant for several steps
@pytest.mark.parametrize(
    "options",
    [
        dict(qkv_embed="linear"),
        dict(qkv_embed="sne", qkv_hidden_dim=16),
        dict(qkv_embed="psne", shared_layer="first"),
        dict(qkv_embed="psne", shared_layer="second"),
        dict(qkv_embed="fsne", code_size=4),
        dict(qkv_embed="fsne", code_mode="add"),
    ],
    ids=["linear", "sne", "psne_first", "psne_second", "fsne_concat", "fsne_add"],
)
def test_every_variant_trains(options):
    losses, *_ = train(XCiT(**TINY, **options), steps=30)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(qkv_embed="mlp"), "Unknown qkv_embed 'mlp'"),
        (dict(qkv_embed="psne", shared_layer="both"), "Unknown shared_layer 'both'"),
        (dict(qkv_embed="fsne", code_mode="mul"), "Unknown code_mode 'mul'"),
        (dict(qkv_embed="fsne", code_size=0), "code_size must be positive"),
        (dict(qkv_embed="sne", qkv_hidden_dim=-4), "qkv_hidden_dim must be positive"),
    ],
)
def test_bad_qkv_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        models.create("xcit_nano_12_p16", **options)


@pytest.mark.parametrize(
    "name, paper_gflops", [("xcit_nano_12_p16", 0.5), ("xcit_tiny_12_p16", 1.2), ("xcit_small_12_p16", 4.8)]
)
def test_macs_match_the_xcit_paper(name, paper_gflops):
    assert abs(count_macs(models.create(name)) / 1e9 - paper_gflops) < 0.06


@pytest.mark.parametrize("qkv", ["linear", "sne", "psne_second", "fsne_m8_wide"])
def test_macs_agree_with_xla_cost_analysis(qkv):
    model = models.create("xcit_nano_12_p16", qkv=qkv, qkv_in_class_attention=qkv != "linear")
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    xla_flops = jax.jit(model.apply).lower(models.init_shapes(model), images).cost_analysis()["flops"]
    # XLA counts 2 flops per multiply-add and also norms and activations, which the MAC count leaves out.
    assert 0.85 < count_macs(model) / (xla_flops / 2) <= 1.0


def test_params_command_prints_the_budget(capsys):
    assert params_main(["xcit_nano_12_p16", "--qkv-embed", "fsne", "--code-size", "8"]) == 0
    assert "| 2,867,656 | 507,936 | 34,072 | 0.589 |" in capsys.readouterr().out
    assert params_main(["--table", "--table-models", "xcit_nano_12_p16"]) == 0
    table = capsys.readouterr().out
    assert "| xcit_nano_12_p16 | linear | 3,053,224 | 693,504 | 49,536 | 0.551 |" in table
    assert "| xcit_nano_12_p16 | fsne_m8_wide (h=192, m=8) | 3,071,176 |" in table
    assert params_main(["xcit_nano_12_p16", "--qkv-embed", "fsne", "--code-size", "0"]) == 2


def test_preset_hidden_width_follows_an_overridden_embed_dim():
    model = models.create("xcit_nano_12_p8", qkv="fsne_m8_wide", embed_dim=64)
    assert model.qkv_hidden_dim == 96  # 1.5 x the overridden width, not 1.5 x nano's 128
    assert models.create("xcit_nano_12_p8", qkv="sne", embed_dim=64, qkv_hidden_dim=40).qkv_hidden_dim == 40
