"""Loading PyTorch XCiT weights as Flax variables, checked key by key and shape by shape against a model."""

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from qkv_vit.convert.mapping import FlaxPath, infer_architecture, to_flax_variables
from qkv_vit.convert.state_dict import read_state_dict
from qkv_vit.errors import ConfigError
from qkv_vit.models import XCiT, init_shapes
from qkv_vit.tree import flatten, unflatten

MAX_KEYS_IN_ERROR = 20
EXPORT_CONFIG = "config.json"  # what python -m qkv_vit.export writes beside the weights
DEFAULT_QKV_ACTIVATION = "relu"


class WeightMismatchError(ConfigError):
    """The weights do not fit the model: missing, unexpected or wrongly shaped keys (all named)."""


def load_pytorch_weights(path: str | Path, model: nn.Module | None = None) -> dict[str, Any]:
    """Read XCiT weights (.safetensors, or .pth/.pt in the official or timm layout) as Flax variables.

    Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays for `model.apply`. Without `model`,
    the architecture is inferred from the weights' shapes. Every key must match: a missing, unexpected or
    wrongly shaped key raises WeightMismatchError naming them, so nothing is ever loaded partially.
    """
    state_dict = read_state_dict(path)
    file_architecture = infer_architecture(state_dict)
    model = model or XCiT(**file_architecture)
    arrays, sources = to_flax_variables(state_dict)
    expected = flatten(init_shapes(model, image_size=model.patch_size))
    try:
        check_match(arrays, sources, expected, Path(path).name, model)
    except WeightMismatchError as error:
        raise WeightMismatchError(f"{error}\n  The file holds XCiT({format_kwargs(file_architecture)}).") from None
    return unflatten(arrays)


def check_match(
    arrays: dict[FlaxPath, np.ndarray],
    sources: dict[FlaxPath, str],
    expected: dict[FlaxPath, Any],
    source_name: str,
    model: nn.Module,
) -> None:
    unexpected = [sources[p] for p in arrays if p not in expected]
    missing = ["/".join(p) for p in expected if p not in arrays]
    wrong_shape = [
        f"{sources[p]} {tuple(arrays[p].shape)} (model wants {tuple(expected[p].shape)})"
        for p in arrays
        if p in expected and arrays[p].shape != tuple(expected[p].shape)
    ]
    problems = [
        describe("unexpected keys in the file (not in the model)", unexpected),
        describe("model variables missing from the file", missing),
        describe("shape mismatches (after transposing to Flax layout)", wrong_shape),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise WeightMismatchError(
            f"{source_name} does not fit {describe_model(model)}; nothing was loaded. Give weights of that "
            "model, or the model they belong to (python -m qkv_vit.convert without --model reads it from their "
            "shapes):\n" + "\n".join(problems)
        )


def describe(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = sorted(items)[:MAX_KEYS_IN_ERROR]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {len(items)} {title}:\n" + "\n".join(f"    {item}" for item in shown) + more


def describe_model(model: nn.Module) -> str:
    if isinstance(model, XCiT):
        fields = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "cls_attn_layers", "num_classes")
        return f"XCiT({format_kwargs({f: getattr(model, f) for f in fields})})"
    return type(model).__name__


def format_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in kwargs.items())


def recorded_qkv_activation(weights: str | Path) -> tuple[str, str]:
    """(the non-linear QKV embedding's activation, where it comes from) for a weights file: the architecture in the
    config.json that `python -m qkv_vit.export` wrote beside it, else relu (the default; shapes cannot tell).
    ValueError if that config.json cannot be read as JSON."""
    config = Path(weights).parent / EXPORT_CONFIG
    if not config.is_file():
        return DEFAULT_QKV_ACTIVATION, f"no {EXPORT_CONFIG} beside the weights: assumed; no weight shape shows it"
    try:
        architecture = json.loads(config.read_text()).get("qkv_vit", {}).get("architecture", {})
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config} is not the JSON object python -m qkv_vit.export writes ({error}).") from None
    if "qkv_activation" not in architecture:
        return DEFAULT_QKV_ACTIVATION, f"{config} does not record it: assumed; no weight shape shows it"
    return architecture["qkv_activation"], f"read from {config}"
