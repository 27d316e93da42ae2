"""Query/key/value embeddings: XCiT's linear one and the three of Ahn et al. (arXiv 2111.10017).

Our reading of the abstracts (arXiv 2111.10017; Mathematics 11(8):1933, 2023; docs/models.md), with d the token
width, h the hidden width, m the code size:

  linear  [Q, K, V] = Dense(3d)(x)                                     (XCiT's baseline)
  sne     t = Dense_t2(act(Dense_t1(x)))             for t in q, k, v  (separate non-linear)
  psne    first layer shared:  t = Dense_t2(act(Dense1(x)))            (partially shared)
          second layer shared: t = Dense2(act(Dense_t1(x)))
  fsne    t = Dense2(act(Dense1([x ; c_t])))  c_t in R^m trainable     (fully shared, codes concatenated)
          t = Dense2(act(Dense1(x + c_t)))    c_t in R^d               (code_mode="add")

A separate layer's kernel has a leading axis of 3 (q, k, v order); q, k and v are computed by their own
2-d matmuls over the flattened tokens. F-SNE's first layer runs its d->h matmul once, since
Dense1([x ; c_t]) = x W1x + (c_t W1c + b1): the codes only add one bias per embedding.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.models.layers import Dtype, ModuleDef, dense, dense_init, tokens_as_they_are

QKV_EMBEDDINGS = ("linear", "sne", "psne", "fsne")
SHARED_LAYERS = ("first", "second")
CODE_MODES = ("concat", "add")
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": jax.nn.relu,
    "identity": lambda x: x,  # for ablations and for checking that each structure collapses to a linear map
}


@dataclasses.dataclass(frozen=True)
class QKVSpec:
    """How q, k and v are computed from the normalized tokens; one spec for every block that uses it."""

    qkv_embed: str = "linear"
    qkv_hidden_dim: int | None = None  # None: the token width d
    shared_layer: str = "first"  # psne only
    code_size: int = 8  # fsne with code_mode="concat"
    code_mode: str = "concat"
    code_init_std: float = 1.0
    qkv_activation: str = "relu"

    def __post_init__(self) -> None:
        choices = {
            "qkv_embed": QKV_EMBEDDINGS,
            "shared_layer": SHARED_LAYERS,
            "code_mode": CODE_MODES,
            "qkv_activation": tuple(ACTIVATIONS),
        }
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}: choose one of {valid}.")
        if self.qkv_hidden_dim is not None and self.qkv_hidden_dim <= 0:
            raise ValueError(f"qkv_hidden_dim must be positive, got {self.qkv_hidden_dim}.")
        if self.qkv_embed == "fsne" and self.code_mode == "concat" and self.code_size <= 0:
            raise ValueError(f"code_size must be positive for F-SNE, got {self.code_size}.")
        if self.code_init_std < 0:
            raise ValueError(f"code_init_std must be >= 0, got {self.code_init_std}.")

    def hidden(self, dim: int) -> int:
        return self.qkv_hidden_dim or dim

    def layers_shared(self) -> tuple[bool, bool]:
        """Whether the first and the second layer are shared by q, k and v."""
        if self.qkv_embed == "sne":
            return False, False
        if self.qkv_embed == "psne":
            return self.shared_layer == "first", self.shared_layer == "second"
        return True, True  # fsne

    def code_dim(self, dim: int) -> int:
        return self.code_size if self.code_mode == "concat" else dim


def qkv_embedding(
    spec: QKVSpec,
    dim: int,
    dtype: Dtype,
    dense_layer: ModuleDef = dense,
    token_layout: Callable[[jnp.ndarray], jnp.ndarray] = tokens_as_they_are,
    name: str = "qkv",
) -> nn.Module:
    """The module mapping tokens (B, N, d) to q, k, v; its output reshapes to (B, N, 3, d)."""
    if spec.qkv_embed == "linear":
        # One Dense(3d), named as in the reference so that PyTorch weights load unchanged.
        return dense_layer(3 * dim, dtype=dtype, name=name)
    return NonlinearQKV(spec, dim, dtype, token_layout, name=name)


def embed_queries_keys_values(
    spec: QKVSpec,
    dim: int,
    dtype: Dtype,
    dense_layer: ModuleDef,
    token_layout: Callable[[jnp.ndarray], jnp.ndarray],
    x: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """q, k, v, each (B, N, dim) in `dtype`, of tokens x (B, N, dim) from the calling block's embedding (a submodule
    named `qkv`)."""
    embedding = qkv_embedding(spec, dim, dtype, dense_layer, token_layout)
    if isinstance(embedding, NonlinearQKV):
        return embedding.embed(x)
    # The reference's channel order, (q, k, v) of C each, kept so that its qkv weights load unchanged.
    qkv = embedding(x).reshape(*x.shape[:-1], 3, dim)
    # A split, not three indexings: its gradient is one concatenation, not three zero-padded copies summed.
    return tuple(jnp.squeeze(t, axis=-2) for t in jnp.split(qkv, 3, axis=-2))


class NonlinearQKV(nn.Module):
    """SNE, P-SNE and F-SNE: two Dense layers with an activation between, each shared by q, k, v or not.

    Parameters: `hidden_kernel`/`hidden_bias` (d->h, or d+m->h for concatenated codes), `output_kernel`/
    `output_bias` (h->d), a leading axis of 3 where the layer is separate, and `codes` (3, m) for F-SNE, all
    float32; `dtype` computes. `embed(x)` returns q, k, v, each (..., d); calling the module returns them
    stacked, (..., 3, d).

    Each of q, k, v is its own matmul over the tokens as `token_layout` lays them out: as they are, or (with
    cpu_kernels.token_matrix) as one (tokens, d) matrix, which on a CPU avoids the transposed copies that batched
    3-d contractions cost (benchmarks/README.md).
    """

    spec: QKVSpec
    dim: int
    dtype: Dtype = jnp.float32
    token_layout: Callable[[jnp.ndarray], jnp.ndarray] = tokens_as_they_are

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.stack(self.embed(x), axis=-2)  # (..., 3, d)

    @nn.compact
    def embed(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        tokens = self.token_layout(x).astype(self.dtype)
        activation = ACTIVATIONS[self.spec.qkv_activation]
        hidden = [activation(h) for h in self.first_layer(tokens)]
        return tuple(out.reshape(*x.shape[:-1], self.dim) for out in self.second_layer(hidden))

    def first_layer(self, tokens: jnp.ndarray) -> list[jnp.ndarray]:
        """The hidden pre-activations of q, k and v, each (tokens, h)."""
        spec, dim, hidden = self.spec, self.dim, self.spec.hidden(self.dim)
        shared, _ = spec.layers_shared()
        if not shared:
            kernel = self.param("hidden_kernel", dense_init, (3, dim, hidden), jnp.float32).astype(self.dtype)
            bias = self.param("hidden_bias", nn.initializers.zeros, (3, hidden), jnp.float32).astype(self.dtype)
            return [tokens @ kernel[t] + bias[t] for t in range(3)]
        if spec.qkv_embed != "fsne":
            kernel = self.param("hidden_kernel", dense_init, (dim, hidden), jnp.float32)
            bias = self.param("hidden_bias", nn.initializers.zeros, (hidden,), jnp.float32)
            return [tokens @ kernel.astype(self.dtype) + bias.astype(self.dtype)] * 3
        return self.coded_first_layer(tokens)

    def coded_first_layer(self, tokens: jnp.ndarray) -> list[jnp.ndarray]:
        """F-SNE: x W1x once for all tokens, plus one per-embedding bias c_t W1c + b1."""
        spec, dim, hidden = self.spec, self.dim, self.spec.hidden(self.dim)
        code_dim = spec.code_dim(dim)
        codes = self.param("codes", nn.initializers.normal(stddev=spec.code_init_std), (3, code_dim), jnp.float32)
        concat = spec.code_mode == "concat"
        kernel = self.param("hidden_kernel", dense_init, (dim + code_dim if concat else dim, hidden), jnp.float32)
        bias = self.param("hidden_bias", nn.initializers.zeros, (hidden,), jnp.float32)
        token_kernel, code_kernel = (kernel[:dim], kernel[dim:]) if concat else (kernel, kernel)
        code_bias = (codes @ code_kernel + bias).astype(self.dtype)  # (3, h), in float32: the same for every token
        projected = tokens @ token_kernel.astype(self.dtype)  # (tokens, h): the one d->h matmul
        return [projected + code_bias[t] for t in range(3)]

    def second_layer(self, hidden_states: list[jnp.ndarray]) -> list[jnp.ndarray]:
        """q, k and v, each (tokens, d), from their hidden states."""
        dim, hidden = self.dim, self.spec.hidden(self.dim)
        _, shared = self.spec.layers_shared()
        if shared:
            kernel = self.param("output_kernel", dense_init, (hidden, dim), jnp.float32).astype(self.dtype)
            bias = self.param("output_bias", nn.initializers.zeros, (dim,), jnp.float32).astype(self.dtype)
            return [h @ kernel + bias for h in hidden_states]
        kernel = self.param("output_kernel", dense_init, (3, hidden, dim), jnp.float32).astype(self.dtype)
        bias = self.param("output_bias", nn.initializers.zeros, (3, dim), jnp.float32).astype(self.dtype)
        return [h @ kernel[t] + bias[t] for t, h in enumerate(hidden_states)]


def qkv_params_per_block(spec: QKVSpec, dim: int) -> int:
    """The papers' parameter formula (docs/models.md, "The QKV embeddings") for one block's q, k, v embedding."""
    d, h = dim, spec.hidden(dim)
    if spec.qkv_embed == "linear":
        return 3 * d * d + 3 * d
    if spec.qkv_embed == "sne":
        return 3 * (d * h + h + h * d + d)
    if spec.qkv_embed == "psne":
        return d * h + h + 3 * (h * d + d) if spec.shared_layer == "first" else 3 * (d * h + h) + h * d + d
    if spec.code_mode == "concat":
        m = spec.code_size
        return (d + m) * h + h + h * d + d + 3 * m
    return d * h + h + h * d + d + 3 * d


def qkv_macs_per_token(spec: QKVSpec, dim: int) -> int:
    """Multiply-accumulates per token of the embedding as computed here (F-SNE's d->h matmul runs once)."""
    d, h = dim, spec.hidden(dim)
    if spec.qkv_embed == "linear":
        return 3 * d * d
    shared_first, _ = spec.layers_shared()
    return (1 if shared_first else 3) * d * h + (3 * h * d)  # the second layer always maps 3 hidden states
