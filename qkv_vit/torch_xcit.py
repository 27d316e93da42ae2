"""The package's PyTorch XCiT, for export and benchmarks: timm's `timm/models/xcit.py` (itself
facebookresearch/xcit's `xcit.py`) and the `ClassAttn` / `Mlp` it imports, restated without timm, plus the
query/key/value embeddings of Ahn et al. (arXiv 2111.10017) with qkv_vit's math (qkv_vit/models/qkv.py).

It imports nothing but torch and the standard library, so exported weights (`python -m qkv_vit.export`) run where
neither JAX nor timm is installed: copy this one file. timm itself cannot be a dependency of qkv_vit (it needs
torchvision, which has no CPU build here). With the linear embedding (XCiT's) this keeps timm's modules, forward
code, default attention paths (XCA unfused, class attention through `scaled_dot_product_attention`) and
state-dict keys, so `load_state_dict` takes timm's weights unchanged and timm takes its weights;
`tests/test_benchmarks.py` checks it reproduces the fixtures' timm logits, `tests/test_export.py` that it
reproduces qkv_vit's logits for every embedding.

The non-linear embeddings (`qkv_embed` "sne", "psne", "fsne") replace XCA's `attn.qkv` Linear (and, with
`qkv_in_class_attention`, class attention's `attn.q` / `attn.k` / `attn.v`) by a `QKVEmbedding` under the same
name, whose parameters (d the token width, h the hidden width, m the code size; a leading axis of 3, in q, k, v
order, where q, k and v have a layer each; weights (out, in) as nn.Linear's) are, for block i:

  blocks.{i}.attn.qkv.hidden_weight   (h, d) shared, (3, h, d) separate, (h, d + m) F-SNE concat, (h, d) F-SNE add
  blocks.{i}.attn.qkv.hidden_bias     (h,) shared, (3, h) separate
  blocks.{i}.attn.qkv.output_weight   (d, h) shared, (3, d, h) separate
  blocks.{i}.attn.qkv.output_bias     (d,) shared, (3, d) separate
  blocks.{i}.attn.qkv.codes           (3, m) F-SNE concat, (3, d) F-SNE add: rows c_q, c_k, c_v

and the same under cls_attn_blocks.{i}.attn.qkv with `qkv_in_class_attention`. SNE separates both layers,
P-SNE shares the first (`shared_layer="first"`) or the second, F-SNE shares both and tells q, k, v apart by
their codes. qkv_vit's Flax variables are these transposed (qkv_vit/convert/mapping.py reads them back).
`from_architecture(arch)` builds the model of a qkv_vit architecture (models.architecture_of's JSON, e.g. a
run's model.json) and `create(name, **overrides)` a timm named model.
"""

import dataclasses
import inspect
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# The named models of timm's registry (timm appends the image size: xcit_nano_12_p16_224):
# (embed_dim, depth, heads, eta, tokens_norm) per size, for patch 16 and 8.
_SIZES = {
    "nano_12": (128, 12, 4, 1.0, False),
    "tiny_12": (192, 12, 4, 1.0, True),
    "tiny_24": (192, 24, 4, 1e-5, True),
    "small_12": (384, 12, 8, 1.0, True),
    "small_24": (384, 24, 8, 1e-5, True),
    "medium_24": (512, 24, 8, 1e-5, True),
    "large_24": (768, 24, 16, 1e-5, True),
}
TIMM_MODELS = {
    f"xcit_{size}_p{patch}": dict(
        patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, eta=eta, tokens_norm=tokens_norm
    )
    for size, (dim, depth, heads, eta, tokens_norm) in _SIZES.items()
    for patch in (16, 8)
}
QKV_EMBEDDINGS = ("linear", "sne", "psne", "fsne")
# A qkv_vit architecture's fields that change only how it trains or is computed, never the function its weights
# compute in float32 (from_architecture drops them): the compute dtype, the layer implementation, BatchNorm's
# training groups, the codes' initial scale.
TRAINING_ONLY_FIELDS = ("dtype", "layer_impl", "batch_norm_group_size", "code_init_std")


@dataclasses.dataclass(frozen=True)
class QKVOptions:
    """How q, k and v are computed from the normalized tokens (qkv_vit.models.qkv.QKVSpec's fields)."""

    qkv_embed: str = "linear"
    qkv_hidden_dim: int | None = None  # None: the token width d
    shared_layer: str = "first"  # psne: "first" or "second"
    code_size: int = 8  # fsne with code_mode="concat": m
    code_mode: str = "concat"  # fsne: "concat" ([x ; c_t]) or "add" (x + c_t)
    qkv_activation: str = "relu"  # or "identity"
    code_init_std: float = 1.0

    def __post_init__(self):
        choices = {
            "qkv_embed": QKV_EMBEDDINGS,
            "shared_layer": ("first", "second"),
            "code_mode": ("concat", "add"),
            "qkv_activation": ("relu", "identity"),
        }
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}: choose one of {valid}.")

    def layers_shared(self) -> tuple[bool, bool]:
        """Whether the first and the second layer are shared by q, k and v (qkv.py's QKVSpec.layers_shared)."""
        if self.qkv_embed == "sne":
            return False, False
        if self.qkv_embed == "psne":
            return self.shared_layer == "first", self.shared_layer == "second"
        return True, True


class DropPath(nn.Module):
    """timm.layers.DropPath: drops the residual branch per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """timm.layers.Mlp with its defaults: fc1, GELU, dropout, fc2, dropout."""

    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class QKVEmbedding(nn.Module):
    """SNE, P-SNE and F-SNE (qkv_vit/models/qkv.py): tokens (B, N, d) -> q, k, v, each (B, N, d), float32.

    t = W2_t act(W1_t x + b1_t) + b2_t for t in q, k, v, with a layer's W and b shared by q, k, v where
    `options.layers_shared()` says so. F-SNE computes W1 [x ; c_t] + b1 (concat) or W1 (x + c_t) + b1 (add) as
    qkv_vit does, x W1x once plus the per-embedding bias c_t W1c + b1. Parameters as the module docstring lists.
    """

    def __init__(self, dim: int, options: QKVOptions):
        super().__init__()
        if options.qkv_embed == "linear":
            raise ValueError("QKVEmbedding is for the non-linear embeddings; XCiT's linear one is an nn.Linear.")
        self.dim, self.options = dim, options
        hidden = options.qkv_hidden_dim or dim
        first_shared, second_shared = options.layers_shared()
        fsne = options.qkv_embed == "fsne"
        code_dim = options.code_size if options.code_mode == "concat" else dim
        hidden_in = dim + code_dim if fsne and options.code_mode == "concat" else dim
        self.hidden_weight = nn.Parameter(torch.empty((hidden, hidden_in) if first_shared else (3, hidden, dim)))
        self.hidden_bias = nn.Parameter(torch.zeros((hidden,) if first_shared else (3, hidden)))
        self.output_weight = nn.Parameter(torch.empty((dim, hidden) if second_shared else (3, dim, hidden)))
        self.output_bias = nn.Parameter(torch.zeros((dim,) if second_shared else (3, dim)))
        self.codes = nn.Parameter(torch.randn(3, code_dim) * options.code_init_std) if fsne else None
        nn.init.trunc_normal_(self.hidden_weight, std=0.02)
        nn.init.trunc_normal_(self.output_weight, std=0.02)

    def forward(self, x):
        first_shared, second_shared = self.options.layers_shared()
        if self.codes is not None:
            hidden = self.coded_first_layer(x)
        elif first_shared:
            hidden = [F.linear(x, self.hidden_weight, self.hidden_bias)] * 3
        else:
            hidden = [F.linear(x, self.hidden_weight[t], self.hidden_bias[t]) for t in range(3)]
        if self.options.qkv_activation == "relu":
            hidden = [F.relu(h) for h in hidden]
        if second_shared:
            return tuple(F.linear(h, self.output_weight, self.output_bias) for h in hidden)
        return tuple(F.linear(h, self.output_weight[t], self.output_bias[t]) for t, h in enumerate(hidden))

    def coded_first_layer(self, x):
        """F-SNE's hidden pre-activations of q, k, v: x W1x (once) + (c_t W1c + b1)."""
        concat = self.options.code_mode == "concat"
        token_weight = self.hidden_weight[:, : self.dim] if concat else self.hidden_weight
        code_weight = self.hidden_weight[:, self.dim :] if concat else self.hidden_weight
        code_bias = F.linear(self.codes, code_weight, self.hidden_bias)  # (3, h): the same for every token
        projected = F.linear(x, token_weight)
        return [projected + code_bias[t] for t in range(3)]


class ClassAttn(nn.Module):
    """timm.models.cait.ClassAttn (fused path, timm's default): the class token attends to all tokens.

    With a non-linear `qkv` (QKVOptions), q, k and v come from a QKVEmbedding of all tokens named `qkv`, the
    class token's q taken from it, as qkv_vit's ClassAttention computes them with `qkv_in_class_attention`.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, qkv=None):
        super().__init__()
        self.num_heads = num_heads
        if qkv is not None and qkv.qkv_embed != "linear":
            self.qkv = QKVEmbedding(dim, qkv)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.k = nn.Linear(dim, dim, bias=qkv_bias)
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x)
            q = q[:, :1].reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
            k = k.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
            v = v.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        else:
            q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
            k = self.k(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
            v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x_cls))


class PositionalEncodingFourier(nn.Module):
    def __init__(self, hidden_dim=32, dim=768, temperature=10000):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim
        self.dim = dim
        self.eps = 1e-6

    def forward(self, B: int, H: int, W: int):
        device = self.token_projection.weight.device
        dtype = self.token_projection.weight.dtype
        y_embed = torch.arange(1, H + 1, device=device).to(torch.float32).unsqueeze(1).repeat(1, 1, W)
        x_embed = torch.arange(1, W + 1, device=device).to(torch.float32).repeat(1, H, 1)
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.hidden_dim, device=device).to(torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack([pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos_y = torch.stack([pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()], dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        pos = self.token_projection(pos.to(dtype))
        return pos.repeat(B, 1, 1, 1)  # (B, C, H, W)


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class ConvPatchEmbed(nn.Module):
    def __init__(self, patch_size=16, in_chans=3, embed_dim=768, act_layer=nn.GELU):
        super().__init__()
        if patch_size == 16:
            self.proj = nn.Sequential(
                conv3x3(in_chans, embed_dim // 8, 2),
                act_layer(),
                conv3x3(embed_dim // 8, embed_dim // 4, 2),
                act_layer(),
                conv3x3(embed_dim // 4, embed_dim // 2, 2),
                act_layer(),
                conv3x3(embed_dim // 2, embed_dim, 2),
            )
        elif patch_size == 8:
            self.proj = nn.Sequential(
                conv3x3(in_chans, embed_dim // 4, 2),
                act_layer(),
                conv3x3(embed_dim // 4, embed_dim // 2, 2),
                act_layer(),
                conv3x3(embed_dim // 2, embed_dim, 2),
            )
        else:
            raise ValueError(f"patch_size must be 8 or 16, got {patch_size}")

    def forward(self, x):
        x = self.proj(x)
        Hp, Wp = x.shape[2], x.shape[3]
        return x.flatten(2).transpose(1, 2), (Hp, Wp)


class LPI(nn.Module):
    def __init__(self, in_features, act_layer=nn.GELU, kernel_size=3):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size, padding=padding, groups=in_features)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(in_features)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size, padding=padding, groups=in_features)

    def forward(self, x, H: int, W: int):
        B, N, C = x.shape
        x = x.permute(0, 2, 1).reshape(B, C, H, W)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, C, N).permute(0, 2, 1)


class ClassAttentionBlock(nn.Module):
    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        proj_drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        eta=1.0,
        tokens_norm=False,
        qkv=None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttn(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, qkv=qkv
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x):
        x_norm1 = self.norm1(x)
        x_attn = torch.cat([self.attn(x_norm1), x_norm1[:, 1:]], dim=1)
        x = x + self.drop_path(self.gamma1 * x_attn)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, 0:1]), x[:, 1:]], dim=1)
        x_res = x
        cls_token = self.gamma2 * self.mlp(x[:, 0:1])
        x = torch.cat([cls_token, x[:, 1:]], dim=1)
        return x_res + self.drop_path(x)


class XCA(nn.Module):
    """Cross-covariance attention, timm's default (unfused) path; q, k, v from a QKVEmbedding for a non-linear
    `qkv` (QKVOptions)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, qkv=None):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        nonlinear = qkv is not None and qkv.qkv_embed != "linear"
        self.qkv = QKVEmbedding(dim, qkv) if nonlinear else nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        if isinstance(self.qkv, QKVEmbedding):
            q, k, v = (t.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 3, 1) for t in self.qkv(x))
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
            q, k, v = qkv.unbind(0)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class XCABlock(nn.Module):
    def __init__(
        self,
        dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        proj_drop=0.0,
        attn_drop=0.0,
        drop_path=0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        eta=1.0,
        qkv=None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = XCA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, qkv=qkv)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm3 = norm_layer(dim)
        self.local_mp = LPI(dim, act_layer=act_layer)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma3 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x, H: int, W: int):
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma3 * self.local_mp(self.norm3(x), H, W))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        return x


class Xcit(nn.Module):
    """timm's Xcit with its constructor defaults (qkv_bias=True, LayerNorm eps 1e-6, exact GELU), plus
    qkv_vit's QKV options (QKVOptions' fields, and `qkv_in_class_attention`: the class-attention blocks use the
    non-linear embedding too). Images (B, 3, H, W) float32, H and W multiples of patch_size -> logits
    (B, num_classes), or pooled features (B, embed_dim) with num_classes=0.
    """

    def __init__(
        self,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        global_pool="token",
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        pos_drop_rate=0.0,
        proj_drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        cls_attn_layers=2,
        use_pos_embed=True,
        eta=1.0,
        tokens_norm=False,
        img_size=None,
        qkv_in_class_attention=False,
        **qkv_options,
    ):
        super().__init__()
        del img_size  # timm only checks it; any size divisible by the patch works
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}.")
        qkv = QKVOptions(**qkv_options)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        act_layer = nn.GELU
        self.global_pool = global_pool
        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim, act_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.blocks = nn.ModuleList(
            [
                XCABlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    drop_path_rate,
                    act_layer,
                    norm_layer,
                    eta,
                    qkv,
                )
                for _ in range(depth)
            ]
        )
        self.cls_attn_blocks = nn.ModuleList(
            [
                ClassAttentionBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    0.0,
                    act_layer,
                    norm_layer,
                    eta,
                    tokens_norm,
                    qkv if qkv_in_class_attention else None,
                )
                for _ in range(cls_attn_layers)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward_features(self, x):
        B = x.shape[0]
        x, (Hp, Wp) = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(B, Hp, Wp).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, Hp, Wp)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool:
            x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def create(name: str, **overrides) -> Xcit:
    """A named model as timm's `timm.create_model(name)` builds it (no weights), with constructor overrides
    (QKV options included); ValueError for an unknown name."""
    if name not in TIMM_MODELS:
        raise ValueError(f"Unknown model {name!r} for the PyTorch XCiT; known: {', '.join(TIMM_MODELS)}.")
    return Xcit(**{**TIMM_MODELS[name], **overrides})


def constructor_args(architecture: dict) -> dict:
    """Xcit's keyword arguments for a qkv_vit architecture (models.architecture_of's JSON: model.json's
    "architecture", or export's config.json): the fields that only shape training (TRAINING_ONLY_FIELDS) dropped;
    ValueError naming any field Xcit does not know."""
    args = {key: value for key, value in architecture.items() if key not in TRAINING_ONLY_FIELDS}
    known = set(inspect.signature(Xcit).parameters) - {"qkv_options"} | {f.name for f in dataclasses.fields(QKVOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"The PyTorch XCiT has no option(s) {unknown}: this architecture cannot be built here.")
    return args


def from_architecture(architecture: dict) -> Xcit:
    """The Xcit of a qkv_vit architecture (see constructor_args), ready for load_state_dict(strict=True) of the
    weights `python -m qkv_vit.export` wrote for it."""
    return Xcit(**constructor_args(architecture))
