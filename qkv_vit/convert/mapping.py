"""timm-layout XCiT keys and tensors to our Flax variable paths and arrays, and the architecture they imply."""

import re
from typing import Any

import numpy as np

from qkv_vit.convert.state_dict import XCIT_KEYS, StateDict, not_xcit_message

FlaxPath = tuple[str, ...]  # (collection, module, ..., leaf), e.g. ('params', 'blocks_0', 'attn', 'qkv', 'kernel')

PATCH_STAGES_TO_PATCH_SIZE = {4: 16, 3: 8}


def flax_path(key: str) -> FlaxPath:
    """Where a timm key lives in our variables, e.g. blocks.0.attn.qkv.weight -> params/blocks_0/attn/qkv/kernel."""
    stage = re.fullmatch(r"patch_embed\.proj\.(\d+)\.([01])\.(\w+)", key)
    if stage:  # the reference's Sequential: conv3x3 (Conv, BN) at even indices, GELU at odd ones
        index, part, leaf = stage.groups()
        modules = ["patch_embed", f"{'conv' if part == '0' else 'bn'}_{int(index) // 2}"]
    else:
        *modules, leaf = re.sub(r"(blocks|cls_attn_blocks)\.(\d+)", r"\1_\2", key).split(".")
    if leaf in ("running_mean", "running_var"):
        return ("batch_stats", *modules, leaf.removeprefix("running_"))
    if leaf == "weight":
        is_norm = modules[-1].startswith(("norm", "bn"))
        leaf = "scale" if is_norm else "kernel"
    return ("params", *modules, leaf)


def flax_array(key: str, value: np.ndarray) -> np.ndarray:
    """PyTorch (out, in[, kh, kw]) weights to Flax (in, out) / (kh, kw, in, out) kernels."""
    if not key.endswith(".weight") or value.ndim == 1:
        return value
    if value.ndim == 2:
        return value.T
    kernel = value.transpose(2, 3, 1, 0)
    if key.startswith("pos_embed.token_projection"):  # a 1x1 conv, which we hold as a Dense
        return kernel[0, 0]
    return kernel


def to_flax_variables(state_dict: StateDict) -> tuple[dict[FlaxPath, np.ndarray], dict[FlaxPath, str]]:
    """Flat {flax path: array} plus {flax path: source key}, for loading and for naming keys in errors."""
    arrays, sources = {}, {}
    for key, value in state_dict.items():
        path = flax_path(key)
        arrays[path] = np.ascontiguousarray(flax_array(key, value), dtype=np.float32)
        sources[path] = key
    return arrays, sources


def infer_architecture(state_dict: StateDict) -> dict[str, Any]:
    """XCiT constructor arguments implied by the weights' shapes.

    `tokens_norm` and `eta` change no shape, so they cannot be read from weights and are not returned.
    """
    if not all(key in state_dict for key in XCIT_KEYS):
        raise ValueError(not_xcit_message("The state dict", list(state_dict), []))
    embed_dim = state_dict["cls_token"].shape[-1]
    conv_stages = sum(bool(re.fullmatch(r"patch_embed\.proj\.\d+\.0\.weight", k)) for k in state_dict)
    if conv_stages not in PATCH_STAGES_TO_PATCH_SIZE:
        raise ValueError(f"XCiT patch embedding with {conv_stages} conv stages: only 4 (patch 16) or 3 (patch 8).")
    return dict(
        patch_size=PATCH_STAGES_TO_PATCH_SIZE[conv_stages],
        embed_dim=int(embed_dim),
        depth=count_indexed(state_dict, r"blocks\.(\d+)\.attn\.temperature"),
        num_heads=int(state_dict["blocks.0.attn.temperature"].shape[0]),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        cls_attn_layers=count_indexed(state_dict, r"cls_attn_blocks\.(\d+)\.norm1\.weight"),
        num_classes=int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0,
        use_pos_embed="pos_embed.token_projection.weight" in state_dict,
    )


def count_indexed(state_dict: StateDict, pattern: str) -> int:
    return sum(bool(re.fullmatch(pattern, key)) for key in state_dict)
