"""The workdir before and while a run writes to it: a path its checkpoints can be read back from, writable before any
work starts, and the records that describe what its checkpoints were trained with (run_record)."""

import json
import os
from typing import Any

import jax
from etils import epath

from qkv_vit.errors import CheckpointError, ConfigError, describe_cause
from qkv_vit.train.run_record import RunRecord

# Characters the checkpoint layers read as something else: Orbax finds a checkpoint's per-process files by a glob
# pattern built from the path (so with [ ] * ? a checkpoint saves but can never be read back, field case 16), and
# TensorStore reads a backslash as a path separator (the arrays land in another directory).
UNSAFE_PATH_CHARACTERS = "[]*?\\"


def check_workdir_path(workdir: epath.Path) -> None:
    """ConfigError for a workdir path whose checkpoints could not be read back (UNSAFE_PATH_CHARACTERS)."""
    found = sorted({character for character in str(workdir) if character in UNSAFE_PATH_CHARACTERS})
    if found:
        raise ConfigError(
            f"The workdir {workdir} has {' '.join(found)} in its path (the current directory counts for a relative "
            "--workdir). Orbax reads [ ] * ? as glob patterns and TensorStore a backslash as a separator when they "
            "write a checkpoint, which could then never be restored: choose a --workdir whose full path has none of "
            "[ ] * ? \\."
        )


def prepare_workdir(workdir: epath.Path) -> None:
    """Create the workdir and write to it once, so a bad path fails now rather than at the first checkpoint."""
    probe = workdir / f".write-probe-{jax.process_index()}-{os.getpid()}"  # two runs at once probe apart
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except Exception as error:  # OSError locally; cloud file systems raise their own types
        reason = error.strerror if isinstance(error, OSError) and error.strerror else describe_cause(error)
        raise CheckpointError(
            f"Cannot write to the workdir {workdir}: {reason}. Choose a writable --workdir, "
            "or fix its permissions or free space."
        ) from error


def write_run_records(
    workdir: epath.Path, record: RunRecord, step: int, config_changes: dict[str, tuple[Any, Any]]
) -> None:
    """config.json and model.json (views of `record`), and for a run continued under a changed config, its line in
    config_changes.jsonl."""
    (workdir / "config.json").write_text(json.dumps(record.config, indent=2))
    (workdir / "model.json").write_text(json.dumps(record.summary(), indent=2))
    if config_changes:
        line = {"step": step, "changes": {key: list(values) for key, values in config_changes.items()}}
        with (workdir / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


def write_failure(workdir: epath.Path, last_complete: int | None, cause: str, error: BaseException) -> str:
    """The message of a failed write to the workdir: the cause and the checkpoint a rerun resumes from."""
    return (
        f"Writing to the workdir {workdir} failed ({cause}; {describe_cause(error)}). The last complete "
        f"checkpoint is step {last_complete}; free disk space or fix permissions, then rerun the "
        "same command to resume from it."
    )
