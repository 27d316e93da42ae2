"""Importing PyTorch XCiT weights (timm or official layout) and timm RegNet weights (the distillation teacher,
convert/regnet.py); qkv_vit.weights writes and reads them as an Orbax checkpoint."""

from qkv_vit.convert.loading import WeightMismatchError, load_pytorch_weights
from qkv_vit.convert.mapping import infer_architecture
from qkv_vit.convert.regnet import load_regnet_weights
from qkv_vit.convert.state_dict import read_state_dict

__all__ = [
    "WeightMismatchError",
    "infer_architecture",
    "load_pytorch_weights",
    "load_regnet_weights",
    "read_state_dict",
]
