"""Our Flax XCiT variables as a PyTorch state dict, in timm's or the official facebookresearch/xcit key layout: the
inverse of qkv_vit/convert/mapping.py (flax_path, flax_array) and of convert/state_dict.py's official-to-timm
rewrite, so that converting an export back gives the same arrays."""

import re
from typing import Any

import numpy as np

from qkv_vit.convert.mapping import QKV_WEIGHT_LEAVES, FlaxPath
from qkv_vit.convert.state_dict import StateDict, to_timm_layout
from qkv_vit.tree import flatten

LAYOUTS = ("timm", "official")
QKV_KERNEL_LEAVES = {kernel: weight for weight, kernel in QKV_WEIGHT_LEAVES.items()}
OFFICIAL_CHECKPOINT_KEY = "model"  # the official code saves and loads {'model': state_dict}


def torch_key(path: FlaxPath) -> str:
    """Where a Flax variable lives in timm's state dict, e.g. params/blocks_0/attn/qkv/kernel ->
    blocks.0.attn.qkv.weight, batch_stats/patch_embed/bn_1/mean -> patch_embed.proj.2.1.running_mean."""
    collection, *modules, leaf = path
    if collection == "batch_stats":
        leaf = f"running_{leaf}"
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    elif leaf in QKV_KERNEL_LEAVES:
        leaf = QKV_KERNEL_LEAVES[leaf]
    stage = re.fullmatch(r"(conv|bn)_(\d+)", modules[1]) if modules[:1] == ["patch_embed"] else None
    if stage:  # the reference's Sequential: conv3x3 (Conv, BN) at even indices, GELU at odd ones
        kind, index = stage.groups()
        return f"patch_embed.proj.{2 * int(index)}.{0 if kind == 'conv' else 1}.{leaf}"
    names = [re.sub(r"^(blocks|cls_attn_blocks)_(\d+)$", r"\1.\2", module) for module in modules]
    return ".".join([*names, leaf])


def torch_array(path: FlaxPath, value: Any) -> np.ndarray:
    """A Flax array in PyTorch's layout, float32: (in, out) kernels to (out, in) weights, (kh, kw, in, out) to
    (out, in, kh, kw), the positional encoding's Dense to its 1x1 Conv2d, a QKV embedding's ([3,] in, out)
    kernels to ([3,] out, in) weights; every other array as it is. A view where numpy can give one (writing
    makes it contiguous), so that shapes alone (np.broadcast_to of a scalar) map without allocating."""
    array = np.asarray(value, dtype=np.float32)
    leaf = path[-1]
    if leaf in QKV_KERNEL_LEAVES:
        array = np.swapaxes(array, -1, -2)
    elif leaf == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    elif leaf == "kernel" and array.ndim == 2:
        array = array.T[:, :, None, None] if path[-2] == "token_projection" else array.T
    return array


def to_state_dict(variables: dict[str, Any], layout: str = "timm") -> StateDict:
    """{'params', 'batch_stats'} of an XCiT -> {torch key: float32 array} in `layout` ("timm" or "official").

    timm's layout is what timm's Xcit and qkv_vit/torch_xcit.py hold (class attention with separate q, k, v);
    the official one renames pos_embed to pos_embeder and fuses class attention's q, k, v into one qkv (its
    checkpoint file wraps the dict as {'model': ...}: official_checkpoint). BatchNorm's running statistics are
    included, num_batches_tracked is not (neither timm's published files nor the reference's have it, and a
    plain dict loads strictly without it). ValueError for an unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}: choose one of {LAYOUTS}.")
    flat = flatten({collection: variables.get(collection, {}) for collection in ("params", "batch_stats")})
    # A linear class attention with qkv_in_class_attention is one fused Dense: timm's layout splits it.
    state_dict = to_timm_layout({torch_key(path): torch_array(path, value) for path, value in flat.items()})
    return state_dict if layout == "timm" else official_layout(state_dict)


def official_layout(state_dict: StateDict) -> StateDict:
    """timm's keys -> the official code's: pos_embeder.*, and class attention's q, k, v fused (in that order) into
    qkv, as convert/state_dict.py's to_timm_layout reads them back."""
    out: StateDict = {}
    for key, value in state_dict.items():
        separate = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)", key)
        if not separate:
            out[re.sub(r"^pos_embed\.", "pos_embeder.", key)] = value
        elif separate.group(2) == "q":
            prefix, _, leaf = separate.groups()
            out[f"{prefix}.qkv.{leaf}"] = np.concatenate([state_dict[f"{prefix}.{t}.{leaf}"] for t in "qkv"], axis=0)
    return out
