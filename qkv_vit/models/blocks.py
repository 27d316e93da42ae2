"""XCiT's residual blocks: the XCA block (XCA, LPI, MLP) and the class-attention block."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.models.attention import XCA, ClassAttention, dense
from qkv_vit.models.embedding import batch_norm, gelu
from qkv_vit.models.normalization import LayerNorm
from qkv_vit.models.qkv import QKVSpec

Dtype = Any

LAYER_NORM_EPSILON = 1e-6


def layer_norm(dtype: Dtype, name: str) -> LayerNorm:
    return LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def drop_path(rate: float, train: bool) -> nn.Dropout:
    """Stochastic depth: drops a residual branch for whole samples (mask broadcast over tokens, channels)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


def layer_scale(module: nn.Module, name: str, eta: float, x: jnp.ndarray) -> jnp.ndarray:
    """LayerScale: a learned per-channel scale of a residual branch (the reference's gamma), initialized to eta."""
    gamma = module.param(name, nn.initializers.constant(eta), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
    hidden_dim: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out_dim = x.shape[-1]
        x = gelu(dense(self.hidden_dim, self.dtype, name="fc1")(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = dense(out_dim, self.dtype, name="fc2")(x)
        return nn.Dropout(self.drop_rate, deterministic=not train)(x)


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
    """A depthwise 3x3 convolution, padding 1, stride 1, with bias: what nn.Conv(C, (3, 3),
    feature_group_count=C) computes, with the same parameters (`kernel` (3, 3, 1, C), `bias` (C,)).

    Written as nine shifted multiply-adds with a hand-written gradient, because XLA's CPU backend runs
    grouped convolutions slowly and computes their kernel gradient as a full C x C convolution (C times
    the work); benchmarks/README.md has the figures.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        kernel = self.param("kernel", kernel_init, (3, 3, 1, self.features), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return depthwise_conv3x3(x.astype(self.dtype), kernel[:, :, 0]) + bias


class LPI(nn.Module):
    """Local patch interaction: depthwise conv3x3, GELU, BatchNorm, depthwise conv3x3 on the token grid."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, height: int, width: int, train: bool) -> jnp.ndarray:
        batch, tokens, channels = x.shape
        x = x.reshape(batch, height, width, channels)
        x = gelu(DepthwiseConv3x3(channels, self.dtype, name="conv1")(x))
        x = batch_norm(train, self.dtype, name="bn")(x)
        x = DepthwiseConv3x3(channels, self.dtype, name="conv2")(x)
        return x.reshape(batch, tokens, channels)


class XCABlock(nn.Module):
    """x += gamma1 * XCA(norm1 x); x += gamma3 * LPI(norm3 x); x += gamma2 * MLP(norm2 x), each with drop path."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    eta: float = 1.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    qkv: QKVSpec = QKVSpec()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, height: int, width: int, train: bool) -> jnp.ndarray:
        attn = XCA(self.dim, self.num_heads, self.attn_drop_rate, self.proj_drop_rate, self.qkv, self.dtype, name="attn")
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.proj_drop_rate, self.dtype, name="mlp")
        lpi = LPI(self.dtype, name="local_mp")
        drop = drop_path(self.drop_path_rate, train)
        # The reference applies norm3/LPI before norm2/MLP (names kept for weight compatibility).
        x = x + drop(layer_scale(self, "gamma1", self.eta, attn(layer_norm(self.dtype, "norm1")(x), train)))
        x = x + drop(layer_scale(self, "gamma3", self.eta, lpi(layer_norm(self.dtype, "norm3")(x), height, width, train)))
        x = x + drop(layer_scale(self, "gamma2", self.eta, mlp(layer_norm(self.dtype, "norm2")(x), train)))
        return x


class ClassAttentionBlock(nn.Module):
    """CaiT class attention as in XCiT, with its quirks kept so outputs match the reference exactly.

    Patch tokens receive the normalized tokens through the first residual (x + gamma1 * norm1(x)) and are
    added to themselves by the second; with tokens_norm=False only the class token goes through norm2.
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    eta: float = 1.0
    tokens_norm: bool = False
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    qkv: QKVSpec | None = None  # None: the reference's separate q, k, v Dense layers
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        attn = ClassAttention(
            self.dim, self.num_heads, self.attn_drop_rate, self.proj_drop_rate, self.qkv, self.dtype, name="attn"
        )
        norm2 = layer_norm(self.dtype, "norm2")
        x_norm = layer_norm(self.dtype, "norm1")(x)
        x_attn = jnp.concatenate([attn(x_norm, train), x_norm[:, 1:]], axis=1)
        x = x + layer_scale(self, "gamma1", self.eta, x_attn)
        x = norm2(x) if self.tokens_norm else jnp.concatenate([norm2(x[:, :1]), x[:, 1:]], axis=1)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.proj_drop_rate, self.dtype, name="mlp")
        cls_token = layer_scale(self, "gamma2", self.eta, mlp(x[:, :1], train))
        return x + jnp.concatenate([cls_token, x[:, 1:]], axis=1)
