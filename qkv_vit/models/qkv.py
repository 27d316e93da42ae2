"""Query/key/value embeddings: XCiT's linear one and the three of Ahn et al. (arXiv 2111.10017).

Our reading of the abstracts (see PAPER.md), with d the token width, h the hidden width, m the code size:

  linear  [Q, K, V] = Dense(3d)(x)                                     (XCiT's baseline)
  sne     t = Dense_t2(act(Dense_t1(x)))             for t in q, k, v  (separate non-linear)
  psne    first layer shared:  t = Dense_t2(act(Dense1(x)))            (partially shared)
          second layer shared: t = Dense2(act(Dense_t1(x)))
  fsne    t = Dense2(act(Dense1([x ; c_t])))  c_t in R^m trainable     (fully shared, codes concatenated)
          t = Dense2(act(Dense1(x + c_t)))    c_t in R^d               (code_mode="add")

Every layer runs batched over q, k, v: a separate layer's kernel has a leading axis of 3 (q, k, v order),
and F-SNE's first layer runs its d->h matmul once, since Dense1([x ; c_t]) = x W1x + (c_t W1c + b1):
the codes only add one bias per embedding.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

QKV_EMBEDDINGS = ("linear", "sne", "psne", "fsne")
SHARED_LAYERS = ("first", "second")
CODE_MODES = ("concat", "add")
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": jax.nn.relu,
    "identity": lambda x: x,  # for ablations and for checking that each structure collapses to a linear map
}

kernel_init = nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class QKVSpec:
    """How q, k and v are computed from the normalized tokens; one spec for every block that uses it."""

    embed: str = "linear"
    hidden_dim: int | None = None  # None: the token width d
    shared_layer: str = "first"  # psne only
    code_size: int = 8  # fsne with code_mode="concat"
    code_mode: str = "concat"
    code_init_std: float = 1.0
    activation: str = "relu"

    def __post_init__(self) -> None:
        choices = {"embed": QKV_EMBEDDINGS, "shared_layer": SHARED_LAYERS, "code_mode": CODE_MODES,
                   "activation": tuple(ACTIVATIONS)}
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {qkv_option_name(field)} {getattr(self, field)!r}: choose one of {valid}.")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise ValueError(f"qkv_hidden_dim must be positive, got {self.hidden_dim}.")
        if self.embed == "fsne" and self.code_mode == "concat" and self.code_size <= 0:
            raise ValueError(f"code_size must be positive for F-SNE, got {self.code_size}.")
        if self.code_init_std < 0:
            raise ValueError(f"code_init_std must be >= 0, got {self.code_init_std}.")

    def hidden(self, dim: int) -> int:
        return self.hidden_dim or dim

    def layers_shared(self) -> tuple[bool, bool]:
        """Whether the first and the second layer are shared by q, k and v."""
        if self.embed == "sne":
            return False, False
        if self.embed == "psne":
            return self.shared_layer == "first", self.shared_layer == "second"
        return True, True  # fsne

    def code_dim(self, dim: int) -> int:
        return self.code_size if self.code_mode == "concat" else dim


def qkv_option_name(field: str) -> str:
    """The XCiT / create() argument a QKVSpec field comes from."""
    return {"embed": "qkv_embed", "hidden_dim": "qkv_hidden_dim", "activation": "qkv_activation"}.get(field, field)


def qkv_embedding(spec: QKVSpec, dim: int, dtype: Dtype, name: str = "qkv") -> nn.Module:
    """The module mapping tokens (B, N, d) to q, k, v; its output reshapes to (B, N, 3, d)."""
    if spec.embed == "linear":
        # One Dense(3d), named as in the reference so that PyTorch weights load unchanged.
        return nn.Dense(3 * dim, dtype=dtype, kernel_init=kernel_init, name=name)
    return NonlinearQKV(spec, dim, dtype, name=name)


class NonlinearQKV(nn.Module):
    """SNE, P-SNE and F-SNE: two Dense layers with an activation between, each shared by q, k, v or not.

    Parameters: `hidden_kernel`/`hidden_bias` (d->h, or d+m->h for concatenated codes), `output_kernel`/
    `output_bias` (h->d), a leading axis of 3 where the layer is separate, and `codes` (3, m) for F-SNE.
    """

    spec: QKVSpec
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        hidden = ACTIVATIONS[self.spec.activation](self.first_layer(x))
        return self.second_layer(hidden)  # (B, N, 3, d)

    def first_layer(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, N, h) when shared without codes, else (B, N, 3, h)."""
        spec, dim, hidden = self.spec, self.dim, self.spec.hidden(self.dim)
        shared, _ = spec.layers_shared()
        if not shared:
            kernel = self.param("hidden_kernel", kernel_init, (3, dim, hidden), jnp.float32)
            bias = self.param("hidden_bias", nn.initializers.zeros, (3, hidden), jnp.float32)
            return jnp.einsum("bnd,tdh->bnth", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        if spec.embed != "fsne":
            kernel = self.param("hidden_kernel", kernel_init, (dim, hidden), jnp.float32)
            bias = self.param("hidden_bias", nn.initializers.zeros, (hidden,), jnp.float32)
            return x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        return self.coded_first_layer(x)

    def coded_first_layer(self, x: jnp.ndarray) -> jnp.ndarray:
        """F-SNE: x W1x once for all tokens, plus one per-embedding bias c_t W1c + b1 (B, N, 3, h)."""
        spec, dim, hidden = self.spec, self.dim, self.spec.hidden(self.dim)
        code_dim = spec.code_dim(dim)
        codes = self.param("codes", nn.initializers.normal(stddev=spec.code_init_std), (3, code_dim), jnp.float32)
        concat = spec.code_mode == "concat"
        kernel = self.param("hidden_kernel", kernel_init, (dim + code_dim if concat else dim, hidden), jnp.float32)
        bias = self.param("hidden_bias", nn.initializers.zeros, (hidden,), jnp.float32)
        token_kernel, code_kernel = (kernel[:dim], kernel[dim:]) if concat else (kernel, kernel)
        code_bias = codes @ code_kernel + bias  # (3, h), in float32: the same for every token
        tokens = x @ token_kernel.astype(self.dtype)  # (B, N, h): the one d->h matmul
        return tokens[:, :, None, :] + code_bias.astype(self.dtype)

    def second_layer(self, hidden_states: jnp.ndarray) -> jnp.ndarray:
        dim, hidden = self.dim, self.spec.hidden(self.dim)
        _, shared = self.spec.layers_shared()
        if shared:
            kernel = self.param("output_kernel", kernel_init, (hidden, dim), jnp.float32)
            bias = self.param("output_bias", nn.initializers.zeros, (dim,), jnp.float32)
            return hidden_states @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        kernel = self.param("output_kernel", kernel_init, (3, hidden, dim), jnp.float32)
        bias = self.param("output_bias", nn.initializers.zeros, (3, dim), jnp.float32)
        pattern = "bnh,thd->bntd" if hidden_states.ndim == 3 else "bnth,thd->bntd"
        return jnp.einsum(pattern, hidden_states, kernel.astype(self.dtype)) + bias.astype(self.dtype)


def qkv_params_per_block(spec: QKVSpec, dim: int) -> int:
    """PAPER.md's parameter formula for one block's q, k, v embedding."""
    d, h = dim, spec.hidden(dim)
    if spec.embed == "linear":
        return 3 * d * d + 3 * d
    if spec.embed == "sne":
        return 3 * (d * h + h + h * d + d)
    if spec.embed == "psne":
        return d * h + h + 3 * (h * d + d) if spec.shared_layer == "first" else 3 * (d * h + h) + h * d + d
    if spec.code_mode == "concat":
        m = spec.code_size
        return (d + m) * h + h + h * d + d + 3 * m
    return d * h + h + h * d + d + 3 * d


def qkv_macs_per_token(spec: QKVSpec, dim: int) -> int:
    """Multiply-accumulates per token of the embedding as computed here (F-SNE's d->h matmul runs once)."""
    d, h = dim, spec.hidden(dim)
    if spec.embed == "linear":
        return 3 * d * d
    shared_first, _ = spec.layers_shared()
    return (1 if shared_first else 3) * d * h + (3 * h * d)  # the second layer always maps 3 hidden states
