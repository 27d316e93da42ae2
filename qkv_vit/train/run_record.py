"""What a workdir's records say its checkpoints were trained with, and what a rerun of the workdir may change.

Every checkpoint's step record holds the run's RunRecord: its whole config (as config.json has it), and model.json's
summary with the class names of its train data. A rerun that resumes, or finds the run finished, compares its own
record with the one of the checkpoint it restored (check_resume):

- a key in RESULT_NEUTRAL (how often the run logs, evaluates and saves, how it is laid out on the devices, where
  it finds its files) may differ: the run goes on under the new value with a warning that lists the changes;
- what a step means (STEP_MEANING: the batch, accumulation and run length) is checked apart (check_step_meaning: a
  longer run continues, one that would end at or before the checkpoint is refused, so is another batch);
- any other key (seed, optimizer, augmentation, model, data, ...) changes what is trained: the rerun
  is refused with a ConfigError naming each key with both values, unless `allow_config_change` is given; then
  the run continues under the new config from the checkpoint on, and WORKDIR/config_changes.jsonl records the
  step and the changes.

A run is described once, by a `RunRecord` made from its config, model and data: config.json is its config,
model.json the rest of it, and each checkpoint's step record all of it with the step. config.json and model.json
are rewritten only by a run that then trains or evaluates, so a workdir's records always describe the settings its
checkpoints were trained with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from typing import Any

import ml_collections

from qkv_vit.data.info import DatasetInfo
from qkv_vit.errors import ConfigError

# Keys (or groups of keys) that change how a run is carried out or recorded, never the parameters it trains:
# each with why, as the documentation lists them.
RESULT_NEUTRAL = {
    "log_every_steps": "how often training metrics are logged",
    "eval_every_steps": "how often the run evaluates",
    "eval_batch_size": "the evaluation's batch size (every example counts once at any size)",
    "eval_name": "the name the evaluation's metrics are written under",
    "evaluators": "what else the run evaluates, and how often",
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
# each. A rerun is checked against them apart (check_step_meaning): a longer run continues, another batch or
# accumulation is refused, --allow_config_change or not.
STEP_MEANING = {
    "global_batch_size": "global_batch_size",
    "accumulation_steps": "optimizer.accumulation_steps",
    "total_steps": "total_steps",
}
STEP_MEANING_KEYS = (*STEP_MEANING.values(), "total_epochs")  # the config keys that set them (epochs give steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunRecord:
    """What a run is, derived once from its config, model and data; the workdir's records are views of it:
    config.json is `config`, model.json `summary()`, a checkpoint's step record `step_record(step)`."""

    config: dict[str, Any]  # the whole config, as JSON (tuples as lists)
    architecture: dict[str, Any]  # XCiT's options as JSON, the layers and dtype by name (models.architecture_of)
    num_params: int
    total_steps: int
    data: dict[str, Any]  # source, train/eval split, their example counts, class names

    @classmethod
    def of(
        cls,
        config: ml_collections.ConfigDict,
        architecture: dict[str, Any],
        num_params: int,
        total_steps: int,
        info: DatasetInfo,
    ) -> RunRecord:
        data = {
            "source": info.description,
            "train_split": info.train_split,
            "train_examples": info.train_examples,
            "class_names": info.class_names,
            "eval_split": info.eval_split,
            "eval_examples": info.eval_examples,
        }
        return cls(
            config=config_record(config),
            architecture=architecture,
            num_params=num_params,
            total_steps=total_steps,
            data=data,
        )

    @classmethod
    def from_step_record(cls, saved: dict[str, Any], checkpoints: str) -> RunRecord:
        """The record a checkpoint was saved with; ConfigError for one that records no run."""
        try:
            return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls)})
        except KeyError as error:
            raise ConfigError(
                f"The checkpoint of step {saved.get('step')} in {checkpoints} records no {error} of its run (an "
                "earlier version of qkv_vit wrote it), so it cannot be checked against this config: start a new "
                f"--workdir, with --config.init_from=<that step's directory> to begin from its weights."
            ) from None

    def summary(self) -> dict[str, Any]:
        """model.json: what the run trains and evaluates on, for tools that read workdirs (e.g. a results table)."""
        return {
            "model_name": self.config["model_name"],
            "qkv": self.config["qkv"],
            "architecture": self.architecture,
            "num_params": self.num_params,
            "total_steps": self.total_steps,
            "data": self.data,
        }

    def step_record(self, step: int) -> dict[str, Any]:
        """A checkpoint's JSON item: the step, the images seen to it, model.json's summary and the config."""
        images_seen = step * self.config["global_batch_size"]
        return {"step": step, "images_seen": images_seen, **self.summary(), "config": self.config}

    def step_meaning(self) -> dict[str, int]:
        """STEP_MEANING's values: the images per step and per update, and the run's length in steps."""
        return {
            "global_batch_size": self.config["global_batch_size"],
            "accumulation_steps": self.config["optimizer"]["accumulation_steps"],
            "total_steps": self.total_steps,
        }


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


def changes(recorded: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded value, new value)} for every key both configs (config_record) have that differs. A key only
    one of them has (a key a later version added) is not compared."""
    before, now = flatten(recorded), flatten(config)
    return {key: (before[key], now[key]) for key in now if key in before and before[key] != now[key]}


def result_changes(changed: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes that change what is trained: neither RESULT_NEUTRAL nor what a step means (checked apart)."""
    return {key: values for key, values in changed.items() if not is_neutral(key) and key not in STEP_MEANING_KEYS}


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


def check_resume(
    now: RunRecord, saved: dict[str, Any], checkpoints: str, workdir: str, allow_config_change: bool
) -> dict[str, tuple[Any, Any]]:
    """This run against the step record `saved` of the checkpoint it restored from `checkpoints`: what a step
    means, the config and the classes (ConfigError for a change that is refused, a warning for the others).
    Returns the config changes allowed by `allow_config_change`: {key: (then, now)}."""
    then = RunRecord.from_step_record(saved, checkpoints)
    step = saved["step"]
    check_step_meaning(now, then, step, checkpoints, workdir)
    allowed = check_config_changes(now, then, step, checkpoints, workdir, allow_config_change)
    check_class_names(then.data["class_names"], now.data["class_names"], checkpoints, now.data["source"])
    if then.data["train_examples"] != now.data["train_examples"]:
        logging.warning(
            "The train split has %d examples now but had %d when step %d was saved (files added or removed?): "
            "training goes on with the current data, so this run will not equal an uninterrupted one.",
            now.data["train_examples"],
            then.data["train_examples"],
            step,
        )
    return allowed


def check_step_meaning(now: RunRecord, then: RunRecord, step: int, checkpoints: str, workdir: str) -> None:
    """A checkpoint's step must keep its meaning under this config (e.g. a job requeued with another batch).

    Another global batch or accumulation: ConfigError (the step would stand for other images and updates). Another
    length: a warning if the run still has steps to go (the schedule follows the new length from here on, as when a
    finished run is extended), a ConfigError if the checkpoint is already at or past the new end (the run would stop
    there as "finished").
    """
    before, after = then.step_meaning(), now.step_meaning()
    changed = {key: (before[key], after[key]) for key in STEP_MEANING if before[key] != after[key]}
    if not changed:
        return
    if set(changed) == {"total_steps"} and step < now.total_steps:
        logging.warning(
            "This run is now %d steps long, but %d when step %d was saved%s: it continues to step %d, with "
            "the learning-rate schedule of the new length from step %d on.",
            now.total_steps,
            then.total_steps,
            step,
            data_changed_note(now, then),
            now.total_steps,
            step + 1,
        )
        return
    raise ConfigError(
        f"The checkpoints in {checkpoints} were made with "
        + ", ".join(f"{key}={saved}" for key, (saved, _) in changed.items())
        + f" (step {step}: {step * before['global_batch_size']} images seen), but this config gives "
        + ", ".join(f"{key}={new}" for key, (_, new) in changed.items())
        + data_changed_note(now, then)
        + (
            f", which would end the run at step {now.total_steps}, before or at the checkpoint"
            if set(changed) == {"total_steps"}
            else ", under which their step would mean other images and updates"
        )
        + ". Rerun with "
        + " ".join(f"--config.{STEP_MEANING[key]}={saved}" for key, (saved, _) in changed.items())
        + f" to resume, or start a new --workdir (with --config.init_from={workdir} to begin from these weights)."
    )


def data_changed_note(now: RunRecord, then: RunRecord) -> str:
    if then.data["train_examples"] == now.data["train_examples"]:
        return ""
    return f" (the train split has {now.data['train_examples']} examples now, {then.data['train_examples']} then)"


def check_config_changes(
    now: RunRecord, then: RunRecord, step: int, checkpoints: str, workdir: str, allow_config_change: bool
) -> dict[str, tuple[Any, Any]]:
    """The rerun's config against the one the checkpoint was trained with: changes that change what is trained are
    refused unless allowed; the others are logged. Returns the allowed changes."""
    changed = changes(then.config, now.config)
    result = result_changes(changed)
    if result and not allow_config_change:
        refuse_result_changes(result, checkpoints, step, step >= now.total_steps, workdir)
    neutral = neutral_changes(changed)
    if neutral:
        logging.warning(
            "Changed since step %d, without changing what is trained: %s (then %s); the run goes on with them.",
            step,
            listed(neutral, 1),
            listed(neutral, 0),
        )
    if result:
        logging.warning(
            "--allow_config_change: from step %d on this run trains with %s instead of %s (config.json records the "
            "new values, config_changes.jsonl the change).",
            step,
            listed(result, 1),
            listed(result, 0),
        )
    return result
