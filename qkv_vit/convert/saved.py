"""Converted weights on disk: an Orbax checkpoint with two items, `variables` and `model_config` (JSON).

`model_config` holds the XCiT constructor arguments, so a fine-tuning run can rebuild the exact model.
Orbax writes to a temporary directory and renames it when complete, so a killed conversion leaves no
checkpoint that looks valid.
"""

import dataclasses
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class ConvertedWeights:
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}
    model_config: dict[str, Any]  # XCiT(**model_config) is the model the variables belong to


def save_converted(directory: str | Path, variables: dict[str, Any], model_config: dict[str, Any]) -> Path:
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new output directory or remove it first.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            directory,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables), model_config=ocp.args.JsonSave(model_config)
            ),
        )
    return directory


def load_converted(directory: str | Path) -> ConvertedWeights:
    directory = Path(directory).absolute()
    if not (directory / "variables").is_dir() or not (directory / "model_config").is_dir():
        raise FileNotFoundError(
            f"{directory} is not converted weights (expected `variables/` and `model_config/` written by "
            "`python -m qkv_vit.convert SRC DST`)."
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory,
            args=ocp.args.Composite(variables=ocp.args.StandardRestore(), model_config=ocp.args.JsonRestore()),
        )
    return ConvertedWeights(variables=dict(restored.variables), model_config=dict(restored.model_config))
