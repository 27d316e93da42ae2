"""Orbax checkpoints of a run: exact resume, surviving kills and damaged files (weights to start a fine-tuning
run from are read by qkv_vit/weights.py).

A run's checkpoints live in WORKDIR/checkpoints/<step>/ with two items: `state` (the TrainState) and
`meta` (JSON, "the step record": the step, the images seen and the run's record, run_record.RunRecord). Orbax
writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a killed save never leaves a step that looks finished; what it leaves is
removed when the next run opens the directory. A step that fails to read back (truncated or missing files,
garbage metadata) is skipped for the previous one and renamed `<step>.corrupt-<time>`: never deleted, and
out of the way of the resumed run, which saves that step number again. The first checkpoint a process writes
is read back (one scalar, through the same storage layers as a restore) before training goes on, so no run
carries on for hours with checkpoints that can never restore.
"""

import errno
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from qkv_vit.errors import CheckpointError, ConfigError, describe_cause
from qkv_vit.paths import PathLike, as_path
from qkv_vit.train.state import TrainState

CORRUPT_INFIX = ".corrupt-"
REMOVAL_QUIET_S, REMOVAL_TIMEOUT_S = 0.5, 60.0  # see remove_unfinished_saves


class RunCheckpoints:
    """The run's own checkpoints: save every N steps and at the end, keep the last K, resume the latest good one."""

    def __init__(self, workdir: PathLike, config: ml_collections.ConfigDict):
        # The trainer decides when to save (every N steps, at the end, on preemption); Orbax keeps the last K.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=config.async_checkpointing,
            create=True,
        )
        self.directory = as_path(workdir) / "checkpoints"
        if jax.process_index() == 0:
            remove_unfinished_saves(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )
        self.writing_step: int | None = None  # the save in flight, named if it fails
        self.read_back = False  # whether a checkpoint this process wrote was read back

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def last_complete(self) -> int | None:
        """The newest step whose save is complete on disk, once the save in flight has ended (a failed one does
        not count): the step a rerun resumes from."""
        try:
            self.wait()
        except CheckpointError:
            pass  # save_failed has removed what it left
        self.manager.reload()
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """(state, step record) at `step`, each array placed with the sharding of `abstract_state`'s leaves."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        if restored.meta.get("step") != step or int(restored.state.step) != step:
            raise ValueError(f"directory {step} holds step {restored.meta.get('step')}/{int(restored.state.step)}")
        return restored.state, restored.meta

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest checkpoint that reads back whole, as (state, step record); None when there is none.

        Unreadable newer ones are reported, and set aside once an older one restores; if none restores,
        nothing is moved and the error lists them all.
        """
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            self.check_fits(step, abstract_state)
            try:
                state, record = self.restore(step, abstract_state)
                error = None
            except Exception as caught:  # Orbax and TensorStore raise many types for missing or truncated files
                error = caught
            if all_processes_agree(error is None):
                self.set_aside([bad for bad, _ in unreadable])
                return state, record
            error = error or RuntimeError("another process could not read it")
            logging.warning(
                "Checkpoint %s cannot be read (%s); trying the previous one.",
                self.directory / str(step),
                describe_cause(error),
            )
            unreadable.append((step, error))
        if unreadable:
            listed = "; ".join(f"step {step}: {describe_cause(error)}" for step, error in unreadable)
            raise CheckpointError(
                f"No checkpoint in {self.directory} can be read ({listed}). Nothing was deleted or moved. To start "
                f"over, move {self.directory} away; to resume from a copy, put it there."
            )
        return None

    def check_fits(self, step: int, abstract_state: TrainState) -> None:
        """A readable checkpoint of arrays other than this config's is a config mistake, not damage: say so."""
        try:
            metadata = self.manager.item_metadata(step).state
        except Exception:  # unreadable metadata: restore() fails too and reports the damage
            return
        saved, wanted = array_signature(getattr(metadata, "tree", metadata)), array_signature(abstract_state)
        if saved and saved != wanted:
            raise ConfigError(
                f"The checkpoints in {self.directory} (step {step}: {len(saved)} arrays) do not fit this config's model "
                f"and optimizer ({len(wanted)} arrays, or other shapes): this workdir belongs to another configuration "
                f"(see its config.json). Use a new --workdir, or the config that started this run."
            )

    def set_aside(self, steps: list[int]) -> None:
        """Rename unreadable steps to <step>.corrupt-<time>: kept for inspection, invisible to Orbax."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = self.directory / f"{step}{CORRUPT_INFIX}{stamp}"
                (self.directory / str(step)).rename(target)
                logging.warning("Moved the unreadable checkpoint of step %d to %s (delete it when done).", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("qkv_vit: unreadable checkpoints set aside")
        self.manager.reload()

    def save(self, step: int, state: TrainState, record: dict[str, Any]) -> bool:
        """Save `step` unless it is already saved (e.g. a SIGTERM right after a periodic save)."""
        if step in self.manager.all_steps():
            return False
        self.wait()  # the previous save's failure is reported as that step's, not this one's
        self.writing_step = step
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)),
                force=True,
            )
        except Exception as error:  # full disk, permissions, a vanished directory: whatever the storage says
            raise self.save_failed(error) from error
        if not self.read_back:
            self.wait()
            self.check_readable(step)
            self.read_back = True
        return saved

    def check_readable(self, step: int) -> None:
        """Read the step's `step` scalar back, which opens the checkpoint's array store as a restore does;
        CheckpointError if that fails (e.g. Orbax merged no per-process files, as under a glob-like path)."""
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                self.directory / str(step) / "state",
                args=ocp.args.PyTreeRestore(
                    item={"step": 0},
                    partial_restore=True,
                    restore_args={"step": ocp.RestoreArgs(restore_type=np.ndarray)},
                ),
            )
            error = None if int(restored["step"]) == step else ValueError(f"it holds step {int(restored['step'])}")
        except Exception as caught:  # TensorStore and Orbax raise many types for what they cannot open
            error = caught
        if error is not None:
            raise CheckpointError(
                f"The checkpoint of step {step} was written to {self.directory} but cannot be read back "
                f"({describe_cause(error)}), so the run stops rather than train on with checkpoints that could never "
                "resume. Check the workdir's storage (free space, permissions, a file system Orbax supports) and rerun."
            )

    def wait(self) -> None:
        """Block until the save in flight is on disk; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self.save_failed(error) from error
        self.writing_step = None

    def save_failed(self, error: Exception) -> CheckpointError:
        step, self.writing_step = self.writing_step, None
        if jax.process_index() == 0:
            remove_unfinished_saves(self.directory)  # give back the space the partial write took
        self.manager.reload()  # Orbax forgets steps it meant to delete after the failed one: read the disk again
        latest = self.manager.latest_step()
        kept = f"step {latest}, is intact" if latest is not None else "none: there is no earlier checkpoint"
        return CheckpointError(
            f"Could not write the checkpoint of step {step} to {self.directory} ({describe_cause(error)}). "
            f"The last complete checkpoint, {kept}. Free disk space or fix the directory's permissions, then rerun "
            "the same command to resume."
        )

    def close(self) -> None:
        """Wait for the save in flight (CheckpointError if it failed), then stop Orbax's threads."""
        try:
            self.wait()
        finally:
            self.manager.close()


def remove_unfinished_saves(directory: epath.Path) -> None:
    """Delete what killed or failed saves left (Orbax's temporary step directories); finished steps stay.

    When one part of a save fails, Orbax reports it while the other parts may still be writing their files, and
    TensorStore recreates the directories it writes into: a removal is repeated until the path stays gone for
    REMOVAL_QUIET_S, for up to REMOVAL_TIMEOUT_S; what still remains then is removed by the next run's start.
    """
    for unfinished in ocp.path.step.all_temporary_paths(directory):
        path = epath.Path(unfinished.get())
        logging.warning("Removing %s: an unfinished checkpoint write (the run was killed or the write failed).", path)
        deadline = time.monotonic() + REMOVAL_TIMEOUT_S
        try:
            while not removed_for_good(path):
                if time.monotonic() > deadline:
                    logging.warning("Could not remove %s yet (writes still in flight); the next run removes it.", path)
                    break
        except OSError as error:  # permissions, a read-only disk: waiting will not help
            logging.warning("Could not remove %s (%s); remove it by hand (the run goes on without it).", path, error)


def removed_for_good(path: epath.Path) -> bool:
    """Remove `path`; True if it is still absent REMOVAL_QUIET_S later. OSError for a failure other than a write in
    flight changing the tree meanwhile."""
    try:
        path.rmtree(missing_ok=True)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.ENOENT):  # not a file appearing or vanishing meanwhile
            raise
    time.sleep(REMOVAL_QUIET_S)
    return not path.exists()


def array_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """The sorted (shape, dtype) of every array: equal for the same model and optimizer, whatever the names."""
    return sorted((tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


def all_processes_agree(ok: bool) -> bool:
    """True if `ok` on every process: all restore the same step, or none does."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
