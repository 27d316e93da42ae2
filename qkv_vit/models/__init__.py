"""XCiT models: the module, the named model registry and parameter accounting."""

from qkv_vit.models.registry import (
    MODEL_CONFIGS,
    count_params,
    create,
    init_shapes,
    list_models,
    model_config,
    param_count,
)
from qkv_vit.models.xcit import XCiT

__all__ = [
    "MODEL_CONFIGS",
    "XCiT",
    "count_params",
    "create",
    "init_shapes",
    "list_models",
    "model_config",
    "param_count",
]
