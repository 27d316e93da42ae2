"""The standard layers XCiT is built from (flax's, differentiated by JAX) and its BatchNorm.

XCiT takes its LayerNorm, Dense, depthwise convolution, BatchNorm and the QKV embedding's token layout as
module fields (`norm_layer`, `dense_layer`, ...), as flax's examples and timm do; the defaults are the ones
here: flax's standard layers (nn.LayerNorm, nn.Dense, nn.Conv with feature_group_count=C for the depthwise
convolution) and a BatchNorm differentiated by JAX, what XLA fuses well on GPU and TPU and what forward-mode
autodiff (jax.jvp, jacfwd) goes through. models/cpu_kernels.py has the same layers (same parameters and
statistics) written for XLA's CPU backend; models/registry.py maps `layer_impl` to one set or the other.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
ModuleDef = Any  # a module class, or a function or partial that builds a module

LAYER_NORM_EPSILON = 1e-6  # timm's XCiT: partial(nn.LayerNorm, eps=1e-6)
# PyTorch's default BatchNorm2d: eps 1e-5, running-stat momentum 0.1 (= flax momentum 0.9).
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9
# timm's Linear init (truncated normal, std 0.02) and PyTorch's Conv2d default (kaiming_uniform with a=sqrt(5)).
dense_init = nn.initializers.truncated_normal(stddev=0.02)
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# Dense(features, dtype=, name=): float32 parameters, `dtype` compute, timm's init, bias zero.
dense = functools.partial(nn.Dense, kernel_init=dense_init)
# LayerNorm(name=) over the last axis, statistics and output in float32 whatever the compute dtype (as under
# PyTorch's autocast, which runs layer_norm in float32): the residual stream stays float32.
layer_norm = functools.partial(nn.LayerNorm, LAYER_NORM_EPSILON, dtype=jnp.float32, use_fast_variance=False)


def depthwise_conv3x3(features: int, dtype: Dtype, name: str) -> nn.Conv:
    """Depthwise 3x3 convolution, padding 1, stride 1, with bias, on (B, H, W, C): parameters `kernel` (3, 3, 1, C),
    `bias` (C,)."""
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        feature_group_count=features,
        dtype=dtype,
        kernel_init=conv_init,
        name=name,
    )


def tokens_as_they_are(x: jnp.ndarray) -> jnp.ndarray:
    """The token layout of the non-linear QKV embeddings' matmuls: (B, N, d) kept (cpu_kernels.token_matrix
    flattens it)."""
    return x


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact GELU, x/2 (1 + erf(x / sqrt 2)), as torch.nn.GELU computes it (flax's default is the tanh
    approximation). jax.nn.gelu(approximate=False) is the same function through erfc, which XLA's CPU backend
    evaluates several times slower than erf."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def drop_path(rate: float, train: bool) -> nn.Dropout:
    """Stochastic depth: drops a residual branch for whole samples (mask broadcast over tokens, channels)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


class Mlp(nn.Module):
    """fc1, GELU, dropout, fc2, dropout on tokens (..., C) -> (..., C), as timm.layers.Mlp; `dtype` computes."""

    hidden_dim: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    dense_layer: ModuleDef = dense

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out_dim = x.shape[-1]
        x = gelu(self.dense_layer(self.hidden_dim, dtype=self.dtype, name="fc1")(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = self.dense_layer(out_dim, dtype=self.dtype, name="fc2")(x)
        return nn.Dropout(self.drop_rate, deterministic=not train)(x)


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
    Input (..., C) in any dtype; output the same shape in `dtype`; statistics in float32.

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
    group_size: int | None = None
    # (x, scale, bias, epsilon) -> (y, mean, biased variance) of one group in training mode.
    normalize: Callable[..., tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]] = batch_norm_train

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
        normalize, batch, size = self.normalize, x.shape[0], self.group_size
        if size is None or size == batch or (self.is_initializing() and batch % size):
            y, mean, var = normalize(x, scale, bias, self.epsilon)
            return y, mean[None], var[None]
        if batch % size:
            raise ValueError(f"BatchNorm group_size={size} does not divide the batch of {batch} images.")
        groups = x.reshape(batch // size, size, *x.shape[1:])
        y, mean, var = jax.vmap(normalize, in_axes=(0, None, None, None))(groups, scale, bias, self.epsilon)
        return y.reshape(x.shape), mean, var
