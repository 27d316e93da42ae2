"""XCiT's two attentions: cross-covariance attention (XCA) over channels, and class attention (CaiT)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.models.qkv import QKVSpec, kernel_init, qkv_embedding

Dtype = Any


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    """timm's Linear init: truncated normal, std 0.02, zero bias."""
    return nn.Dense(features, dtype=dtype, kernel_init=kernel_init, name=name)


def l2_normalize(x: jnp.ndarray, axis: int, eps: float = 1e-12) -> jnp.ndarray:
    """torch.nn.functional.normalize: x / max(||x||, eps), computed in float32."""
    x32 = x.astype(jnp.float32)
    squared_norm = jnp.sum(x32 * x32, axis=axis, keepdims=True)
    return x32 * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def split_heads(x: jnp.ndarray, num_heads: int) -> jnp.ndarray:
    """(B, N, C) -> (B, N, heads, C / heads)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


class XCA(nn.Module):
    """Cross-covariance attention: a (C/h x C/h) attention map per head from L2-normalized q, k along tokens."""

    dim: int
    num_heads: int
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    qkv: QKVSpec = QKVSpec()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        batch, tokens, _ = x.shape
        qkv = qkv_embedding(self.qkv, self.dim, self.dtype)(x)
        # The reference reshapes qkv to (B, N, 3, heads, C/heads): keep that channel order.
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = self.attention_map(q, k, train)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn.astype(v.dtype), v).reshape(batch, tokens, self.dim)
        out = dense(self.dim, self.dtype, name="proj")(out)
        return nn.Dropout(self.proj_drop_rate, deterministic=not train)(out)

    def attention_map(self, q: jnp.ndarray, k: jnp.ndarray, train: bool) -> jnp.ndarray:
        """softmax(temperature * q_hat^T k_hat) per head, (B, heads, C/h, C/h), in float32 for stability."""
        temperature = self.param("temperature", nn.initializers.ones, (self.num_heads, 1, 1), jnp.float32)
        q, k = l2_normalize(q, axis=1), l2_normalize(k, axis=1)  # along the token axis
        logits = jnp.einsum("bnhc,bnhd->bhcd", q, k) * temperature
        attn = jax.nn.softmax(logits, axis=-1)
        return nn.Dropout(self.attn_drop_rate, deterministic=not train)(attn)


class ClassAttention(nn.Module):
    """Attention of the class token (query) over all tokens (keys, values); returns the new class token.

    With `qkv` unset, q, k and v are the reference's three Dense layers; with a QKVSpec, that embedding.
    """

    dim: int
    num_heads: int
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    qkv: QKVSpec | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        head_dim = self.dim // self.num_heads
        q, k, v = (split_heads(t, self.num_heads) for t in self.queries_keys_values(x))
        logits = jnp.einsum("bqhc,bnhc->bhqn", q * head_dim**-0.5, k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attn_drop_rate, deterministic=not train)(attn)
        cls_token = jnp.einsum("bhqn,bnhc->bqhc", attn, v).reshape(x.shape[0], 1, self.dim)
        cls_token = dense(self.dim, self.dtype, name="proj")(cls_token)
        return nn.Dropout(self.proj_drop_rate, deterministic=not train)(cls_token)

    def queries_keys_values(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """The class token's query (B, 1, C) and every token's key and value (B, N, C)."""
        if self.qkv is None:
            return tuple(dense(self.dim, self.dtype, name=t)(x[:, :1] if t == "q" else x) for t in "qkv")
        qkv = qkv_embedding(self.qkv, self.dim, self.dtype)(x).reshape(*x.shape[:2], 3, self.dim)
        return qkv[:, :1, 0], qkv[:, :, 1], qkv[:, :, 2]
