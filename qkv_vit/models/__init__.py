"""XCiT models: the module (xcit.py), the named model registry with its layer choice, parameter accounting, and
what a forward pass computes on the way (intermediates.py)."""

from qkv_vit.models.intermediates import Intermediates, capture
from qkv_vit.models.qkv import QKV_EMBEDDINGS, QKVSpec
from qkv_vit.models.registry import (
    LAYER_IMPLS,
    MODEL_CONFIGS,
    QKV_PRESET_ALIASES,
    QKV_PRESETS,
    architecture,
    architecture_fields,
    architecture_from_json,
    architecture_of,
    check_xcit_architecture,
    count_params,
    create,
    for_platform,
    from_architecture,
    init_shapes,
    layer_fields,
    layer_impl_of,
    list_models,
    qkv_preset,
)
from qkv_vit.models.xcit import XCiT

__all__ = [
    "LAYER_IMPLS",
    "MODEL_CONFIGS",
    "QKV_EMBEDDINGS",
    "QKV_PRESET_ALIASES",
    "QKV_PRESETS",
    "QKVSpec",
    "Intermediates",
    "XCiT",
    "architecture",
    "architecture_fields",
    "architecture_from_json",
    "architecture_of",
    "capture",
    "check_xcit_architecture",
    "count_params",
    "create",
    "for_platform",
    "from_architecture",
    "init_shapes",
    "layer_fields",
    "layer_impl_of",
    "list_models",
    "qkv_preset",
]
