"""The layers XCiT is built from, chosen by `layer_impl`, and its BatchNorm.

`layer_impl="flax"`: flax's standard layers (nn.LayerNorm, nn.Dense, nn.Conv with feature_group_count=C for
the depthwise convolution) and a BatchNorm differentiated by JAX: what XLA fuses well on GPU and TPU, and
what forward-mode autodiff (jax.jvp, jacfwd) goes through. `"cpu"`: models/cpu_kernels.py, the same
functions with hand-written gradients and 2-d matmuls, faster on XLA's CPU backend. `"auto"` (default):
"cpu" when jax.default_backend() is "cpu", else "flax". Both have the same parameters and statistics, so
checkpoints and converted weights load under either.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qkv_vit.models import cpu_kernels

Dtype = Any

LAYER_IMPLS = ("auto", "flax", "cpu")
LAYER_NORM_EPSILON = 1e-6  # timm's XCiT: partial(nn.LayerNorm, eps=1e-6)
# PyTorch's default BatchNorm2d: eps 1e-5, running-stat momentum 0.1 (= flax momentum 0.9).
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9
# timm's Linear init (truncated normal, std 0.02) and PyTorch's Conv2d default (kaiming_uniform with a=sqrt(5)).
dense_init = nn.initializers.truncated_normal(stddev=0.02)
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def check_layer_impl(layer_impl: str) -> None:
    """ValueError for an unknown `layer_impl` (without starting a JAX backend, as resolving "auto" does)."""
    if layer_impl not in LAYER_IMPLS:
        raise ValueError(f"Unknown layer_impl {layer_impl!r}: choose one of {LAYER_IMPLS}.")


def resolve_layer_impl(layer_impl: str) -> str:
    """ "flax" or "cpu" for an XCiT `layer_impl`; ValueError for an unknown one. Resolving "auto" asks JAX for its
    backend, which starts it: call this when the model is applied, not when it is built (jax.distributed must
    be initialized before any backend starts)."""
    check_layer_impl(layer_impl)
    if layer_impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "flax"
    return layer_impl


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact GELU, x/2 (1 + erf(x / sqrt 2)), as torch.nn.GELU computes it (flax's default is the tanh
    approximation). jax.nn.gelu(approximate=False) is the same function through erfc, which XLA's CPU backend
    evaluates several times slower than erf."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def make_layer_norm(layer_impl: str, name: str) -> nn.Module:
    """LayerNorm over the last axis, statistics and output in float32 whatever the compute dtype (as under
    PyTorch's autocast, which runs layer_norm in float32): the residual stream stays float32."""
    if layer_impl == "cpu":
        return cpu_kernels.LayerNorm(LAYER_NORM_EPSILON, jnp.float32, name=name)
    return nn.LayerNorm(LAYER_NORM_EPSILON, dtype=jnp.float32, use_fast_variance=False, name=name)


def make_dense(layer_impl: str, features: int, dtype: Dtype, name: str, kernel_init: Any = dense_init) -> nn.Module:
    """nn.Dense (float32 parameters, `dtype` compute) with timm's init, bias zero."""
    kind = cpu_kernels.Dense if layer_impl == "cpu" else nn.Dense
    return kind(features, dtype=dtype, kernel_init=kernel_init, name=name)


def make_depthwise_conv3x3(layer_impl: str, features: int, dtype: Dtype, name: str) -> nn.Module:
    """Depthwise 3x3 convolution, padding 1, stride 1, with bias: parameters `kernel` (3, 3, 1, C), `bias` (C,)."""
    if layer_impl == "cpu":
        return cpu_kernels.DepthwiseConv3x3(features, dtype, conv_init, name=name)
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        feature_group_count=features,
        dtype=dtype,
        kernel_init=conv_init,
        name=name,
    )


def batch_norm_train(
    x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Training-mode BatchNorm over every axis but the last, differentiated by JAX: (y, mean, biased variance),
    in float32, with PyTorch's two-pass variance."""
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axis=axes)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes)
    return (x32 - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, mean, var


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with flax.linen.BatchNorm's variables and running averages:
    `ra = momentum * ra + (1 - momentum) * batch statistic` (PyTorch momentum 0.1 is flax momentum 0.9).

    As torch.nn.BatchNorm2d (and unlike flax), the batch normalizes with the biased variance but the running
    variance averages the unbiased one, n / (n - 1) times it for n values per channel. Under jit with the batch
    sharded over devices the statistics are those of the global batch; with `group_size` G ("ghost" batch norm)
    they are those of each group of G consecutive images of the global batch, as XCiT trained: plain
    DistributedDataParallel without SyncBatchNorm normalizes each GPU's 64 images alone. The groups are fixed
    by position, so the result does not depend on the device count; the running statistics average the
    groups' (mean of the group means, mean of the group unbiased variances). Grouping reshapes the batch axis,
    which a mesh with automatic axes (the trainer's) allows wherever the groups fall; under explicit sharding
    (jax.make_mesh's default) JAX asks for the reshape's output sharding and refuses it.
    """

    use_running_average: bool
    momentum: float = BATCH_NORM_MOMENTUM
    epsilon: float = BATCH_NORM_EPSILON
    dtype: Dtype = jnp.float32
    layer_impl: str = "flax"
    group_size: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        if self.use_running_average:
            y = (x.astype(jnp.float32) - running_mean.value) * (jax.lax.rsqrt(running_var.value + self.epsilon) * scale)
            return (y + bias).astype(self.dtype)
        y, mean, var = self.normalize_groups(x, scale, bias)
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * jnp.mean(mean, axis=0)
            count = x.size // x.shape[-1] // mean.shape[0]  # values per channel in one group
            unbiased_var = jnp.mean(var, axis=0) * (count / max(count - 1, 1))
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased_var
        return y.astype(self.dtype)

    def normalize_groups(
        self, x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """(y, per-group means (groups, C), per-group biased variances (groups, C)); one group without group_size."""
        normalize = cpu_kernels.batch_norm_train if self.layer_impl == "cpu" else batch_norm_train
        batch, size = x.shape[0], self.group_size
        if size is None or size == batch or (self.is_initializing() and batch % size):
            y, mean, var = normalize(x, scale, bias, self.epsilon)
            return y, mean[None], var[None]
        if batch % size:
            raise ValueError(f"BatchNorm group_size={size} does not divide the batch of {batch} images.")
        groups = x.reshape(batch // size, size, *x.shape[1:])
        y, mean, var = jax.vmap(normalize, in_axes=(0, None, None, None))(groups, scale, bias, self.epsilon)
        return y.reshape(x.shape), mean, var


def make_batch_norm(
    train: bool, dtype: Dtype, name: str, layer_impl: str = "flax", group_size: int | None = None
) -> BatchNorm:
    return BatchNorm(
        use_running_average=not train, dtype=dtype, layer_impl=layer_impl, group_size=group_size, name=name
    )
