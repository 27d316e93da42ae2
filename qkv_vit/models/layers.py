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
    which a mesh with automatic axes allows wherever the groups fall; under explicit sharding (jax.make_mesh's
    default) JAX asks for the reshape's output sharding and refuses it.

    `axis_name`: inside jax.shard_map over the batch's mesh axes (the trainer's train step), each device holds
    its shard of the global batch, in order. Groups within a shard are normalized there (their running-average
    statistics averaged over the devices); groups that span or straddle shards (or the whole batch, without
    `group_size`) sum per-channel sums of units of gcd(shard, group) images over the devices into their groups,
    with the same two-pass statistics, and every device holds every group's statistics. Either way the running
    averages are the ones one device computes.
    """

    use_running_average: bool
    momentum: float = BATCH_NORM_MOMENTUM
    epsilon: float = BATCH_NORM_EPSILON
    dtype: Dtype = jnp.float32
    group_size: int | None = None
    axis_name: str | tuple[str, ...] | None = None  # the batch's mesh axes, under jax.shard_map
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
        shards = 1 if self.axis_name is None else jax.lax.axis_size(self.axis_name)
        spans_shards = shards > 1 and (self.group_size is None or x.shape[0] % self.group_size)
        if spans_shards and not self.is_initializing():
            y, mean, var = self.normalize_across_shards(x, scale, bias, shards)  # every group's statistics
        else:
            y, mean, var = self.normalize_groups(x, scale, bias)  # this shard's groups' statistics
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(jnp.mean(mean, axis=0)), jax.lax.stop_gradient(jnp.mean(var, axis=0))
            if self.axis_name is not None and not spans_shards:  # the same number of groups on every device
                mean, var = jax.lax.pmean(mean, self.axis_name), jax.lax.pmean(var, self.axis_name)
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            group_images = self.group_size or x.shape[0] * shards
            count = group_images * (x.size // x.shape[-1] // x.shape[0])  # values per channel in one group
            unbiased_var = var * (count / max(count - 1, 1))
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

    def normalize_across_shards(
        self, x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, shards: int
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """This shard's y, and every group's means and biased variances (groups, C), for groups that span shards:
        per-channel sums of units of gcd(shard, group) images summed over the devices into their groups (one
        small all-reduce each), two passes as batch_norm_train."""
        batch, channels = x.shape[0], x.shape[-1]
        size = self.group_size or batch * shards
        if (batch * shards) % size:
            raise ValueError(f"BatchNorm group_size={size} does not divide the batch of {batch * shards} images.")
        unit = int(np.gcd(batch, size))
        units = x.astype(jnp.float32).reshape(batch // unit, -1, channels)  # (units here, values per unit, C)
        count = size * units.shape[1] // unit  # values per channel in one group
        # The group of each of this shard's units, by its position in the global batch.
        first_unit = jax.lax.axis_index(self.axis_name) * (batch // unit)
        group_of_unit = (first_unit + jnp.arange(batch // unit)) // (size // unit)

        def group_means(unit_sums: jnp.ndarray) -> jnp.ndarray:  # (units here, C) -> every group's (groups, C)
            sums = jnp.zeros((batch * shards // size, channels), jnp.float32).at[group_of_unit].add(unit_sums)
            return jax.lax.psum(sums, self.axis_name) / count

        mean = group_means(units.sum(axis=1))
        centered = units - mean[group_of_unit][:, None]
        var = group_means(jnp.square(centered).sum(axis=1))
        y = centered * (jax.lax.rsqrt(var[group_of_unit] + self.epsilon) * scale)[:, None] + bias
        return y.reshape(x.shape), mean, var
