"""XCiT's residual blocks: the XCA block (XCA, LPI, MLP) and the class-attention block."""

import flax.linen as nn
import jax.numpy as jnp

from qkv_vit.models.attention import XCA, ClassAttention
from qkv_vit.models.layers import Dtype, gelu, make_batch_norm, make_dense, make_depthwise_conv3x3, make_layer_norm
from qkv_vit.models.qkv import QKVSpec


def drop_path(rate: float, train: bool) -> nn.Dropout:
    """Stochastic depth: drops a residual branch for whole samples (mask broadcast over tokens, channels)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2), deterministic=not train)


def layer_scale(module: nn.Module, name: str, eta: float, x: jnp.ndarray) -> jnp.ndarray:
    """LayerScale: a learned per-channel scale of a residual branch (the reference's gamma), initialized to eta.

    In float32 whatever the compute dtype, as the residual stream it is added to: at eta = 1e-5 (the 24-block
    models) the first updates of gamma are below bfloat16's resolution and would be rounded away.
    """
    gamma = module.param(name, nn.initializers.constant(eta), (x.shape[-1],), jnp.float32)
    return x.astype(jnp.float32) * gamma


class Mlp(nn.Module):
    hidden_dim: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    layer_impl: str = "flax"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out_dim = x.shape[-1]
        x = gelu(make_dense(self.layer_impl, self.hidden_dim, self.dtype, name="fc1")(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = make_dense(self.layer_impl, out_dim, self.dtype, name="fc2")(x)
        return nn.Dropout(self.drop_rate, deterministic=not train)(x)


class LPI(nn.Module):
    """Local patch interaction: depthwise conv3x3, GELU, BatchNorm, depthwise conv3x3 on the token grid."""

    dtype: Dtype = jnp.float32
    layer_impl: str = "flax"
    batch_norm_group_size: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, height: int, width: int, train: bool) -> jnp.ndarray:
        batch, tokens, channels = x.shape
        x = x.reshape(batch, height, width, channels).astype(self.dtype)
        x = gelu(make_depthwise_conv3x3(self.layer_impl, channels, self.dtype, name="conv1")(x))
        x = make_batch_norm(train, self.dtype, "bn", self.layer_impl, self.batch_norm_group_size)(x)
        x = make_depthwise_conv3x3(self.layer_impl, channels, self.dtype, name="conv2")(x)
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
    layer_impl: str = "flax"
    batch_norm_group_size: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, height: int, width: int, train: bool) -> jnp.ndarray:
        impl = self.layer_impl
        attn = XCA(
            self.dim, self.num_heads, self.attn_drop_rate, self.proj_drop_rate, self.qkv, self.dtype, impl, name="attn"
        )
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.proj_drop_rate, self.dtype, impl, name="mlp")
        lpi = LPI(self.dtype, impl, self.batch_norm_group_size, name="local_mp")
        drop = drop_path(self.drop_path_rate, train)
        # The reference applies norm3/LPI before norm2/MLP (names kept for weight compatibility).
        x = x + drop(layer_scale(self, "gamma1", self.eta, attn(make_layer_norm(impl, "norm1")(x), train)))
        x = x + drop(
            layer_scale(self, "gamma3", self.eta, lpi(make_layer_norm(impl, "norm3")(x), height, width, train))
        )
        x = x + drop(layer_scale(self, "gamma2", self.eta, mlp(make_layer_norm(impl, "norm2")(x), train)))
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
    layer_impl: str = "flax"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        impl = self.layer_impl
        attn = ClassAttention(
            self.dim, self.num_heads, self.attn_drop_rate, self.proj_drop_rate, self.qkv, self.dtype, impl, name="attn"
        )
        norm2 = make_layer_norm(impl, "norm2")
        x_norm = make_layer_norm(impl, "norm1")(x)
        x_attn = jnp.concatenate([attn(x_norm, train).astype(x_norm.dtype), x_norm[:, 1:]], axis=1)
        x = x + layer_scale(self, "gamma1", self.eta, x_attn)
        x = norm2(x) if self.tokens_norm else jnp.concatenate([norm2(x[:, :1]), x[:, 1:]], axis=1)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.proj_drop_rate, self.dtype, impl, name="mlp")
        cls_token = layer_scale(self, "gamma2", self.eta, mlp(x[:, :1], train))
        return x + jnp.concatenate([cls_token, x[:, 1:]], axis=1)
