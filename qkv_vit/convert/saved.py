"""Converted weights under the names earlier versions had (users' scripts import them from here); the format
is qkv_vit/weights.py's: read_weights and save_converted."""

import dataclasses
from pathlib import Path
from typing import Any

from qkv_vit import models
from qkv_vit.weights import read_weights, save_converted

__all__ = ["ConvertedWeights", "load_converted", "save_converted"]


@dataclasses.dataclass(frozen=True)
class ConvertedWeights:
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}
    model_config: dict[str, Any]  # models.from_architecture(model_config) is the model the variables belong to


def load_converted(directory: str | Path) -> ConvertedWeights:
    """The converted weights in `directory` with their model's architecture; FileNotFoundError if it holds none."""
    weights = read_weights(directory)
    if weights.architecture is None:
        raise FileNotFoundError(f"{directory} is not converted weights (python -m qkv_vit.convert SRC DST).")
    return ConvertedWeights(weights.variables, models.architecture_from_json(weights.architecture))
