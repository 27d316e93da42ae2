"""Exporting XCiT weights to PyTorch (timm's or the official layout) with a model card: the inverse of
qkv_vit.convert. `python -m qkv_vit.export WEIGHTS OUT`; the PyTorch model is qkv_vit/torch_xcit.py."""

from qkv_vit.export.card import model_card, provenance
from qkv_vit.export.exporting import export_weights, hub_config, timm_model_name, torch_xcit_args
from qkv_vit.export.state_dict import LAYOUTS, official_layout, to_state_dict, torch_array, torch_key

__all__ = [
    "LAYOUTS",
    "export_weights",
    "hub_config",
    "model_card",
    "official_layout",
    "provenance",
    "timm_model_name",
    "to_state_dict",
    "torch_array",
    "torch_key",
    "torch_xcit_args",
]
