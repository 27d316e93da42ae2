"""What a workdir's records say its checkpoints were trained with, and what a rerun of the workdir may change.

Every checkpoint's step record holds the run's whole config (as config.json has it) and the class names of its
train data. A rerun that resumes, or finds the run finished, compares its own config with the record of the
checkpoint it restored (config.json for checkpoints from before configs were recorded):

- a key in RESULT_NEUTRAL (how often the run logs, evaluates and saves, how it is laid out on the devices, where
  it finds its files) may differ: the run goes on under the new value with a warning that lists the changes;
- what a step means (RUN_DEFINITION: the batch, accumulation and run length) is checked apart (trainer: a
  longer run continues, one that would end at or before the checkpoint is refused, so is another batch);
- any other key (seed, optimizer, augmentation, model, data, ...) changes what is trained: the rerun
  is refused with a ConfigError naming each key with both values, unless `allow_config_change` is given; then
  the run continues under the new config from the checkpoint on, and WORKDIR/config_changes.jsonl records the
  step and the changes.

config.json and model.json are rewritten only by a run that then trains or evaluates, so a workdir's records
always describe the settings its checkpoints were trained with.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import ml_collections

from qkv_vit.errors import ConfigError

# Keys (or groups of keys) that change how a run is carried out or recorded, never the parameters it trains:
# each with why, as the documentation lists them.
RESULT_NEUTRAL = {
    "log_every_steps": "how often training metrics are logged",
    "eval_every_steps": "how often the run evaluates",
    "eval_batch_size": "the evaluation's batch size (every example counts once at any size)",
    "eval_name": "the name the evaluation's metrics are written under",
    "checkpoint_every_steps": "how often checkpoints are written",
    "keep_checkpoints": "how many checkpoints are kept",
    "async_checkpointing": "whether checkpoints are written in the background",
    "mesh": "how the devices are arranged (the same global batch on other devices)",
    "sharding": "how parameters are laid out on the devices",
    "model.layer_impl": "which implementation computes the same layers (models/registry.py)",
    "data.data_dir": "where the tfds data are (the data set's name and version say which data they are)",
    "data.cache_dir": "where the data cache is",
    "data.placement": "whether the in-memory train split sits on the host or the devices (the same batches)",
    "data.num_parallel_calls": "tf.data's parallelism (deterministic either way)",
    "data.prefetch": "how many batches tf.data prepares ahead",
    "data.bad_files": "whether unreadable files are skipped or an error (the same files are read either way)",
}
# What a step number means: the images per step and per update, and the schedule's length; the flag that restores
# each. A rerun is checked against them apart (trainer.check_same_run_definition): a longer run continues, another
# batch or accumulation is refused, --allow_config_change or not.
RUN_DEFINITION = {
    "global_batch_size": "global_batch_size",
    "accumulation_steps": "optimizer.accumulation_steps",
    "total_steps": "total_steps",
}
STEP_MEANING = (*RUN_DEFINITION.values(), "total_epochs")  # the config keys of RUN_DEFINITION (epochs give steps)


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json and the step record hold it (JSON: tuples as lists)."""
    return json.loads(config.to_json_best_effort())


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 1}} -> {"optimizer.lr": 1}."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_neutral(key: str) -> bool:
    return any(key == neutral or key.startswith(f"{neutral}.") for neutral in RESULT_NEUTRAL)


def changes(recorded: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded value, new value)} for every key both have that differs. A key only one of them has (a
    key a later version added) is not compared."""
    before, now = flatten(recorded), flatten(config_record(config))
    return {key: (before[key], now[key]) for key in now if key in before and before[key] != now[key]}


def result_changes(changed: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes that change what is trained: neither RESULT_NEUTRAL nor what a step means (checked apart)."""
    return {key: values for key, values in changed.items() if not is_neutral(key) and key not in STEP_MEANING}


def neutral_changes(changed: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    return {key: values for key, values in changed.items() if is_neutral(key)}


def listed(changed: dict[str, tuple[Any, Any]], which: int) -> str:
    """ "seed=0, optimizer.lr=0.002": the recorded (which=0) or new (which=1) value of each changed key."""
    return ", ".join(f"{key}={json.dumps(values[which])}" for key, values in changed.items())


def refuse_result_changes(
    changed: dict[str, tuple[Any, Any]], checkpoints: str, step: int, finished: bool, workdir: str
) -> None:
    """ConfigError for a rerun whose config changes what is trained (result_changes), with every way out."""
    if not changed:
        return
    restore = " ".join(restore_flag(key, old) for key, (old, _) in changed.items())
    where = (
        f"the run finished at step {step}, so nothing would be trained with them"
        if finished
        else f"the run would go on from step {step} under them"
    )
    raise ConfigError(
        f"The checkpoints in {checkpoints} were trained with {listed(changed, 0)}, but this command gives "
        f"{listed(changed, 1)}: these change what is trained, and {where}. Start a new --workdir for the new "
        f"settings (with --config.init_from={workdir} to begin from these weights), rerun with the recorded values "
        f"({restore}), or pass --allow_config_change to continue this run under the new "
        "settings (recorded in config_changes.jsonl)."
    )


def restore_flag(key: str, value: Any) -> str:
    """The command-line flag that sets `key` back to its recorded JSON `value`, quoted for a shell."""
    if value is None:
        return f"no --config.{key}"  # a placeholder left unset: a flag cannot set None
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):  # a tuple in the config
        text = "(" + ", ".join(json.dumps(item) for item in value) + ("," if len(value) == 1 else "") + ")"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    return f"--config.{key}={shlex.quote(text)}"


def check_class_names(recorded: list[str] | None, now: list[str], checkpoints: str, data: str) -> None:
    """ConfigError when the data's classes are not the ones the checkpoints were trained with: label i would mean
    another class under the trained head (class folders renamed, re-cased, added or removed)."""
    if recorded is None or list(recorded) == list(now):
        return
    then, found = compared_classes(recorded, now)
    raise ConfigError(
        f"The checkpoints in {checkpoints} were trained on the classes {then}, but {data} now has {found}: resuming would train and evaluate the head under labels that mean "
        "other classes. Give the class folders their names back, or start a new --workdir (with config.init_from "
        "set to this workdir to fine-tune from its weights)."
    )


def compared_classes(recorded: list[str], now: list[str]) -> tuple[str, str]:
    """Two class lists for a message: each whole when short, else its length and its names from the first label
    where they differ on."""
    first = next((i for i, (a, b) in enumerate(zip(recorded, now)) if a != b), min(len(recorded), len(now)))

    def shown(names: list[str]) -> str:
        if len(names) <= 8:
            return str(list(names))
        return f"{len(names)} names, {list(names[first : first + 3])} from label {first} on"

    return shown(recorded), shown(now)
