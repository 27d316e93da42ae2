"""Finding a params tree in a checkpoint directory written by this project."""

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from qkv_vit.convert.saved import load_converted


def load_params(path: str | Path) -> dict[str, Any]:
    """params from converted weights (`python -m qkv_vit.convert`), an Orbax CheckpointManager directory
    (its latest step) or one Orbax checkpoint whose items hold a `params` subtree."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory not found: {path}")
    if (path / "variables").is_dir() and (path / "model_config").is_dir():
        return load_converted(path).variables["params"]
    steps = sorted((int(p.name), p) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    step_dir = steps[-1][1] if steps else path
    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        try:
            tree = ocp.StandardCheckpointer().restore(item)
        except Exception:  # noqa: BLE001 - not a pytree item (e.g. JSON metadata); try the next one
            continue
        params = find_params(tree)
        if params is not None:
            return params
    raise ValueError(f"No `params` found in the Orbax checkpoint at {step_dir}.")


def find_params(tree: Any) -> dict[str, Any] | None:
    if not isinstance(tree, dict):
        return None
    if isinstance(tree.get("params"), dict):
        return tree["params"]
    for value in tree.values():
        found = find_params(value)
        if found is not None:
            return found
    return None
