"""Reading trained weights from anything this project writes, on whatever devices this process has.

Accepted: converted PyTorch weights (`python -m qkv_vit.convert`), a run's workdir, its `checkpoints/`
directory (latest step) or one step directory. Arrays are restored onto this process's first device,
so a checkpoint saved on a pod (or on 8 devices, FSDP-sharded) loads on a laptop.
"""

from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from qkv_vit.convert.saved import load_converted
from qkv_vit.errors import CheckpointError, ConfigError, describe_cause
from qkv_vit.paths import PathLike, as_path


def read_variables(path: PathLike, use_ema: bool = False) -> dict[str, Any]:
    """{'params', 'batch_stats'} (params = the EMA copy if use_ema and the run kept one).

    FileNotFoundError if `path` holds neither; CheckpointError if what it holds cannot be read back.
    """
    path = as_path(path)
    if (path / "variables").is_dir() and (path / "model_config").is_dir():
        return read_or_explain(path, lambda: load_converted(path).variables)
    item = find_state_item(path)
    state = read_or_explain(item.parent, lambda: restore_on_local_device(item))
    params = state["params"]
    if use_ema:
        if not state.get("ema_params"):
            raise ConfigError(f"{path} has no EMA parameters (the run did not set config.ema_decay).")
        params = state["ema_params"]
    return {"params": params, "batch_stats": state.get("batch_stats", {})}


def find_state_item(path: epath.Path) -> epath.Path:
    """The `state` item of the latest step under a workdir, a checkpoints/ directory or a step directory."""
    if (path / "state").is_dir():
        return path / "state"
    for directory in (path / "checkpoints", path):
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
        if steps:
            return directory / str(max(steps)) / "state"
    raise FileNotFoundError(
        f"{path} is neither converted weights (python -m qkv_vit.convert) nor a qkv_vit run directory "
        "(expected checkpoints/<step>/state)."
    )


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
    metadata = checkpointer.metadata(item_dir)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)
    return checkpointer.restore(item_dir, target)
