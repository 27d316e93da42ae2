"""Weights to start from or to analyse, from anything this project writes: `read_weights(path)`.

Accepted: converted PyTorch weights (`python -m qkv_vit.convert`, written by `save_converted`), a run's
workdir, its `checkpoints/` directory (latest step) or one step directory. Arrays are restored onto this
process's first device, so a checkpoint saved on a pod (or on 8 devices, FSDP-sharded) loads on a laptop.
Each comes with the architecture it belongs to where one was recorded (converted weights, a run's
model.json). Fitting loaded weights into a model for fine-tuning (`merge_for_fine_tuning`) is here too; a
run's own checkpoints (save, exact resume, damaged steps) are train/checkpointing.py's.
"""

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qkv_vit.errors import CheckpointError, ConfigError, describe_cause
from qkv_vit.paths import PathLike, as_path
from qkv_vit.tree import flatten, unflatten

# Converted weights: an Orbax checkpoint with the items `variables` and `architecture` (JSON: XCiT's constructor
# arguments, models.architecture_of).
HEAD = "head"


@dataclasses.dataclass(frozen=True)
class Weights:
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}
    architecture: dict[str, Any] | None  # as stored (JSON; models.architecture_from_json), None if none was
    class_names: list[str] | None = None  # what the head's rows stand for: a run's train classes; None: unrecorded


def read_weights(path: PathLike, use_ema: bool = False) -> Weights:
    """The weights at `path` (params = the EMA copy if use_ema and the run kept one) and their architecture.

    FileNotFoundError if `path` holds neither converted weights nor a run's checkpoint; ConfigError for use_ema
    without EMA parameters; CheckpointError if what it holds cannot be read back.
    """
    path = as_path(path)
    if is_converted(path):
        return read_or_explain(path, lambda: Weights(restore_converted_variables(path), read_architecture(path)))
    state_item = find_state_item(path)
    state = read_or_explain(state_item.parent, lambda: restore_on_local_device(state_item))
    params = state["params"]
    if use_ema:
        if not state.get("ema_params"):
            raise ConfigError(
                f"{path} has no EMA parameters (the run did not set config.ema_decay): use its plain parameters "
                "(leave out --ema, or set config.init_from_ema=false)."
            )
        params = state["ema_params"]
    variables = {"params": params, "batch_stats": state.get("batch_stats", {})}
    return Weights(variables, run_architecture(state_item), run_summary(state_item).get("data", {}).get("class_names"))


def save_converted(directory: str | Path, variables: dict[str, Any], architecture: dict[str, Any]) -> Path:
    """Write converted weights; FileExistsError if `directory` exists. Orbax writes to a temporary directory and
    renames it when complete, so a killed conversion leaves nothing that looks valid."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; choose a new output directory or remove it first.")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            directory,
            args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables), architecture=ocp.args.JsonSave(architecture)
            ),
        )
    return directory


def is_converted(path: epath.Path) -> bool:
    """Whether `path` holds converted weights (save_converted's two items)."""
    return (path / "variables").is_dir() and (path / "architecture").is_dir()


def read_architecture(path: PathLike) -> dict[str, Any] | None:
    """The architecture recorded with the weights at `path` (JSON, as read_weights gives it), without reading any
    array: None where none was recorded; FileNotFoundError if `path` holds no weights."""
    path = as_path(path)
    if not is_converted(path):
        return run_architecture(find_state_item(path))

    def restore() -> dict[str, Any]:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, args=ocp.args.Composite(architecture=ocp.args.JsonRestore()))
            return restored["architecture"]

    return dict(read_or_explain(path, restore))


def restore_converted_variables(path: epath.Path) -> dict[str, Any]:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
    return dict(restored["variables"])


def find_state_item(path: epath.Path) -> epath.Path:
    """The `state` item of the latest step under a workdir, a checkpoints/ directory or a step directory."""
    if (path / "state").is_dir():
        return path / "state"
    for directory in (path / "checkpoints", path):
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
        if steps:
            return directory / str(max(steps)) / "state"
    raise FileNotFoundError(
        f"{path} is neither converted weights (python -m qkv_vit.convert) nor a qkv_vit run directory: give "
        "converted weights, or a run directory with checkpoints/<step>/state."
    )


def run_summary(state_item: epath.Path) -> dict[str, Any]:
    """The model.json of the run that wrote WORKDIR/checkpoints/<step>/state; {} if absent or unreadable."""
    try:
        return json.loads((state_item.parent.parent.parent / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def run_architecture(state_item: epath.Path) -> dict[str, Any] | None:
    """The architecture in the model.json of the run that wrote WORKDIR/checkpoints/<step>/state; None if absent."""
    return run_summary(state_item).get("architecture")


def read_or_explain(checkpoint: epath.Path, read: Callable[[], Any]) -> Any:
    """`read()`, or a CheckpointError naming the checkpoint: damaged files raise many types from deep in TensorStore."""
    try:
        return read()
    except Exception as error:
        raise CheckpointError(
            f"Cannot read the checkpoint {checkpoint} ({describe_cause(error)}): it is damaged or incomplete. "
            "Use another step directory (checkpoints/<step>) or a fresh copy."
        ) from error


def restore_on_local_device(item_dir: epath.Path) -> dict[str, Any]:
    """Restore an Orbax pytree item with every array on this process's first device, whatever it was saved on."""
    checkpointer = ocp.StandardCheckpointer()
    # The item's own metadata, through its handler: the checkpointer's metadata() looks for a step-level
    # _CHECKPOINT_METADATA file inside the item and warns on every healthy checkpoint that it is missing.
    metadata = ocp.StandardCheckpointHandler().metadata(item_dir)
    tree = getattr(metadata, "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)
    return checkpointer.restore(item_dir, target)


def check_fine_tuning_fit(fresh: dict[str, Any], loaded: dict[str, Any], init_from: str) -> list[tuple[str, ...]]:
    """The head variables to re-initialize (class count differs); ConfigError naming every other mismatch.

    `fresh` may hold arrays or shapes only (jax.ShapeDtypeStruct), so this runs before anything compiles.
    """
    fresh_flat = flatten(fresh)
    loaded_flat = flatten(loaded)
    missing = [k for k in fresh_flat if k not in loaded_flat]
    unexpected = [k for k in loaded_flat if k not in fresh_flat and not is_head(k)]
    reshaped = [k for k in fresh_flat if k in loaded_flat and np.shape(loaded_flat[k]) != np.shape(fresh_flat[k])]
    problems = [k for k in missing + reshaped if not is_head(k)] + unexpected
    if problems:
        raise ConfigError(
            f"init_from={init_from} does not fit the configured model ({len(problems)} variables differ): "
            + ", ".join("/".join(k) for k in problems[:10])
            + (" ..." if len(problems) > 10 else "")
            + ". Check config.model_name and the QKV options against the checkpoint's."
        )
    return [k for k in missing + reshaped if is_head(k)]


def merge_for_fine_tuning(fresh: dict[str, Any], loaded: dict[str, Any], init_from: str) -> dict[str, Any]:
    """Loaded weights over a fresh init: every variable must match, except the head, which is re-initialized
    when the class count differs. Anything else that differs is a ConfigError naming the variables."""
    reinit_head = check_fine_tuning_fit(fresh, loaded, init_from)
    if reinit_head:
        logging.info("init_from: re-initialized the classifier head (class count differs from %s).", init_from)
    fresh_flat, loaded_flat = flatten(fresh), flatten(loaded)
    merged = {k: (fresh_flat[k] if k in reinit_head else loaded_flat[k]) for k in fresh_flat}
    return unflatten(merged)


def is_head(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[1] == HEAD
