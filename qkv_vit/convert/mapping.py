"""timm-layout XCiT keys and tensors to our Flax variable paths and arrays, and the architecture they imply."""

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from qkv_vit.convert.state_dict import XCIT_KEYS, StateDict, not_xcit_message

FlaxPath = tuple[str, ...]  # (collection, module, ..., leaf), e.g. ('params', 'blocks_0', 'attn', 'qkv', 'kernel')

PATCH_STAGES_TO_PATCH_SIZE = {4: 16, 3: 8}
# The non-linear QKV embeddings' weights (qkv_vit/torch_xcit.py's QKVEmbedding) and our kernels: (out, in) matrices,
# with a leading axis of 3 where q, k and v have a layer each, against (in, out) kernels.
QKV_WEIGHT_LEAVES = {"hidden_weight": "hidden_kernel", "output_weight": "output_kernel"}
QKV_FIELDS = (
    "qkv_embed",
    "qkv_hidden_dim",
    "shared_layer",
    "code_size",
    "code_mode",
    "qkv_activation",
    "qkv_in_class_attention",
)
# What the layers' shapes say about the non-linear embedding; the activation changes no shape.
NONLINEAR_QKV = {(False, False): dict(qkv_embed="sne"), (True, False): dict(qkv_embed="psne", shared_layer="first")}
NONLINEAR_QKV[(False, True)] = dict(qkv_embed="psne", shared_layer="second")


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
    if leaf in QKV_WEIGHT_LEAVES:
        return ("params", *modules, QKV_WEIGHT_LEAVES[leaf])
    if leaf == "weight":
        is_norm = modules[-1].startswith(("norm", "bn"))
        leaf = "scale" if is_norm else "kernel"
    return ("params", *modules, leaf)


def flax_array(key: str, value: np.ndarray) -> np.ndarray:
    """PyTorch (out, in[, kh, kw]) weights to Flax (in, out) / (kh, kw, in, out) kernels; a non-linear QKV
    embedding's ([3,] out, in) weights to ([3,] in, out) kernels."""
    if key.rsplit(".", 1)[-1] in QKV_WEIGHT_LEAVES:
        return np.swapaxes(value, -1, -2)
    if not key.endswith(".weight") or value.ndim == 1:
        return value
    if value.ndim == 2:
        return value.T
    kernel = value.transpose(2, 3, 1, 0)
    if key.startswith("pos_embed.token_projection"):  # a 1x1 conv, which we hold as a Dense
        return kernel[0, 0]
    return kernel


def to_flax_variables(
    state_dict: StateDict,
    path_of: Callable[[str], FlaxPath] = flax_path,
    array_of: Callable[[str, np.ndarray], np.ndarray] = flax_array,
) -> tuple[dict[FlaxPath, np.ndarray], dict[FlaxPath, str]]:
    """Flat {flax path: float32 array} plus {flax path: source key}, for loading and for naming keys in errors;
    XCiT's key and array mapping by default, another model's (convert/regnet.py) where given."""
    arrays, sources = {}, {}
    for key, value in state_dict.items():
        path = path_of(key)
        arrays[path] = np.ascontiguousarray(array_of(key, value), dtype=np.float32)
        sources[path] = key
    return arrays, sources


def infer_architecture(state_dict: StateDict) -> dict[str, Any]:
    """XCiT constructor arguments implied by the weights' shapes, with the non-linear QKV embedding's options
    (qkv_embed, qkv_hidden_dim, shared_layer, code_size, code_mode, qkv_in_class_attention: nonlinear_qkv) where
    the weights have one; for XCiT's linear embedding none of these is returned.

    `tokens_norm`, `eta` and `qkv_activation` change no shape, so they cannot be read from weights and are not
    returned.
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
        **nonlinear_qkv(state_dict, int(embed_dim)),
    )


def nonlinear_qkv(state_dict: StateDict, embed_dim: int) -> dict[str, Any]:
    """The non-linear QKV embedding's options implied by blocks.0.attn.qkv's shapes (qkv_vit/torch_xcit.py's
    layout); {} for XCiT's linear embedding. A separate layer has a leading axis of 3; F-SNE (both layers shared)
    has codes: (3, m) with a (h, d + m) first layer concatenates them, (3, d) with a (h, d) one adds them.
    ValueError for shapes no embedding has."""
    prefix = "blocks.0.attn.qkv."
    if prefix + "hidden_weight" not in state_dict:
        return {}
    hidden, output = state_dict[prefix + "hidden_weight"], state_dict[prefix + "output_weight"]
    shared = (hidden.ndim == 2, output.ndim == 2)
    options: dict[str, Any] = {"qkv_hidden_dim": int(hidden.shape[-2])}
    codes = state_dict.get(prefix + "codes")
    if shared == (True, True) and codes is not None:
        concat = hidden.shape[-1] == embed_dim + codes.shape[-1]
        if not concat and codes.shape[-1] != embed_dim:
            raise ValueError(f"F-SNE codes {tuple(codes.shape)} fit neither concatenation nor addition to {embed_dim}.")
        options.update(qkv_embed="fsne", code_mode="concat" if concat else "add")
        if concat:
            options["code_size"] = int(codes.shape[-1])
    elif shared in NONLINEAR_QKV and codes is None:
        options.update(NONLINEAR_QKV[shared])
    else:
        raise ValueError(
            f"{prefix}* with hidden_weight {tuple(hidden.shape)}, output_weight {tuple(output.shape)} and "
            f"{'codes' if codes is not None else 'no codes'} is none of SNE, P-SNE, F-SNE (qkv_vit/torch_xcit.py)."
        )
    options["qkv_in_class_attention"] = "cls_attn_blocks.0.attn.qkv.hidden_weight" in state_dict
    return options


def qkv_options(architecture: dict[str, Any]) -> dict[str, Any]:
    """The QKV embedding's options (QKV_FIELDS) that an architecture holds: {} for inferred linear XCiT."""
    return {key: architecture[key] for key in QKV_FIELDS if key in architecture}


def count_indexed(state_dict: StateDict, pattern: str) -> int:
    return sum(bool(re.fullmatch(pattern, key)) for key in state_dict)
