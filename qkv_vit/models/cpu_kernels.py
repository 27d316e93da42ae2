"""The CPU implementations of XCiT's layers (`layer_impl="cpu"`): the same functions and parameters as the
standard flax / lax layers of models/layers.py, written for XLA's CPU backend. registry.py passes them to XCiT
as its layer fields: `dense`, `LayerNorm`, `DepthwiseConv3x3`, `BatchNorm`, `token_matrix`.

What differs, and why (figures in benchmarks/README.md):
- LayerNorm and BatchNorm have hand-written gradients that keep only the input and the per-row or
  per-channel statistics and recompute the normalized values in the backward pass (autodiff keeps
  full-size intermediates and costs extra passes over every activation), with an optimization barrier
  that keeps XLA:CPU from fusing the normalization into the reductions.
- The depthwise 3x3 convolution is nine shifted multiply-adds with its own gradient: XLA:CPU runs grouped
  convolutions slowly and computes their kernel gradient as a full C x C convolution.
- Dense multiplies the tokens as one (tokens, features) matrix: XLA:CPU computes the kernel gradient of a
  3-d contraction with a transposed copy of an activation.
On GPU and TPU these choices cost: the barrier forbids the fusions XLA makes for normalizations, the nine
shifted reductions replace one grouped convolution, and `custom_vjp` blocks forward-mode autodiff. So they
are chosen on a CPU backend only (layer_impl="auto"), never the only path.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.models import layers

# --- normalization statistics and LayerNorm ---------------------------------------------------------------------


def statistics(
    x32: jnp.ndarray, axes: tuple[int, ...], keepdims: bool, epsilon: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Mean, biased (two-pass) variance and 1 / sqrt(variance + epsilon) of x32 over `axes`."""
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    centered = x32 - mean
    var = jnp.mean(centered * centered, axis=axes, keepdims=keepdims)
    mean = mean if keepdims else jnp.squeeze(mean, axis=axes)
    # The barrier keeps XLA from fusing the normalization that follows into the reductions above: on CPU
    # that fusion materializes full-size broadcasts of scale and bias; as a separate loop it reads x once.
    return jax.lax.optimization_barrier((mean, var, jax.lax.rsqrt(var + epsilon)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float) -> jnp.ndarray:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis; statistics in float32 (two-pass
    variance, as PyTorch), result in float32."""
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float) -> tuple:
    x32 = x.astype(jnp.float32)
    mean, _, inverse_std = statistics(x32, (x.ndim - 1,), True, epsilon)
    y = (x32 - mean) * inverse_std * scale + bias
    return y, (x, mean, inverse_std, scale)


def _layer_norm_backward(epsilon: float, residuals: tuple, grad: jnp.ndarray) -> tuple:
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


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
    """layers.layer_norm, nn.LayerNorm(epsilon, use_fast_variance=False) (same parameters `scale`, `bias`; `dtype`
    the output dtype), with the hand-written gradient above."""

    epsilon: float = layers.LAYER_NORM_EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


# --- BatchNorm in training mode ------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Training-mode BatchNorm over every axis but the last: (y, batch mean, biased batch variance), in
    float32. The statistics are returned for the running averages only; callers must stop their gradient
    (the backward pass here ignores their cotangents)."""
    return _batch_norm_forward(x, scale, bias, epsilon)[0]


def _batch_norm_forward(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float) -> tuple:
    x32 = x.astype(jnp.float32)
    mean, var, inverse_std = statistics(x32, tuple(range(x.ndim - 1)), False, epsilon)
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


class BatchNorm(layers.BatchNorm):
    """layers.BatchNorm (same variables, statistics and groups) normalizing with the hand-written gradient above."""

    normalize: Callable[..., tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]] = batch_norm_train


# --- Dense over a token matrix -------------------------------------------------------------------------------------


def token_matrix(x: jnp.ndarray) -> jnp.ndarray:
    """x (..., features) as one (tokens, features) matrix. A leading axis of one is kept as it is: merging
    it away would drop a batch axis that is sharded over a mesh (explicit sharding, batch of one)."""
    if x.ndim <= 2 or x.shape[0] == 1:
        return x
    return x.reshape(-1, x.shape[-1])


class Dense(nn.Dense):
    """flax.linen.Dense (same parameters, same function) applied to the inputs flattened to (tokens, features).

    On 3-d inputs nn.Dense contracts one axis and keeps two batch axes, so the kernel gradient contracts two
    axes, which XLA's CPU backend computes with a transposed copy of an activation. As a matrix product the
    gradient is a plain transposed-operand matmul: about 15% less time for an MLP (benchmarks/README.md).
    """

    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        return super().__call__(token_matrix(inputs)).reshape(*inputs.shape[:-1], self.features)


dense = functools.partial(Dense, kernel_init=layers.dense_init)  # layers.dense


# --- depthwise 3x3 convolution -------------------------------------------------------------------------------------


def _shifted_sum(padded: jnp.ndarray, taps: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """sum over dy, dx of padded[:, dy:dy+H, dx:dx+W] * taps[dy, dx]: a 3x3 depthwise correlation."""
    out = None
    for dy in range(3):
        for dx in range(3):
            term = padded[:, dy : dy + height, dx : dx + width, :] * taps[dy, dx]
            out = term if out is None else out + term
    return out


def _pad1(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


@jax.custom_vjp
def depthwise_conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Depthwise 3x3 correlation, padding 1, stride 1: x (B, H, W, C), kernel (3, 3, C) -> (B, H, W, C)."""
    return _shifted_sum(_pad1(x), kernel, *x.shape[1:3])


def _depthwise_forward(x: jnp.ndarray, kernel: jnp.ndarray) -> tuple[jnp.ndarray, tuple]:
    return depthwise_conv3x3(x, kernel), (x, kernel)


def _depthwise_backward(residuals: tuple, grad: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    # Only x is kept for the backward pass (autodiff of the shifted sum would keep all nine shifted copies).
    x, kernel = residuals
    height, width = x.shape[1:3]
    grad_x = _shifted_sum(_pad1(grad), kernel[::-1, ::-1], height, width)  # correlation with the flipped kernel
    return grad_x, _kernel_gradient(x, grad).astype(kernel.dtype)


def _kernel_gradient(x: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
    """d loss / d kernel[dy, dx] = sum over b, h, w of x_padded[b, h + dy, w + dx] * grad[b, h, w], in float32.

    Shifting grad into the padded frame (rather than slicing x) keeps one padded copy of x for all nine taps.
    """
    padded = _pad1(x)

    def tap(dy: int, dx: int) -> jnp.ndarray:
        shifted = jnp.pad(grad, ((0, 0), (dy, 2 - dy), (dx, 2 - dx), (0, 0)))  # grad moved to (dy, dx) in the frame
        return jnp.sum(padded * shifted, axis=(0, 1, 2), dtype=jnp.float32)

    return jnp.stack([jnp.stack([tap(dy, dx) for dx in range(3)]) for dy in range(3)])


depthwise_conv3x3.defvjp(_depthwise_forward, _depthwise_backward)


class DepthwiseConv3x3(nn.Module):
    """layers.depthwise_conv3x3, nn.Conv(C, (3, 3), padding 1, feature_group_count=C) with the same parameters
    (`kernel` (3, 3, 1, C), `bias` (C,)), computed as nine shifted multiply-adds with the hand-written gradient
    above."""

    features: int
    dtype: Any = jnp.float32
    kernel_init: Any = layers.conv_init

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, self.features), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return depthwise_conv3x3(x.astype(self.dtype), kernel[:, :, 0]) + bias
