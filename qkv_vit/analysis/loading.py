"""Finding a params tree in a checkpoint directory written by this project."""

from pathlib import Path
from typing import Any

from qkv_vit.weights import read_variables


def load_params(path: str | Path) -> dict[str, Any]:
    """params from converted weights, a run's workdir or checkpoints/ (its latest step) or a step directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory not found: {path}")
    return read_variables(path)["params"]
