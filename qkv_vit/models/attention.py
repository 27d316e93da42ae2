"""XCiT's two attentions: cross-covariance attention (XCA) over channels, and class attention (CaiT)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.models.layers import Dtype, make_dense
from qkv_vit.models.qkv import NonlinearQKV, QKVSpec, qkv_embedding


def inverse_l2_norm(x: jnp.ndarray, axis: int, eps: float = 1e-12) -> jnp.ndarray:
    """1 / max(||x||, eps) along `axis` (kept), in float32: torch.nn.functional.normalize is x times this."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=axis, keepdims=True), eps * eps))


def split_heads(x: jnp.ndarray, num_heads: int) -> jnp.ndarray:
    """(B, N, C) -> (B, N, heads, C / heads)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def embed_queries_keys_values(
    spec: QKVSpec, dim: int, dtype: Dtype, layer_impl: str, x: jnp.ndarray
) -> tuple[jnp.ndarray, ...]:
    """q, k, v (B, N, dim) of tokens x from the block's embedding (a submodule named `qkv`)."""
    embedding = qkv_embedding(spec, dim, dtype, layer_impl)
    if isinstance(embedding, NonlinearQKV):
        return embedding.embed(x)
    qkv = embedding(x).reshape(*x.shape[:-1], 3, dim)  # the reference's (q, k, v) channel order
    # A split, not three indexings: its gradient is one concatenation, not three zero-padded copies summed.
    return tuple(jnp.squeeze(t, axis=-2) for t in jnp.split(qkv, 3, axis=-2))


class XCA(nn.Module):
    """Cross-covariance attention: a (C/h x C/h) attention map per head from L2-normalized q, k along tokens."""

    dim: int
    num_heads: int
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    qkv: QKVSpec = QKVSpec()
    dtype: Dtype = jnp.float32
    layer_impl: str = "flax"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        batch, tokens, _ = x.shape
        embedded = embed_queries_keys_values(self.qkv, self.dim, self.dtype, self.layer_impl, x)
        q, k, v = (split_heads(t, self.num_heads) for t in embedded)
        attn = self.attention_map(q, k, train)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn.astype(v.dtype), v).reshape(batch, tokens, self.dim)
        out = make_dense(self.layer_impl, self.dim, self.dtype, name="proj")(out)
        return nn.Dropout(self.proj_drop_rate, deterministic=not train)(out)

    def attention_map(self, q: jnp.ndarray, k: jnp.ndarray, train: bool) -> jnp.ndarray:
        """softmax(temperature * q_hat^T k_hat) per head, (B, heads, C/h, C/h), in float32 for stability.

        q_hat^T k_hat = diag(1/|q|) (q^T k) diag(1/|k|), norms along tokens: the normalization is applied to
        the small (C/h x C/h) product instead of to q and k, which saves two passes over (B, N, C) tensors.
        The gram is a sum over all tokens of products near +-1 after normalization: it runs at float32
        precision ("highest") on GPU/TPU too, where the default matmul precision is TF32 or bfloat16.
        """
        temperature = self.param("temperature", nn.initializers.ones, (self.num_heads, 1, 1), jnp.float32)
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        inverse_q_norm = jnp.transpose(inverse_l2_norm(q32, axis=1), (0, 2, 3, 1))  # (B, heads, C/h, 1)
        inverse_k_norm = jnp.transpose(inverse_l2_norm(k32, axis=1), (0, 2, 1, 3))  # (B, heads, 1, C/h)
        gram = jnp.einsum("bnhc,bnhd->bhcd", q32, k32, precision=jax.lax.Precision.HIGHEST)
        logits = gram * inverse_q_norm * inverse_k_norm * temperature
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
    layer_impl: str = "flax"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        head_dim = self.dim // self.num_heads
        q, k, v = (split_heads(t, self.num_heads) for t in self.queries_keys_values(x))
        logits = jnp.einsum("bqhc,bnhc->bhqn", q * head_dim**-0.5, k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attn_drop_rate, deterministic=not train)(attn)
        cls_token = jnp.einsum("bhqn,bnhc->bqhc", attn, v).reshape(x.shape[0], 1, self.dim)
        cls_token = make_dense(self.layer_impl, self.dim, self.dtype, name="proj")(cls_token)
        return nn.Dropout(self.proj_drop_rate, deterministic=not train)(cls_token)

    def queries_keys_values(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """The class token's query (B, 1, C) and every token's key and value (B, N, C)."""
        if self.qkv is None:
            return tuple(
                make_dense(self.layer_impl, self.dim, self.dtype, name=t)(x[:, :1] if t == "q" else x) for t in "qkv"
            )
        q, k, v = embed_queries_keys_values(self.qkv, self.dim, self.dtype, self.layer_impl, x)
        return q[:, :1], k, v
