"""Analysis of F-SNE's learned codes: norms, orthogonality and a 2-D map, as JSON and PNG plots."""

from pathlib import Path
from typing import Any

from qkv_vit.analysis.codes import code_statistics, collect_codes, embed_2d
from qkv_vit.analysis.report import analyze_codes
from qkv_vit.weights import read_weights

__all__ = ["analyze_codes", "code_statistics", "collect_codes", "embed_2d", "load_params"]


def load_params(path: str | Path) -> dict[str, Any]:
    """read_weights(path).variables["params"], under the name earlier versions had (users' scripts call it)."""
    return read_weights(path).variables["params"]
