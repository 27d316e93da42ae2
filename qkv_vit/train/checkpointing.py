"""Orbax checkpoints of a run (exact resume) and the separate fine-tuning init path (`config.init_from`).

A run's checkpoints live in WORKDIR/checkpoints/<step>/ with two items: `state` (the TrainState) and
`meta` (JSON: step, data position, model config). Orbax writes each step to a temporary directory and
renames it when complete, so a killed save never leaves a step that looks finished.
"""

import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from qkv_vit.train.state import TrainState
from qkv_vit.tree import flatten, unflatten

HEAD = "head"


class RunCheckpoints:
    """The run's own checkpoints: save every N steps and at the end, keep the last K, resume the latest."""

    def __init__(self, workdir: str | Path, config: ml_collections.ConfigDict):
        # The trainer decides when to save (every N steps, at the end, on preemption); Orbax keeps the last K.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=config.async_checkpointing,
            create=True,
        )
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: TrainState) -> TrainState:
        """The state at `step`, each array placed with the sharding of `abstract_state`'s leaves."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return restored.state

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> bool:
        """Save `step` unless it is already saved (e.g. a SIGTERM right after a periodic save)."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def merge_for_fine_tuning(fresh: dict[str, Any], loaded: dict[str, Any], source: str) -> dict[str, Any]:
    """Loaded weights over a fresh init: every variable must match, except the head, which is re-initialized
    when the class count differs. Anything else that differs is an error naming the variables."""
    fresh_flat = flatten(fresh)
    loaded_flat = flatten(loaded)
    missing = [k for k in fresh_flat if k not in loaded_flat]
    unexpected = [k for k in loaded_flat if k not in fresh_flat and not is_head(k)]
    reshaped = [k for k in fresh_flat if k in loaded_flat and np.shape(loaded_flat[k]) != np.shape(fresh_flat[k])]
    reinit_head = [k for k in missing + reshaped if is_head(k)]
    problems = [k for k in missing + reshaped if not is_head(k)] + unexpected
    if problems:
        raise ValueError(
            f"init_from={source} does not fit the configured model ({len(problems)} variables differ): "
            + ", ".join("/".join(k) for k in problems[:10])
            + (" ..." if len(problems) > 10 else "")
            + ". Check config.model_name and the QKV options against the checkpoint's."
        )
    if reinit_head:
        logging.info("init_from: re-initialized the classifier head (class count differs from %s).", source)
    merged = {k: (fresh_flat[k] if k in reinit_head else loaded_flat[k]) for k in fresh_flat}
    return unflatten(merged)


def is_head(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[1] == HEAD
