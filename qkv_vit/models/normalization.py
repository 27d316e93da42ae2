"""LayerNorm and BatchNorm with hand-written gradients, computing what torch.nn.LayerNorm and BatchNorm2d
compute (statistics in float32, two-pass variance).

Parameters and statistics are flax's (`scale` ones, `bias` zeros; `batch_stats` `mean` zeros, `var` ones;
all float32), so weights and checkpoints are unchanged. The gradients keep only the input and the
per-row or per-channel statistics for the backward pass and recompute the normalized values there:
autodiff of the same formulas keeps full-size intermediates (the normalized input, broadcast scales)
and costs extra passes over every activation, a measurable share of a training step on a CPU
(benchmarks/README.md).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float) -> jnp.ndarray:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis; statistics in float32 (two-pass
    variance, as PyTorch), result in float32."""
    return _forward(x, scale, bias, epsilon)[0]


def _statistics(x32: jnp.ndarray, axes: tuple[int, ...], keepdims: bool,
                epsilon: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, biased (two-pass) variance and 1 / sqrt(variance + epsilon) of x32 over `axes`."""
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(centered * centered, axis=axes, keepdims=keepdims)
    mean = mean if keepdims else jnp.squeeze(mean, axis=axes)
    # The barrier keeps XLA from fusing the normalization that follows into the reductions above: on CPU
    # that fusion materializes full-size broadcasts of scale and bias; as a separate loop it reads x once.
    return jax.lax.optimization_barrier((mean, var, jax.lax.rsqrt(var + epsilon)))


def _forward(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float) -> tuple[jnp.ndarray, tuple]:
    x32 = x.astype(jnp.float32)
    mean, _, inverse_std = _statistics(x32, (x.ndim - 1,), True, epsilon)
    y = (x32 - mean) * inverse_std * scale + bias
    return y, (x, mean, inverse_std, scale)


def _backward(epsilon: float, residuals: tuple, grad: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    del epsilon  # the statistics are saved
    x, mean, inverse_std, scale = residuals
    grad = grad.astype(jnp.float32)
    normalized = (x.astype(jnp.float32) - mean) * inverse_std
    grad_times_normalized = grad * normalized
    # Means over channels of grad * scale and grad * scale * normalized, as matrix-vector products.
    features = x.shape[-1]
    mean_grad = (grad @ scale)[..., None] / features
    mean_grad_normalized = (grad_times_normalized @ scale)[..., None] / features
    # d/dx of (x - mean) * inverse_std, applied to grad * scale (the standard LayerNorm gradient).
    grad_x = inverse_std * (grad * scale - mean_grad - normalized * mean_grad_normalized)
    reduce_axes = tuple(range(grad.ndim - 1))
    grad_scale = jnp.sum(grad_times_normalized, axis=reduce_axes)
    grad_bias = jnp.sum(grad, axis=reduce_axes)
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with flax's parameters (`scale`, `bias`); `dtype` is the output dtype."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                     epsilon: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Training-mode BatchNorm over every axis but the last: (y, batch mean, biased batch variance), in
    float32. The statistics are returned for the running averages only; callers must stop their gradient
    (the backward pass here ignores their cotangents)."""
    return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_forward(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float) -> tuple:
    x32 = x.astype(jnp.float32)
    mean, var, inverse_std = _statistics(x32, tuple(range(x.ndim - 1)), False, epsilon)
    y = (x32 - mean) * (inverse_std * scale) + bias
    return (y, mean, var), (x, mean, inverse_std, scale)


def _batch_norm_backward(epsilon: float, residuals: tuple, cotangents: tuple) -> tuple:
    del epsilon
    x, mean, inverse_std, scale = residuals
    grad = cotangents[0].astype(jnp.float32)  # the statistics' cotangents are zero (stop_gradient)
    axes = tuple(range(x.ndim - 1))
    count = grad.size // grad.shape[-1]
    normalized = (x.astype(jnp.float32) - mean) * inverse_std
    grad_bias = jnp.sum(grad, axis=axes)
    grad_scale = jnp.sum(grad * normalized, axis=axes)
    grad_x = (inverse_std * scale) * (grad - grad_bias / count - normalized * (grad_scale / count))
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with flax.linen.BatchNorm's variables and running averages:
    `ra = momentum * ra + (1 - momentum) * batch statistic` (PyTorch momentum 0.1 is flax momentum 0.9).
    As torch.nn.BatchNorm2d (and unlike flax), the batch normalizes with the biased variance but the running
    variance averages the unbiased one, n / (n - 1) times it for n values per channel. Under jit with the
    batch sharded over devices the statistics are those of the global batch."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

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
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            count = x.size // x.shape[-1]
            unbiased_var = var * (count / max(count - 1, 1))
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased_var
        return y.astype(self.dtype)
