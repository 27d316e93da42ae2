"""Multiply-accumulates of an XCiT forward pass, counted layer by layer.

Only matmuls and convolutions are counted, one multiply-add each, the convention behind the GFLOPs that
the XCiT paper and fvcore report (XCiT-N12/16: 0.5, T12/16: 1.2, S12/16: 4.8 at 224). Norms, activations
and softmax are left out. XLA's own cost analysis (`jax.jit(f).lower(...).cost_analysis()`) counts those
too and each multiply-add as 2 flops; `tests/test_qkv.py` checks the two agree.
"""

from qkv_vit.models.qkv import QKVSpec, qkv_macs_per_token
from qkv_vit.models.xcit import STAGE_WIDTH_DIVISORS, XCiT

FOURIER_FEATURES = 64


def count_macs(model: XCiT, image_size: int = 224) -> int:
    """Multiply-accumulates for one image of image_size x image_size."""
    d = model.embed_dim
    grid = image_size // model.patch_size
    tokens = grid * grid
    mlp_hidden = int(d * model.mlp_ratio)
    spec = model.qkv_spec
    total = patch_embed_macs(model.patch_size, d, image_size)
    total += tokens * FOURIER_FEATURES * d if model.use_pos_embed else 0
    total += model.depth * xca_block_macs(spec, d, model.num_heads, tokens, mlp_hidden)
    ca_spec = spec if model.qkv_in_class_attention else None
    total += model.cls_attn_layers * class_block_macs(ca_spec, d, tokens + 1, mlp_hidden)
    return total + (d * model.num_classes if model.num_classes > 0 else 0)


def patch_embed_macs(patch_size: int, dim: int, image_size: int) -> int:
    total, channels, size = 0, 3, image_size
    for divisor in STAGE_WIDTH_DIVISORS[patch_size]:
        size = (size + 1) // 2
        total += size * size * 9 * channels * (dim // divisor)
        channels = dim // divisor
    return total


def xca_block_macs(spec: QKVSpec, dim: int, num_heads: int, tokens: int, mlp_hidden: int) -> int:
    head_dim = dim // num_heads
    qkv = tokens * qkv_macs_per_token(spec, dim)
    cross_covariance = 2 * tokens * num_heads * head_dim * head_dim  # q^T k, then attn applied to v
    projection = tokens * dim * dim
    local_patch_interaction = 2 * tokens * 9 * dim  # two depthwise 3x3 convs
    mlp = 2 * tokens * dim * mlp_hidden
    return qkv + cross_covariance + projection + local_patch_interaction + mlp


def class_block_macs(spec: QKVSpec | None, dim: int, tokens: int, mlp_hidden: int) -> int:
    """Class attention: only the class token is queried and goes through the projection and the MLP."""
    qkv = dim * dim + 2 * tokens * dim * dim if spec is None else tokens * qkv_macs_per_token(spec, dim)
    attention = 2 * tokens * dim  # class query against every key, then the weighted sum of values
    return qkv + attention + dim * dim + 2 * dim * mlp_hidden
