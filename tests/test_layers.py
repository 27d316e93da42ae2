"""The two layer implementations (layer_impl "flax" for GPU/TPU, "cpu" for XLA:CPU) compute the same function and
gradients, layer by layer and as whole models; the flax one is plain autodiff that XLA can fuse and forward-mode
differentiate; ghost BatchNorm normalizes fixed groups; bfloat16 keeps the residual stream in float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkv_vit import models
from qkv_vit.models import cpu_kernels, layers
from qkv_vit.models.xcit import XCA
from qkv_vit.train.target import Target

TOLERANCE = 1e-5


def close(a, b, tolerance=TOLERANCE):
    """Equal to float32 rounding relative to the array's largest entry."""
    np.testing.assert_allclose(a, b, atol=tolerance * max(1.0, float(np.abs(b).max())), rtol=tolerance)


def grads_close(f, g, args, tolerance=TOLERANCE):
    """f and g agree in value and in the gradient of a random projection of their output."""
    close(f(*args), g(*args), tolerance)
    weights = np.random.default_rng(1).standard_normal(np.shape(g(*args))).astype(np.float32)
    argnums = tuple(range(len(args)))
    for a, b in zip(
        jax.grad(lambda *xs: (f(*xs) * weights).sum(), argnums)(*args),
        jax.grad(lambda *xs: (g(*xs) * weights).sum(), argnums)(*args),
        strict=True,
    ):
        close(a, b, tolerance)


def random_arrays(*shapes, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) + offset).astype(np.float32) for shape in shapes]


def module_function(module, collection="params"):
    """(x, *leaves) -> module output, the leaves being the module's variables in sorted-name order."""

    def run(x, *leaves):
        names = sorted(module.init(jax.random.key(0), x)[collection])
        return module.apply({collection: dict(zip(names, leaves))}, x)

    return run


def both(field, x, *args, **kwargs):
    """The same layer (XCiT's layer `field`) built by each implementation, checked to have identical variables,
    with its leaves."""
    flax_layer, cpu_layer = (models.layer_fields(impl)[field](*args, **kwargs) for impl in ("flax", "cpu"))
    flax_variables = flax_layer.init(jax.random.key(0), x)
    cpu_variables = cpu_layer.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, flax_variables) == jax.tree.map(np.shape, cpu_variables)
    leaves = [
        np.asarray(v) + 0.1 * np.arange(np.size(v)).reshape(np.shape(v)) / max(np.size(v), 1)
        for _, v in sorted(flax_variables["params"].items())
    ]  # not the init's ones/zeros
    return module_function(flax_layer), module_function(cpu_layer), leaves


# --- each layer, flax against cpu -----------------------------------------------------------------------------------


def test_layer_norm_implementations_agree():
    (x,) = random_arrays((2, 5, 8), offset=3.0)  # a large mean tests the variance formula
    flax_fn, cpu_fn, leaves = both("norm_layer", x, name="norm")
    grads_close(cpu_fn, flax_fn, (x, *leaves))


def test_dense_implementations_agree_on_token_grids():
    (x,) = random_arrays((2, 5, 8))
    flax_fn, cpu_fn, leaves = both("dense_layer", x, 6, dtype=jnp.float32, name="fc")
    grads_close(cpu_fn, flax_fn, (x, *leaves))


def test_depthwise_conv_implementations_agree_and_equal_a_grouped_convolution():
    (x,) = random_arrays((2, 5, 7, 6))
    flax_fn, cpu_fn, leaves = both("depthwise_conv_layer", x, 6, dtype=jnp.float32, name="conv")
    grads_close(cpu_fn, flax_fn, (x, *leaves))

    def grouped(x, kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel[:, :, None, :],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )

    (kernel,) = random_arrays((3, 3, 6))
    grads_close(cpu_kernels.depthwise_conv3x3, grouped, (x, kernel))


def batch_norm_function(impl, train, stats, group_size=None):
    """(x, scale, bias) -> (y, new batch_stats) of our BatchNorm."""

    def run(x, scale, bias):
        layer = models.layer_fields(impl)["batch_norm_layer"]
        module = layer(use_running_average=not train, group_size=group_size)
        y, updates = module.apply(
            {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, mutable=["batch_stats"]
        )
        return y, updates["batch_stats"]

    return run


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("impl", ["flax", "cpu"])
def test_batch_norm_is_torchs_batch_norm(impl, train):
    """Values and gradients of flax's BatchNorm; running mean as flax's, running variance as torch.nn.BatchNorm2d's
    (the unbiased batch variance; flax averages the biased one)."""
    x, scale, bias, mean, var = random_arrays((4, 3, 5, 6), (6,), (6,), (6,), (6,), offset=1.0)
    stats = {"mean": mean, "var": np.abs(var) + 0.5}
    ours = batch_norm_function(impl, train, stats)

    def reference(x, s, b):
        module = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False)
        y, updates = module.apply({"params": {"scale": s, "bias": b}, "batch_stats": stats}, x, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    grads_close(lambda *a: ours(*a)[0], lambda *a: reference(*a)[0], (x, scale, bias))
    expected_var = stats["var"]
    if train:
        expected_var = 0.9 * stats["var"] + 0.1 * x.reshape(-1, x.shape[-1]).var(axis=0, ddof=1)
    close(ours(x, scale, bias)[1]["mean"], reference(x, scale, bias)[1]["mean"])
    close(ours(x, scale, bias)[1]["var"], expected_var)
    assert jax.tree.structure(ours(x, scale, bias)[1]) == jax.tree.structure(reference(x, scale, bias)[1])


@pytest.mark.parametrize("impl", ["flax", "cpu"])
def test_ghost_batch_norm_equals_normalizing_each_group_alone(impl):
    x, scale, bias = random_arrays((8, 3, 3, 4), (4,), (4,), offset=2.0)
    x[4:] = x[4:] * 3 + 5  # groups with other statistics, so whole-batch statistics would differ
    stats = {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}
    grouped = batch_norm_function(impl, True, stats, group_size=4)
    alone = batch_norm_function(impl, True, stats)
    y, new_stats = grouped(x, scale, bias)
    parts = [alone(x[i : i + 4], scale, bias) for i in (0, 4)]
    close(y, np.concatenate([part[0] for part in parts]))
    close(new_stats["mean"], np.mean([part[1]["mean"] for part in parts], axis=0))  # the mean over groups
    close(new_stats["var"], np.mean([part[1]["var"] for part in parts], axis=0))
    assert np.abs(np.asarray(y) - np.asarray(alone(x, scale, bias)[0])).max() > 0.1
    grads_close(
        lambda *a: grouped(*a)[0],
        lambda x, s, b: jnp.concatenate([alone(x[i : i + 4], s, b)[0] for i in (0, 4)]),
        (x, scale, bias),
    )
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 8 images"):
        batch_norm_function(impl, True, stats, group_size=3)(x, scale, bias)


def test_gelu_is_exact_gelu():
    grads_close(layers.gelu, lambda x: jax.nn.gelu(x, approximate=False), random_arrays((64,)))


def test_xca_attention_map_equals_normalize_then_multiply():
    class AttentionMap(XCA):
        @nn.compact
        def __call__(self, q, k):
            return self.attention_map(q, k, train=False)

    q, k = random_arrays((2, 7, 4, 3), (2, 7, 4, 3))
    temperature = np.asarray([0.5, 1.0, 2.0, 3.0], np.float32).reshape(4, 1, 1)
    ours = lambda q, k, t: AttentionMap(12, 4).apply({"params": {"temperature": t}}, q, k)  # noqa: E731

    def reference(q, k, t):  # torch.nn.functional.normalize along tokens, then q^T k
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        k = k / jnp.maximum(jnp.linalg.norm(k, axis=1, keepdims=True), 1e-12)
        return jax.nn.softmax(jnp.einsum("bnhc,bnhd->bhcd", q, k) * t, axis=-1)

    grads_close(ours, reference, (q, k, temperature))
    jaxpr = str(jax.make_jaxpr(ours)(q, k, temperature))
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr  # float32 gram on GPU/TPU too


# --- whole models ---------------------------------------------------------------------------------------------------

TINY = dict(embed_dim=32, depth=2, num_heads=4, cls_attn_layers=1, num_classes=5)
SMALLEST = dict(TINY, depth=1)  # one block of each kind: what the whole-model comparisons need


def model_pair(qkv, **options):
    flax_model = models.create("xcit_nano_12_p8", qkv=qkv, layer_impl="flax", **SMALLEST, **options)
    return flax_model, flax_model.clone(**models.layer_fields("cpu"))


@pytest.mark.slow  # compiles two whole models' gradients
@pytest.mark.parametrize("qkv", ["linear", "fsne_m8"])
def test_whole_models_agree_in_values_gradients_and_batch_statistics(qkv):
    flax_model, cpu_model = model_pair(qkv, qkv_in_class_attention=qkv != "linear")
    (images,) = random_arrays((4, 16, 16, 3))
    variables = flax_model.init(jax.random.key(0), images)
    assert jax.tree.map(np.shape, cpu_model.init(jax.random.key(0), images)) == jax.tree.map(np.shape, variables)
    close(jax.jit(cpu_model.apply)(variables, images), jax.jit(flax_model.apply)(variables, images))

    def loss(model):
        def run(params):
            logits, updates = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return jnp.sum(logits * jnp.arange(5.0)), updates

        return jax.jit(jax.value_and_grad(run, has_aux=True))

    (flax_loss, flax_stats), flax_grads = loss(flax_model)(variables["params"])
    (cpu_loss, cpu_stats), cpu_grads = loss(cpu_model)(variables["params"])
    close(cpu_loss, flax_loss)
    jax.tree.map(close, cpu_grads, flax_grads)
    jax.tree.map(close, cpu_stats, flax_stats)


def test_forward_mode_autodiff_goes_through_a_flax_model():
    flax_model, _ = model_pair("fsne_m8")
    images, tangent = random_arrays((2, 16, 16, 3), (2, 16, 16, 3))
    variables = flax_model.init(jax.random.key(0), images)
    run = jax.jit(lambda x: flax_model.apply(variables, x, train=True, mutable=["batch_stats"])[0])
    logits, directional = jax.jit(lambda x, t: jax.jvp(run, (x,), (t,)))(images, tangent)
    step = 1e-2  # against a central difference
    numeric = (run(images + step * tangent) - run(images - step * tangent)) / (2 * step)
    np.testing.assert_allclose(directional, numeric, rtol=2e-2, atol=2e-3 * float(np.abs(numeric).max()))
    assert logits.shape == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["flax", "cpu"])
def test_a_flax_train_step_has_no_custom_gradients_or_fusion_barriers(tiny_config, tmp_path, impl):
    from qkv_vit import data
    from qkv_vit.train import trainer

    tiny_config.model.layer_impl = impl
    run = trainer.build_run(tiny_config, tmp_path, data.open_source(tiny_config.data), target=Target.present())
    state = jax.eval_shape(run.steps.init_state)
    size = tiny_config.data.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((16, size, size, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32),
    }
    jaxpr = str(jax.make_jaxpr(run.steps.train_step)(state, batch, None))  # no distillation teacher
    kernels = ("custom_vjp_call" in jaxpr, "optimization_barrier" in jaxpr)
    assert kernels == ((False, False) if impl == "flax" else (True, True))


def test_auto_chooses_the_cpu_kernels_on_a_cpu_backend_only(monkeypatch):
    auto = models.create("xcit_nano_12_p8", **TINY)  # layer_impl="auto" by default
    (images,) = random_arrays((1, 16, 16, 3))
    variables = auto.init(jax.random.key(0), images)

    def jaxpr():
        return str(jax.make_jaxpr(lambda x: auto.apply(variables, x))(images))

    assert "optimization_barrier" in jaxpr()  # the tests run on a CPU backend: the CPU kernels
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "optimization_barrier" not in jaxpr()  # chosen when the model is applied, not when it is built
    assert models.architecture_of(auto)["layer_impl"] == "auto"
    assert models.architecture_of(auto.clone(**models.layer_fields("cpu")))["layer_impl"] == "cpu"
    with pytest.raises(ValueError, match="Unknown layer_impl 'xla'"):
        models.create("xcit_nano_12_p8", layer_impl="xla")


# --- bfloat16 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["flax", "cpu"])
def test_bfloat16_computes_matmuls_in_bfloat16_and_keeps_the_residual_stream_in_float32(impl):
    """As PyTorch's autocast: at eta = 1e-5 a bfloat16 residual stream would round LayerScale's updates away."""
    model = models.create("xcit_nano_12_p8", **TINY, eta=1e-5, layer_impl=impl, dtype=jnp.bfloat16)
    (images,) = random_arrays((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    logits, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    outputs = state["intermediates"]
    for block in ("blocks_0", "blocks_1", "cls_attn_blocks_0"):  # the residual stream after each block
        assert outputs[block]["__call__"][0].dtype == jnp.float32, block
    assert outputs["blocks_0"]["mlp"]["fc1"]["__call__"][0].dtype == jnp.bfloat16  # the matmuls' compute dtype
    assert outputs["blocks_0"]["norm1"]["__call__"][0].dtype == jnp.float32
    assert logits.dtype == jnp.float32
    assert jax.tree.leaves(jax.tree.map(lambda p: p.dtype, variables["params"])) == [jnp.float32] * len(
        jax.tree.leaves(variables["params"])
    )
