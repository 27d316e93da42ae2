"""XCiT: Cross-Covariance Image Transformer (El-Nouby et al., 2021), as facebookresearch/xcit and timm compute it.

Images are NHWC. Variables hold `params` and `batch_stats` (patch-embedding and LPI BatchNorm).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from qkv_vit.models.blocks import ClassAttentionBlock, XCABlock
from qkv_vit.models.embedding import STAGE_WIDTH_DIVISORS, ConvPatchEmbed, FourierPositionalEncoding
from qkv_vit.models.layers import Dtype, check_layer_impl, make_dense, make_layer_norm, resolve_layer_impl
from qkv_vit.models.qkv import QKVSpec

GLOBAL_POOLS = ("token", "avg")


class XCiT(nn.Module):
    """The XCiT classifier. `apply(variables, images, train=False)` returns logits (B, num_classes).

    With num_classes=0 there is no head and the call returns the pooled features (B, embed_dim).
    `dtype` is the compute dtype of matmuls and convolutions (e.g. jnp.bfloat16); parameters, the residual
    stream, LayerNorm, LayerScale, XCA's gram and softmax (then cast for the product with v) and the logits stay
    float32, as under PyTorch's autocast.
    The `qkv_*`, `shared_layer` and `code_*` fields choose the query/key/value embedding (models/qkv.py).
    `layer_impl` chooses the layers' implementation ("auto", "flax", "cpu": models/layers.py), the same
    parameters either way; `batch_norm_group_size` G normalizes BatchNorm over groups of G images.
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
    layer_impl: str = "auto"  # "flax" off-CPU, "cpu" on a CPU backend (models/layers.py)
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
        impl = resolve_layer_impl(self.layer_impl)
        self.patch_embed = ConvPatchEmbed(self.patch_size, self.embed_dim, self.dtype, impl, self.batch_norm_group_size)
        if self.use_pos_embed:
            self.pos_embed = FourierPositionalEncoding(self.embed_dim, dtype=self.dtype)
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
                layer_impl=impl,
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
                layer_impl=impl,
            )
            for _ in range(self.cls_attn_layers)
        ]
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        self.norm = make_layer_norm(impl, "norm")
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes > 0:
            self.head = make_dense(impl, self.num_classes, self.dtype, name="head")

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
    check_layer_impl(model.layer_impl)
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
