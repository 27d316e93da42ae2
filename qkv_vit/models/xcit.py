"""XCiT: Cross-Covariance Image Transformer (El-Nouby et al., 2021), as facebookresearch/xcit and timm compute it.

The modules in timm's order (timm/models/xcit.py): PositionalEncodingFourier, ConvPatchEmbed, LPI, ClassAttention
(timm's ClassAttn, from cait.py) and ClassAttentionBlock, XCA and XCABlock, XCiT. Parameter names are the
reference's, so that its weights load (qkv_vit/convert). Images are NHWC. Variables hold `params` and
`batch_stats` (patch-embedding and LPI BatchNorm). The query/key/value embeddings are in models/qkv.py; the
layers (and their CPU versions, which models/registry.py chooses by `layer_impl`) in models/layers.py and
models/cpu_kernels.py.
"""

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qkv_vit.models import layers
from qkv_vit.models.layers import Dtype, Mlp, ModuleDef, conv_init, drop_path, gelu
from qkv_vit.models.qkv import QKVSpec, embed_queries_keys_values

TokenLayout = Callable[[jnp.ndarray], jnp.ndarray]

STAGE_WIDTH_DIVISORS = {16: (8, 4, 2, 1), 8: (4, 2, 1)}
GLOBAL_POOLS = ("token", "avg")


def fourier_features(height: int, width: int, hidden_dim: int = 32, temperature: float = 10000.0) -> np.ndarray:
    """The sinusoidal (y, x) features of the reference PositionalEncodingFourier, float32 (H, W, 2 * hidden_dim).

    Computed in float32 numpy from the static grid size, so any grid works and nothing runs per step.
    """
    eps, scale = 1e-6, 2 * math.pi
    y = np.arange(1, height + 1, dtype=np.float32)[:, None].repeat(width, axis=1)
    x = np.arange(1, width + 1, dtype=np.float32)[None, :].repeat(height, axis=0)
    y = y / (np.float32(height) + eps) * scale
    x = x / (np.float32(width) + eps) * scale
    dim_t = np.arange(hidden_dim, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / hidden_dim)

    def interleave(position: np.ndarray) -> np.ndarray:
        angles = position[..., None] / dim_t
        # sin of even channels and cos of odd channels, interleaved: s0 c1 s2 c3 ...
        return np.stack([np.sin(angles[..., 0::2]), np.cos(angles[..., 1::2])], axis=-1).reshape(
            height, width, hidden_dim
        )

    return np.concatenate([interleave(y), interleave(x)], axis=-1).astype(np.float32)


class PositionalEncodingFourier(nn.Module):
    """Fourier features of the patch grid projected to the token width: `apply(variables, H, W)` returns
    (H * W, embed_dim) in `dtype`."""

    embed_dim: int
    hidden_dim: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, height: int, width: int) -> jnp.ndarray:
        features = jnp.asarray(fourier_features(height, width, self.hidden_dim))
        # The reference's 1x1 Conv2d, as a Dense: the same function, and its name and init for its weights.
        projection = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=conv_init, name="token_projection")
        return projection(features).reshape(height * width, self.embed_dim)


class ConvPatchEmbed(nn.Module):
    """Stride-2 conv3x3 + BatchNorm stages with GELU between them, 4 stages for patch 16, 3 for patch 8:
    images (B, H, W, 3) -> a token grid (B, H / patch, W / patch, embed_dim) in `dtype`."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    batch_norm_layer: ModuleDef = layers.BatchNorm
    batch_norm_group_size: int | None = None

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = images.astype(self.dtype)
        for stage, divisor in enumerate(STAGE_WIDTH_DIVISORS[self.patch_size]):
            if stage:
                x = gelu(x)
            x = nn.Conv(
                self.embed_dim // divisor,
                kernel_size=(3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),  # torch padding=1; 'SAME' would pad (0, 1) at stride 2
                use_bias=False,
                dtype=self.dtype,
                kernel_init=conv_init,
                name=f"conv_{stage}",
            )(x)
            x = batch_norm(self, train, f"bn_{stage}")(x)
        return x


def batch_norm(module: "ConvPatchEmbed | LPI", train: bool, name: str) -> nn.Module:
    """The module's BatchNorm layer, with its compute dtype and ghost-batch group size."""
    return module.batch_norm_layer(
        use_running_average=not train, dtype=module.dtype, group_size=module.batch_norm_group_size, name=name
    )


class LPI(nn.Module):
    """Local patch interaction on tokens (B, N, C) of an H x W grid: depthwise conv3x3, GELU, BatchNorm, depthwise
    conv3x3. Returns (B, N, C) in `dtype`."""

    dtype: Dtype = jnp.float32
    depthwise_conv_layer: ModuleDef = layers.depthwise_conv3x3
    batch_norm_layer: ModuleDef = layers.BatchNorm
    batch_norm_group_size: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, height: int, width: int, train: bool) -> jnp.ndarray:
        batch, tokens, channels = x.shape
        x = x.reshape(batch, height, width, channels).astype(self.dtype)
        x = gelu(self.depthwise_conv_layer(channels, dtype=self.dtype, name="conv1")(x))
        x = batch_norm(self, train, "bn")(x)
        x = self.depthwise_conv_layer(channels, dtype=self.dtype, name="conv2")(x)
        return x.reshape(batch, tokens, channels)


def split_heads(x: jnp.ndarray, num_heads: int) -> jnp.ndarray:
    """(B, N, C) -> (B, N, heads, C / heads)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def layer_scale(module: nn.Module, name: str, eta: float, x: jnp.ndarray) -> jnp.ndarray:
    """LayerScale: a learned per-channel scale of a residual branch (the reference's gamma), initialized to eta.

    In float32 whatever the compute dtype, as the residual stream it is added to: at eta = 1e-5 (the 24-block
    models) the first updates of gamma are below bfloat16's resolution and would be rounded away.
    """
    gamma = module.param(name, nn.initializers.constant(eta), (x.shape[-1],), jnp.float32)
    return x.astype(jnp.float32) * gamma


class Attention(nn.Module):
    """The fields XCA and ClassAttention share, which their blocks pass on (block_attention)."""

    dim: int
    num_heads: int
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    qkv: QKVSpec | None = None
    dtype: Dtype = jnp.float32
    dense_layer: ModuleDef = layers.dense
    token_layout: TokenLayout = layers.tokens_as_they_are


def block_attention(block: "ClassAttentionBlock | XCABlock", kind: type[Attention]) -> Attention:
    """The block's attention of a kind, XCA or ClassAttention, with the block's options, as its submodule `attn`."""
    names = [field.name for field in dataclasses.fields(Attention) if field.name not in ("parent", "name")]
    return kind(**{name: getattr(block, name) for name in names}, name="attn")


class ClassAttention(Attention):
    """Attention of the class token (query) over all tokens (keys, values), CaiT's ClassAttn: tokens (B, N, C),
    class token first -> the new class token (B, 1, C) in `dtype`.

    With `qkv` unset, q, k and v are the reference's three Dense layers; with a QKVSpec, that embedding.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        head_dim = self.dim // self.num_heads
        q, k, v = (split_heads(t, self.num_heads) for t in self.queries_keys_values(x))
        logits = jnp.einsum("bqhc,bnhc->bhqn", q * head_dim**-0.5, k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        self.sow("intermediates", "attention", attn)  # (B, heads, 1, N): kept only when captured (intermediates.py)
        attn = nn.Dropout(self.attn_drop_rate, deterministic=not train)(attn.astype(v.dtype))
        cls_token = jnp.einsum("bhqn,bnhc->bqhc", attn, v).reshape(x.shape[0], 1, self.dim)
        cls_token = self.dense_layer(self.dim, dtype=self.dtype, name="proj")(cls_token)
        return nn.Dropout(self.proj_drop_rate, deterministic=not train)(cls_token)

    def queries_keys_values(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """The class token's query (B, 1, C) and every token's key and value (B, N, C)."""
        if self.qkv is None:
            return tuple(
                self.dense_layer(self.dim, dtype=self.dtype, name=t)(x[:, :1] if t == "q" else x) for t in "qkv"
            )
        q, k, v = embed_queries_keys_values(self.qkv, self.dim, self.dtype, self.dense_layer, self.token_layout, x)
        return q[:, :1], k, v


class ClassAttentionBlock(nn.Module):
    """CaiT class attention as XCiT has it: tokens (B, 1 + N, C), class token first, float32 -> the same shape,
    float32. The reference's quirks are kept (commented where they happen) so that outputs match it exactly."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    eta: float = 1.0
    tokens_norm: bool = False
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    qkv: QKVSpec | None = None  # None: the reference's separate q, k, v Dense layers
    dtype: Dtype = jnp.float32
    dense_layer: ModuleDef = layers.dense
    norm_layer: ModuleDef = layers.layer_norm
    token_layout: TokenLayout = layers.tokens_as_they_are

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        attn = block_attention(self, ClassAttention)
        norm2 = self.norm_layer(name="norm2")
        x_norm = self.norm_layer(name="norm1")(x)
        # The reference's quirk: the patch tokens get the *normalized* tokens through the first residual
        # (x + gamma1 * norm1(x)), not only the class token its attention.
        x_attn = jnp.concatenate([attn(x_norm, train).astype(x_norm.dtype), x_norm[:, 1:]], axis=1)
        x = x + layer_scale(self, "gamma1", self.eta, x_attn)
        # Its tokens_norm=False (XCiT-N12) normalizes only the class token with norm2.
        x = norm2(x) if self.tokens_norm else jnp.concatenate([norm2(x[:, :1]), x[:, 1:]], axis=1)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.proj_drop_rate, self.dtype, self.dense_layer, name="mlp")
        cls_token = layer_scale(self, "gamma2", self.eta, mlp(x[:, :1], train))
        # And the second residual adds the patch tokens to themselves.
        return x + jnp.concatenate([cls_token, x[:, 1:]], axis=1)


def inverse_l2_norm(x: jnp.ndarray, axis: int, eps: float = 1e-12) -> jnp.ndarray:
    """1 / max(||x||, eps) along `axis` (kept), in float32: torch.nn.functional.normalize is x times this."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=axis, keepdims=True), eps * eps))


class XCA(Attention):
    """Cross-covariance attention: a (C/h x C/h) attention map per head from L2-normalized q, k along tokens.
    Tokens (B, N, C) -> (B, N, C) in `dtype`."""

    qkv: QKVSpec = QKVSpec()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        batch, tokens, _ = x.shape
        embedded = embed_queries_keys_values(self.qkv, self.dim, self.dtype, self.dense_layer, self.token_layout, x)
        q, k, v = (split_heads(t, self.num_heads) for t in embedded)
        attn = self.attention_map(q, k, train)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn.astype(v.dtype), v).reshape(batch, tokens, self.dim)
        out = self.dense_layer(self.dim, dtype=self.dtype, name="proj")(out)
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
        self.sow("intermediates", "attention", attn)  # (B, heads, C/h, C/h): kept only when captured
        return nn.Dropout(self.attn_drop_rate, deterministic=not train)(attn)


class XCABlock(nn.Module):
    """x += gamma1 * XCA(norm1 x); x += gamma3 * LPI(norm3 x); x += gamma2 * MLP(norm2 x), each with drop path.
    Tokens (B, N, C) of an H x W grid, float32 -> the same shape, float32 (the residual stream)."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    eta: float = 1.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    qkv: QKVSpec = QKVSpec()
    dtype: Dtype = jnp.float32
    dense_layer: ModuleDef = layers.dense
    norm_layer: ModuleDef = layers.layer_norm
    depthwise_conv_layer: ModuleDef = layers.depthwise_conv3x3
    batch_norm_layer: ModuleDef = layers.BatchNorm
    token_layout: TokenLayout = layers.tokens_as_they_are
    batch_norm_group_size: int | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, height: int, width: int, train: bool) -> jnp.ndarray:
        attn = block_attention(self, XCA)
        mlp = Mlp(int(self.dim * self.mlp_ratio), self.proj_drop_rate, self.dtype, self.dense_layer, name="mlp")
        lpi = LPI(
            self.dtype, self.depthwise_conv_layer, self.batch_norm_layer, self.batch_norm_group_size, name="local_mp"
        )
        drop = drop_path(self.drop_path_rate, train)
        x = x + drop(layer_scale(self, "gamma1", self.eta, attn(self.norm_layer(name="norm1")(x), train)))
        # The reference applies norm3/LPI (gamma3) before norm2/MLP (gamma2): the names are kept for its weights.
        lpi_out = lpi(self.norm_layer(name="norm3")(x), height, width, train)
        x = x + drop(layer_scale(self, "gamma3", self.eta, lpi_out))
        return x + drop(layer_scale(self, "gamma2", self.eta, mlp(self.norm_layer(name="norm2")(x), train)))


class XCiT(nn.Module):
    """The XCiT classifier (timm's Xcit). `apply(variables, images, train=False)`: float NHWC images (B, H, W, 3),
    H and W multiples of patch_size -> float32 logits (B, num_classes).

    With num_classes=0 there is no head and the call returns the pooled features (B, embed_dim), float32.
    `dtype` is the compute dtype of matmuls and convolutions (e.g. jnp.bfloat16); parameters, the residual
    stream, LayerNorm, LayerScale, XCA's gram and softmax (then cast for the product with v) and the logits stay
    float32, as under PyTorch's autocast.
    The `qkv_*`, `shared_layer` and `code_*` fields choose the query/key/value embedding (models/qkv.py).
    The `*_layer` fields and `token_layout` are the layers it is built from, as in flax's examples and timm:
    flax's standard layers by default (models/layers.py); registry.create chooses them by `layer_impl`
    (registry.layer_fields), the same parameters either way. `batch_norm_group_size` G normalizes BatchNorm over
    groups of G images.
    """

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    cls_attn_layers: int = 2
    eta: float = 1.0
    tokens_norm: bool = False
    num_classes: int = 1000
    global_pool: str = "token"
    use_pos_embed: bool = True
    drop_rate: float = 0.0  # after the head's input, and in class-attention projections and MLPs
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0  # XCA block projections and MLPs
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # one constant rate for every XCA block, none in class attention
    qkv_embed: str = "linear"  # "linear" (XCiT), "sne", "psne", "fsne"
    qkv_hidden_dim: int | None = None  # h; None: embed_dim
    shared_layer: str = "first"  # psne: "first" or "second"
    code_size: int = 8  # fsne, code_mode="concat": m
    code_mode: str = "concat"  # fsne: "concat" ([x ; c_t]) or "add" (x + c_t)
    code_init_std: float = 1.0
    qkv_activation: str = "relu"
    qkv_in_class_attention: bool = False
    dtype: Dtype = jnp.float32
    dense_layer: ModuleDef = layers.dense
    norm_layer: ModuleDef = layers.layer_norm
    depthwise_conv_layer: ModuleDef = layers.depthwise_conv3x3  # LPI's
    batch_norm_layer: ModuleDef = layers.BatchNorm
    token_layout: TokenLayout = layers.tokens_as_they_are  # of the non-linear QKV embeddings' matmuls
    batch_norm_group_size: int | None = None  # None: statistics over the whole (global) batch

    def __post_init__(self) -> None:
        validate_architecture(self)
        _ = self.qkv_spec  # building it validates the embedding options now, not at the first call
        super().__post_init__()

    @property
    def qkv_spec(self) -> QKVSpec:
        """The embedding options, which QKVSpec names as XCiT does."""
        return QKVSpec(**{field.name: getattr(self, field.name) for field in dataclasses.fields(QKVSpec)})

    def setup(self) -> None:
        self.patch_embed = ConvPatchEmbed(
            self.patch_size, self.embed_dim, self.dtype, self.batch_norm_layer, self.batch_norm_group_size
        )
        if self.use_pos_embed:
            self.pos_embed = PositionalEncodingFourier(self.embed_dim, dtype=self.dtype)
        self.cls_token = self.param(
            "cls_token", nn.initializers.truncated_normal(stddev=0.02), (1, 1, self.embed_dim), jnp.float32
        )
        self.blocks = [
            XCABlock(
                self.embed_dim,
                self.num_heads,
                self.mlp_ratio,
                self.eta,
                proj_drop_rate=self.proj_drop_rate,
                attn_drop_rate=self.attn_drop_rate,
                drop_path_rate=self.drop_path_rate,
                qkv=self.qkv_spec,
                dtype=self.dtype,
                dense_layer=self.dense_layer,
                norm_layer=self.norm_layer,
                depthwise_conv_layer=self.depthwise_conv_layer,
                batch_norm_layer=self.batch_norm_layer,
                token_layout=self.token_layout,
                batch_norm_group_size=self.batch_norm_group_size,
            )
            for _ in range(self.depth)
        ]
        self.cls_attn_blocks = [
            ClassAttentionBlock(
                self.embed_dim,
                self.num_heads,
                self.mlp_ratio,
                self.eta,
                self.tokens_norm,
                proj_drop_rate=self.drop_rate,
                attn_drop_rate=self.attn_drop_rate,
                qkv=self.qkv_spec if self.qkv_in_class_attention else None,
                dtype=self.dtype,
                dense_layer=self.dense_layer,
                norm_layer=self.norm_layer,
                token_layout=self.token_layout,
            )
            for _ in range(self.cls_attn_layers)
        ]
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        self.norm = self.norm_layer(name="norm")
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes > 0:
            self.head = self.dense_layer(self.num_classes, dtype=self.dtype, name="head")

    def patch_tokens(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Patch tokens after the XCA blocks, as a grid (B, H / patch, W / patch, embed_dim), before the norm."""
        check_image_shape(images, self.patch_size)
        grid = self.patch_embed(images, train)
        batch, height, width, _ = grid.shape
        x = grid.reshape(batch, height * width, self.embed_dim).astype(jnp.float32)  # the residual stream
        if self.use_pos_embed:
            x = x + self.pos_embed(height, width).astype(jnp.float32)
        x = self.pos_drop(x, deterministic=not train)
        for block in self.blocks:
            x = block(x, height, width, train)
            self.sow("intermediates", "blocks", x)  # each block's output (B, N, C): kept only when captured
        return x.reshape(batch, height, width, self.embed_dim)

    def forward_features(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """All tokens after class attention and the final norm: (B, 1 + N, embed_dim), class token first."""
        grid = self.patch_tokens(images, train)
        x = grid.reshape(grid.shape[0], -1, self.embed_dim)
        cls_token = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls_token, x], axis=1)
        for block in self.cls_attn_blocks:
            x = block(x, train)
        return self.norm(x)

    def pre_logits(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """The features the head sees (B, embed_dim): the class token, or the mean patch token for 'avg'."""
        x = self.forward_features(images, train)
        return x[:, 1:].mean(axis=1) if self.global_pool == "avg" else x[:, 0]

    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = self.pre_logits(images, train)
        # Kept only where the caller makes "intermediates" mutable (models/intermediates.py): free otherwise.
        self.sow("intermediates", "pre_logits", x)
        if self.num_classes <= 0:
            return x
        x = self.head_drop(x, deterministic=not train)
        return self.head(x).astype(jnp.float32)


def validate_architecture(model: XCiT) -> None:
    """Raise a ValueError naming the bad field before anything is traced or compiled."""
    if model.patch_size not in STAGE_WIDTH_DIVISORS:
        raise ValueError(
            f"XCiT patch_size must be 16 or 8 (the convolutional patch embedding's stages), got {model.patch_size}."
        )
    smallest_divisor = STAGE_WIDTH_DIVISORS[model.patch_size][0]
    if model.embed_dim <= 0 or model.embed_dim % smallest_divisor:
        raise ValueError(
            f"embed_dim must be a positive multiple of {smallest_divisor} for patch {model.patch_size} "
            f"(the patch-embedding stages are embed_dim/{smallest_divisor} wide), got {model.embed_dim}."
        )
    if model.num_heads <= 0 or model.embed_dim % model.num_heads:
        raise ValueError(
            f"num_heads must divide embed_dim: {model.embed_dim} is not divisible by {model.num_heads} heads."
        )
    if model.depth < 0 or model.cls_attn_layers < 0:
        raise ValueError(f"depth and cls_attn_layers must be >= 0, got {model.depth} and {model.cls_attn_layers}.")
    if not model.eta > 0:  # LayerScale's initial value: 0 or less would start every residual branch shut or inverted
        raise ValueError(f"eta (LayerScale's initial value) must be > 0, got {model.eta}.")
    if model.batch_norm_group_size is not None and model.batch_norm_group_size < 1:
        raise ValueError(
            f"batch_norm_group_size must be >= 1 (or None: the whole batch), got {model.batch_norm_group_size}."
        )
    if model.global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {model.global_pool!r}.")
    for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
        rate = getattr(model, name)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}.")


def check_image_shape(images: jnp.ndarray, patch_size: int) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"XCiT expects NHWC images of shape (batch, height, width, 3), got shape {images.shape}.")
    height, width = images.shape[1:3]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by the patch size {patch_size}: "
            f"resize or crop to a multiple of {patch_size} (e.g. {height // patch_size * patch_size or patch_size})."
        )
