"""train_and_evaluate(config, workdir): set up, resume or initialize, train, evaluate, checkpoint.

Resume order: the workdir's own newest readable checkpoint > config.init_from (fine-tuning) > a fresh init.
Mistakes in the config, the data or the workdir raise ConfigError / DataConfigError / CheckpointError before
anything compiles (README: "What happens when things go wrong"). A checkpoint records what its step means
(global batch, accumulation, run length, images seen): a rerun that would give the step another meaning is
refused. The final state is saved before the final evaluation, and a rerun of a run whose final evaluation
did not complete only evaluates.
"""

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from qkv_vit import data, models
from qkv_vit.errors import CheckpointError, ConfigError, describe_cause, storage_failures
from qkv_vit.paths import PathLike, as_path, is_local
from qkv_vit.train import device_data, run_record, sharding, steps
from qkv_vit.train.checkpointing import RunCheckpoints, all_processes_agree
from qkv_vit.train.config import COMPUTE_DTYPES, check_config
from qkv_vit.train.finishing import BatchFinishing
from qkv_vit.train.logging_utils import (
    ScalarWriter,
    create_writer,
    log_file_name,
    read_metrics,
    workdir_log,
    writes_tensorboard,
)
from qkv_vit.train.optimizer import learning_rate, make_optimizer
from qkv_vit.train.preemption import PreemptionWatcher
from qkv_vit.train.state import TrainState
from qkv_vit.train.workdir_lock import workdir_lock
from qkv_vit.weights import check_fine_tuning_fit, merge_for_fine_tuning, read_architecture, read_weights

try:
    from clu import periodic_actions
except ImportError:  # clu needs TensorFlow; without them there is no clu progress report (our own log line stays)
    periodic_actions = None

DEVICE_PREFETCH = 2  # batches on their way to the devices ahead of the step


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the checkpoint of the current step is safely written."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf (config.nonfinite="stop")."""


@dataclasses.dataclass
class Run:
    """Everything fixed for the whole run, derived once from the config."""

    config: ml_collections.ConfigDict
    workdir: epath.Path | None  # a local directory or a URL such as gs://bucket/run
    # The train and eval splits, read from config.data: a data.Source, or an ArraySource for source="in_memory"
    # (None: no data, see build_run).
    source: Any
    num_train_examples: int
    model: models.XCiT
    mesh: jax.sharding.Mesh
    total_steps: int
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    init_state: Callable[[], TrainState]  # a fresh initialization
    abstract_state: TrainState  # of jax.ShapeDtypeStruct
    state_sharding: TrainState  # of jax.sharding.NamedSharding
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # (state, batch) -> (state, metrics)
    eval_step: Callable[[Any, Any, dict], dict]  # (params, batch_stats, batch) -> sums of top1, top5, loss, count


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: PathLike, allow_config_change: bool = False
) -> TrainState:
    """Train to config.total_steps (or total_epochs), resuming from WORKDIR/checkpoints if present.

    A rerun whose config changes what the checkpoints were trained with is a ConfigError unless
    `allow_config_change` (qkv_vit.train.run_record); a workdir another run holds is a ConfigError.
    """
    workdir = as_path(workdir)
    check_config(config)  # every value's type, length and range
    model = build_model(config, config.data.num_classes)  # errors in model options before any data is read
    validate_run_config(config, model)
    check_workdir_path(workdir)
    prepare_workdir(workdir)
    with workdir_lock(workdir, jax.process_index()), workdir_log(workdir):
        return train_in_workdir(config, workdir, model, allow_config_change)


def train_in_workdir(
    config: ml_collections.ConfigDict, workdir: epath.Path, model: models.XCiT, allow_config_change: bool = False
) -> TrainState:
    """train_and_evaluate once the config and model are checked and the workdir is writable and locked."""
    run = setup_run(config, workdir, model)
    log_data_summary(run)
    checkpoints = RunCheckpoints(workdir, config)
    with finally_calling(checkpoints.close):  # waits for the save in flight
        state, config_changes = initial_state(run, checkpoints, allow_config_change)
        if int(state.step) >= run.total_steps and final_evaluation_recorded(run, int(state.step)):
            logging.info("The run in %s already finished at step %d; nothing to do.", workdir, int(state.step))
            return state  # before the records and the writer: nothing was trained with this config
        # Metrics, event and log files meet a full or read-only disk too, often before a checkpoint does.
        # TensorFlow's event writer raises its own types, wrapping the OSError's words (storage_cause reads them).
        with storage_failures(lambda cause, error: workdir_failure(run, checkpoints, cause, error)):
            if jax.process_index() == 0:  # only a run that trains or evaluates: the records describe the checkpoints
                write_run_records(run, int(state.step), config_changes)
            writer = create_writer(workdir)
            with finally_calling(writer.flush):
                state = train_loop(run, state, checkpoints, writer)
        log_results(run)
        return state


@contextlib.contextmanager
def finally_calling(close: Callable[[], None]) -> Iterator[None]:
    """Call `close` when the block ends; when the block fails, without letting a second failure in `close`
    replace the block's own error."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            close()
        raise
    close()


def workdir_failure(run: Run, checkpoints: RunCheckpoints, cause: str, error: BaseException) -> str:
    """The message of a failed write to the workdir: the cause and the checkpoint a rerun resumes from."""
    return (
        f"Writing to the workdir {run.workdir} failed ({cause}; {describe_cause(error)}). The last complete "
        f"checkpoint is step {checkpoints.last_complete()}; free disk space or fix permissions, then rerun the "
        "same command to resume from it."
    )


def write_run_records(run: Run, step: int, config_changes: dict[str, tuple[Any, Any]]) -> None:
    """config.json and model.json, and for a run continued under a changed config, its line in config_changes.jsonl."""
    workdir = run.workdir
    (workdir / "config.json").write_text(run.config.to_json_best_effort(indent=2))
    (workdir / "model.json").write_text(json.dumps(model_summary(run), indent=2))
    if config_changes:
        line = {"step": step, "changes": {key: list(values) for key, values in config_changes.items()}}
        with (workdir / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


@contextlib.contextmanager
def config_mistakes(keys: str):
    """A ValueError raised while building from the config values `keys` is a mistake in them: a ConfigError."""
    try:
        yield
    except ConfigError:  # DataConfigError and WeightMismatchError included
        raise
    except ValueError as error:
        raise ConfigError(f"{error} Check {keys}.") from error


def build_model(config: ml_collections.ConfigDict, num_classes: int | None) -> models.XCiT:
    """config's XCiT; num_classes=None keeps the named model's (the data's count is set by setup_run). With
    config.model_from_init the architecture is the one recorded with config.init_from, config.model.* on top."""
    overrides = {key: value for key, value in config.model.items() if value is not None}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    shown = {key: value for key, value in overrides.items() if key != "num_classes"}
    if config.model_from_init:
        with config_mistakes(f"the architecture of config.init_from={config.init_from!r} and config.model: {shown}"):
            return models.from_architecture({**architecture_from_init(config), **overrides, "dtype": dtype})
    with config_mistakes(f"config.model_name={config.model_name!r}, config.qkv={config.qkv!r}, config.model: {shown}"):
        return models.create(config.model_name, qkv=config.qkv or None, dtype=dtype, **overrides)


# XCiT options that change no variable's shape: a checkpoint of one setting fits a model of another.
TRAINING_OPTIONS = (
    "num_classes",
    "dtype",
    "layer_impl",
    "batch_norm_group_size",
    "drop_rate",
    "pos_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
)


def architecture_from_init(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """XCiT's arguments recorded with config.init_from (converted weights, a run's model.json), without the
    class count (the data's) and the dtype (config.compute_dtype); ConfigError where none is recorded."""
    if not config.init_from:
        raise ConfigError(
            "config.model_from_init=true takes the architecture from config.init_from, which is unset: "
            "set --config.init_from=<converted weights or a run directory>."
        )
    try:
        stored = read_architecture(config.init_from)
    except FileNotFoundError as error:
        raise ConfigError(f"config.init_from: {error}") from error
    if stored is None:
        raise ConfigError(
            f"config.init_from={config.init_from} records no architecture (its run has no model.json): "
            "set config.model_name, config.qkv and config.model.* instead of config.model_from_init."
        )
    architecture = models.architecture_from_json(stored)
    logging.info(
        "Architecture from %s: %s.",
        config.init_from,
        {k: v for k, v in architecture.items() if k not in TRAINING_OPTIONS},
    )
    return {key: value for key, value in architecture.items() if key not in ("num_classes", "dtype")}


def architecture_difference(model: models.XCiT, stored: dict[str, Any] | None) -> str:
    """How a checkpoint's recorded architecture (`stored`, JSON) differs from `model`'s, and the flags that make
    them match; "" where nothing is recorded or nothing that shapes a variable differs."""
    configured = models.architecture_of(model)
    differ = {
        k: v for k, v in (stored or {}).items() if k in configured and k not in TRAINING_OPTIONS and v != configured[k]
    }
    if not differ:
        return ""
    return (
        "The checkpoint's architecture has "
        + ", ".join(f"{k}={v!r}" for k, v in differ.items())
        + " where the config has "
        + ", ".join(f"{k}={configured[k]!r}" for k in differ)
        + ": add "
        + " ".join(f"--config.model.{k}={v}" for k, v in differ.items())
        + ", or --config.model_from_init=true to take the whole architecture from it."
    )


def validate_run_config(config: ml_collections.ConfigDict, model: models.XCiT) -> None:
    """What the values' own rules (check_config) cannot see: how they fit the devices, the model and the mesh."""
    devices = jax.device_count()
    for name in ("global_batch_size", "eval_batch_size"):
        size = config.get(name)
        if size is not None and size % devices:
            raise ConfigError(
                f"config.{name}={size} is not divisible by the {devices} devices; use a multiple of {devices}."
            )
    group, per_device = model.batch_norm_group_size, config.global_batch_size // devices
    if group is not None and config.global_batch_size % group:
        raise ConfigError(
            f"config.model.batch_norm_group_size={group} does not divide config.global_batch_size="
            f"{config.global_batch_size}: BatchNorm normalizes groups of that many images of each batch."
        )
    if group is not None and per_device % group and group % per_device:
        logging.warning(
            "BatchNorm groups of %d images straddle the devices' shards of %d images: XLA gathers their "
            "activations across devices for every BatchNorm (slower). A group size that divides the "
            "per-device batch, or is a multiple of it, avoids that.",
            group,
            per_device,
        )
    augment = config.data.augment
    if per_device < 2 and augment.mix_prob > 0 and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0):
        logging.warning(
            "Each device mixes (mixup / cutmix) its own shard of the batch, and it holds %d image: nothing "
            "is mixed. Use a larger global batch, or fewer devices.",
            per_device,
        )
    if config.data.image_size % model.patch_size:
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} is not divisible by the patch size {model.patch_size}: "
            f"use a multiple of {model.patch_size}."
        )
    with config_mistakes(f"config.mesh={config.mesh.to_dict()}"):
        sharding.make_mesh(config.mesh)


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


def log_data_summary(run: Run) -> None:
    """What the run reads and evaluates on, and how many files the data set's conversion skipped as not images."""
    info = run.source.info(run.config.data.num_classes)
    logging.info(
        "Data: %s, %d train examples (split %r); evaluation on split %r (%d examples)%s.",
        run.config.data.source,
        info.train_examples,
        info.train_split,
        info.eval_split,
        info.eval_examples,
        f"; also present: {info.other_splits} (data.eval_split chooses)" if info.other_splits else "",
    )
    if info.train_eval_overlap:
        logging.warning(
            "The eval split %r shares %d examples with the train split %r (data.eval_split): the %s/* "
            "metrics include training images, so they are not held-out accuracy.",
            info.eval_split,
            info.train_eval_overlap,
            info.train_split,
            run.config.eval_name,
        )
    skipped = info.skipped_files
    if skipped:
        logging.warning(
            "Skipped %d unreadable or non-image files of %s (bad_files=%r), e.g. %s; all listed in %s.",
            skipped.count,
            run.config.data.path,
            run.config.data.bad_files,
            skipped.examples[:3],
            skipped.listed_in,
        )


def setup_run(config: ml_collections.ConfigDict, workdir: epath.Path, model: models.XCiT | None = None) -> Run:
    """The run's data source, model, schedule, optimizer, shardings and jitted steps (nothing compiled yet).
    `model`: config's model as build_model made it (None: built here); its class count becomes the data's
    unless config.data.num_classes sets one."""
    source = data.open_source(config.data)
    model = model if model is not None else build_model(config, config.data.num_classes)
    if config.data.num_classes is None and model.num_classes != source.num_classes:
        model = model.clone(num_classes=source.num_classes)
    return build_run(config, workdir, source, model)


def build_run(config: ml_collections.ConfigDict, workdir: epath.Path | None, source: Any, model: models.XCiT) -> Run:
    """setup_run on a given source and model; source None (e.g. a benchmark stepping on synthetic batches) reads
    no data."""
    num_classes = model.num_classes
    mesh = sharding.make_mesh(config.mesh)
    total_steps, warmup_steps = run_length(config)
    with config_mistakes("config.optimizer"):
        schedule = learning_rate(config.optimizer, config.global_batch_size, total_steps, warmup_steps)
        optimizer = make_optimizer(config.optimizer, schedule)
    jitted = steps.jit_steps(
        model,
        optimizer,
        schedule,
        mesh,
        seed=config.seed,
        image_size=config.data.image_size,
        ema_decay=config.ema_decay,
        sharding_strategy=config.sharding,
        accumulation_steps=config.optimizer.accumulation_steps,
        skip_nonfinite=config.nonfinite == "skip",
        finishing=BatchFinishing.from_config(config.data, num_classes),  # the data pipeline ships uint8 batches
    )
    num_train_examples = source.num_examples(source.train_split) if source else 0
    return Run(
        config,
        workdir,
        source,
        num_train_examples,
        model,
        mesh,
        total_steps,
        schedule,
        optimizer,
        jitted.init_state,
        jitted.abstract_state,
        jitted.state_sharding,
        jitted.batch_sharding,
        jitted.train_step,
        jitted.eval_step,
    )


def run_length(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(total steps, warmup steps): explicit step counts win over epochs."""
    steps_per_epoch = None
    if config.total_steps is None or config.optimizer.warmup_steps is None:
        steps_per_epoch = data.steps_per_epoch(config.data, config.global_batch_size)
    total = config.total_steps if config.total_steps is not None else round(config.total_epochs * steps_per_epoch)
    warmup = config.optimizer.warmup_steps
    if warmup is None:
        warmup = round(config.optimizer.warmup_epochs * steps_per_epoch)
    if total < 1:
        raise ConfigError(f"The run has {total} steps: set config.total_steps or config.total_epochs higher.")
    return total, warmup


def initial_state(
    run: Run, checkpoints: RunCheckpoints, allow_config_change: bool = False
) -> tuple[TrainState, dict[str, tuple[Any, Any]]]:
    """(the state to go on from, the config changes allowed since its checkpoint: {key: (then, now)})."""
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), run.abstract_state, run.state_sharding
    )
    restored = checkpoints.restore_latest(abstract)
    if restored is not None:
        state, saved_record = restored
        check_same_run_definition(run, saved_record, checkpoints)
        changes = check_same_config(run, saved_record, checkpoints, allow_config_change)
        run_record.check_class_names(
            saved_record.get("class_names"), run.source.class_names, str(checkpoints.directory), run.source.description
        )
        logging.info("Resuming from %s/%d.", checkpoints.directory, int(state.step))
        warn_if_data_changed(run, saved_record)
        return state, changes
    loaded = read_init_from(run) if run.config.init_from else None  # checked before the init compiles
    state = fresh_state(run)
    return (fine_tuning_state(run, state, loaded) if loaded is not None else state), {}


def check_same_config(
    run: Run, saved_record: dict[str, Any], checkpoints: RunCheckpoints, allow_config_change: bool
) -> dict[str, tuple[Any, Any]]:
    """The rerun's config against the one the checkpoint was trained with (run_record): changes that change what
    is trained are refused unless allowed; the others are logged. Returns the allowed changes."""
    recorded = saved_record.get("config") or recorded_config_json(run.workdir)
    if recorded is None:
        return {}
    changed = run_record.changes(recorded, run.config)
    step = saved_record["step"]
    result = run_record.result_changes(changed)
    if result and not allow_config_change:
        run_record.refuse_result_changes(
            result, str(checkpoints.directory), step, step >= run.total_steps, str(run.workdir)
        )
    neutral = run_record.neutral_changes(changed)
    if neutral:
        logging.warning(
            "Changed since step %d, without changing what is trained: %s (then %s); the run goes on with them.",
            step,
            run_record.listed(neutral, 1),
            run_record.listed(neutral, 0),
        )
    if result:
        logging.warning(
            "--allow_config_change: from step %d on this run trains with %s instead of %s (config.json records the "
            "new values, config_changes.jsonl the change).",
            step,
            run_record.listed(result, 1),
            run_record.listed(result, 0),
        )
    return result


def recorded_config_json(workdir: epath.Path) -> dict[str, Any] | None:
    """The workdir's config.json (what checkpoints from before configs were recorded were trained with)."""
    try:
        return json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return None


def run_definition(run: Run) -> dict[str, int]:
    config = run.config
    return {
        "global_batch_size": config.global_batch_size,
        "accumulation_steps": config.optimizer.accumulation_steps,
        "total_steps": run.total_steps,
    }


def check_same_run_definition(run: Run, saved_record: dict[str, Any], checkpoints: RunCheckpoints) -> None:
    """A checkpoint's step must keep its meaning under this config (e.g. a job requeued with another batch).

    Another global batch or accumulation: ConfigError (the step would stand for other images and updates). Another
    length: a warning if the run still has steps to go (the schedule follows the new length from here on, as when a
    finished run is extended), a ConfigError if the checkpoint is already at or past the new end (the run would stop
    there as "finished"). Checkpoints from before these values were recorded are checked against the run's
    config.json and model.json, which described them.
    """
    now, saved_record = run_definition(run), {**definition_from_run_files(run.workdir), **saved_record}
    changed = {
        key: (saved_record[key], now[key])
        for key in run_record.RUN_DEFINITION
        if saved_record.get(key) is not None and saved_record[key] != now[key]
    }
    step = saved_record["step"]
    if not changed:
        return
    if set(changed) == {"total_steps"} and step < run.total_steps:
        saved_total = changed["total_steps"][0]
        logging.warning(
            "This run is now %d steps long, but %d when step %d was saved%s: it continues to step %d, with "
            "the learning-rate schedule of the new length from step %d on.",
            run.total_steps,
            saved_total,
            step,
            data_changed_note(run, saved_record),
            run.total_steps,
            step + 1,
        )
        return
    seen = saved_record.get("images_seen", step * saved_record.get("global_batch_size", run.config.global_batch_size))
    raise ConfigError(
        f"The checkpoints in {checkpoints.directory} were made with "
        + ", ".join(f"{key}={saved}" for key, (saved, _) in changed.items())
        + f" (step {step}: {seen} images seen), but this config gives "
        + ", ".join(f"{key}={new}" for key, (_, new) in changed.items())
        + data_changed_note(run, saved_record)
        + (
            f", which would end the run at step {run.total_steps}, before or at the checkpoint"
            if set(changed) == {"total_steps"}
            else ", under which their step would mean other images and updates"
        )
        + ". Rerun with "
        + " ".join(f"--config.{run_record.RUN_DEFINITION[key]}={saved}" for key, (saved, _) in changed.items())
        + f" to resume, or start a new --workdir (with --config.init_from={run.workdir} to begin from these weights)."
    )


def definition_from_run_files(workdir: epath.Path) -> dict[str, int]:
    """run_record.RUN_DEFINITION's values as the workdir's config.json and model.json have them (runs saved before the
    checkpoints recorded them); {} where the files are absent or unreadable."""
    try:
        config = json.loads((workdir / "config.json").read_text())
        summary = json.loads((workdir / "model.json").read_text())
        definition = {
            "global_batch_size": config["global_batch_size"],
            "accumulation_steps": config["optimizer"]["accumulation_steps"],
            "total_steps": summary.get("total_steps"),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {key: value for key, value in definition.items() if value is not None}


def data_changed_note(run: Run, saved_record: dict[str, Any]) -> str:
    saved = saved_record.get("train_examples")
    if saved is None or saved == run.num_train_examples:
        return ""
    return f" (the train split has {run.num_train_examples} examples now, {saved} then)"


def warn_if_data_changed(run: Run, saved_record: dict[str, Any]) -> None:
    saved = saved_record.get("train_examples")
    if saved is not None and saved != run.num_train_examples:
        logging.warning(
            "The train split has %d examples now but had %d when step %d was saved (files added or removed?): "
            "training goes on with the current data, so this run will not equal an uninterrupted one.",
            run.num_train_examples,
            saved,
            saved_record["step"],
        )


def fresh_state(run: Run) -> TrainState:
    return jax.jit(run.init_state, out_shardings=run.state_sharding)()


def read_init_from(run: Run) -> dict[str, Any]:
    """config.init_from's variables, checked against the model's shapes (ConfigError naming what differs)."""
    source = run.config.init_from
    try:
        weights = read_weights(source, use_ema=run.config.init_from_ema)
    except FileNotFoundError as error:
        raise ConfigError(f"config.init_from: {error}") from error
    fresh = {"params": run.abstract_state.params, "batch_stats": run.abstract_state.batch_stats}
    try:
        reinitialized = check_fine_tuning_fit(fresh, weights.variables, source)
    except ConfigError as error:
        raise ConfigError(f"{error} {architecture_difference(run.model, weights.architecture)}".rstrip()) from error
    if not reinitialized and weights.class_names is not None and weights.class_names != run.source.class_names:
        logging.warning(
            "config.init_from=%s was trained on the classes %s, this data has %s: its head is kept, so its output "
            "i now stands for this data's class i (fine-tuning retrains it).",
            source,
            *run_record.compared_classes(weights.class_names, run.source.class_names),
        )
    return weights.variables


def fine_tuning_state(run: Run, state: TrainState, loaded: dict[str, Any]) -> TrainState:
    """Weights from config.init_from (never its optimizer state or step): the start of a fine-tuning run."""
    source = run.config.init_from
    fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    merged = merge_for_fine_tuning(fresh, loaded, source)
    logging.info("Initialized from %s.", source)
    params = jax.device_put(merged["params"], run.state_sharding.params)
    batch_stats = jax.device_put(merged["batch_stats"], run.state_sharding.batch_stats)
    ema = jax.device_put(merged["params"], run.state_sharding.ema_params) if state.ema_params is not None else None
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema)


def train_loop(run: Run, state: TrainState, checkpoints: RunCheckpoints, writer: ScalarWriter) -> TrainState:
    config, start, total = run.config, int(state.step), run.total_steps
    if start >= total:  # trained and saved, but the final evaluation did not complete (a crash, a kill)
        logging.info("The run in %s finished training at step %d; running its final evaluation.", run.workdir, start)
        log_eval(run, writer, start, state, build_eval_batches(config))
        return state
    train_batches = train_batch_stream(run, start)
    eval_batches = build_eval_batches(config)
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer) if periodic_actions else None
    pending, last_log = [], (start, time.perf_counter())
    with PreemptionWatcher(config.log_every_steps) as preemption:
        for step in range(start + 1, total + 1):
            state, metrics = run.train_step(state, next(train_batches))
            pending.append(metrics)
            if report:
                report(step)
            if step % config.log_every_steps == 0 or step == total:
                check_finite(run, state, checkpoints)
                last_log = log_train(run, writer, step, pending, last_log, state)
                pending = []
            # The checkpoint of a step goes before its evaluation, so a failing evaluation loses no training.
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step != total:
                check_finite(run, state, checkpoints)
                checkpoints.save(step, state, step_record(run, step))
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step != total:
                log_eval(run, writer, step, state, eval_batches)
            if step != total and preemption.requested(step):
                save_now(run, state, checkpoints, step)
                raise Preempted(f"Stopped at step {step} on a signal; checkpoint saved in {checkpoints.directory}.")
    save_now(run, state, checkpoints, total)
    log_eval(run, writer, total, state, eval_batches)
    return state


def train_batch_stream(run: Run, start: int) -> Iterator[dict[str, jax.Array]]:
    """The train batches from step `start` on, as global arrays on the devices: gathered there from an in-memory
    split they hold (device_data), or sent from the host a few batches ahead."""
    config = run.config
    if config.data.source == data.IN_MEMORY:
        split = run.source.splits[run.source.train_split]
        resident = device_data.on_devices(config.data.placement, split)
        device_data.log_placement(resident, split)
        if resident:
            rows = data.build_train_rows(config.data, config.global_batch_size, seed=config.seed, start_step=start)
            return device_data.DeviceResidentBatches(split, rows, run.batch_sharding)
    return sharding.prefetch_to_device(
        data.build_train_iterator(config.data, config.global_batch_size, seed=config.seed, start_step=start),
        DEVICE_PREFETCH,
        run.batch_sharding,
    )


def build_eval_batches(config: ml_collections.ConfigDict) -> Iterable[dict[str, np.ndarray]]:
    return data.build_eval_iterator(config.data, config.eval_batch_size or config.global_batch_size)


def final_evaluation_recorded(run: Run, step: int) -> bool:
    """Whether metrics.jsonl has the evaluation of `step`; every process goes by process 0's file (shared workdir)."""
    key = f"{run.config.eval_name}/top1"
    recorded = any(record["step"] == step and key in record for record in read_metrics(run.workdir))
    return not all_processes_agree(not recorded)  # evaluate only if all see it missing: nobody waits alone


def step_record(run: Run, step: int) -> dict[str, Any]:
    """What a checkpoint records beside the state (its JSON item): its step, the data position, what a step
    means (run_record.RUN_DEFINITION) and the architecture."""
    return {
        "step": step,
        "data_position": step,
        "train_examples": run.num_train_examples,
        "class_names": run.source.class_names,
        "images_seen": step * run.config.global_batch_size,
        **run_definition(run),
        "model_name": run.config.model_name,
        "architecture": models.architecture_of(run.model),
        "config": run_record.config_record(run.config),
    }


def model_summary(run: Run) -> dict[str, Any]:
    """What the run trains and evaluates on, for tools that read workdirs (e.g. a results table)."""
    source, architecture = run.source, models.architecture_of(run.model)
    return {
        "model_name": run.config.model_name,
        "qkv": run.config.qkv,
        "architecture": architecture,
        "model_config": architecture,  # the same, under the name earlier versions wrote (users' scripts read it)
        "num_params": models.count_params(run.abstract_state.params),
        "total_steps": run.total_steps,
        "data": {
            "source": source.description,
            "train_split": source.train_split,
            "train_examples": run.num_train_examples,
            "class_names": source.class_names,
            "eval_split": source.eval_split,
            "eval_examples": source.num_examples(source.eval_split),
        },
    }


def save_now(run: Run, state: TrainState, checkpoints: RunCheckpoints, step: int) -> None:
    check_finite(run, state, checkpoints)
    checkpoints.save(step, state, step_record(run, step))
    checkpoints.wait()


def check_finite(run: Run, state: TrainState, checkpoints: RunCheckpoints) -> None:
    """Stop (config.nonfinite="stop") once a step had a NaN/inf loss or gradient; nothing after it is saved."""
    bad_step = int(state.nonfinite_step)
    if bad_step < 0 or run.config.nonfinite == "skip":
        return
    checkpoints.wait()
    latest = checkpoints.latest_step()
    last_good = f"step {latest} in {checkpoints.directory}" if latest is not None else "none (no checkpoint yet)"
    raise NonFiniteError(
        f"Loss or gradients became NaN/inf at step {bad_step + 1}; training stopped and no update from that step on "
        f"was applied or saved. Last good checkpoint: {last_good}; rerunning the same command resumes there. "
        "Try a lower learning rate, --config.optimizer.grad_clip_norm=1.0, or --config.nonfinite=skip."
    )


def log_train(
    run: Run,
    writer: ScalarWriter,
    step: int,
    pending: list[dict],
    last_log: tuple[int, float],
    state: TrainState,
) -> tuple[int, float]:
    previous_step, previous_time = last_log
    now = time.perf_counter()
    averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
    images_per_sec = (step - previous_step) * run.config.global_batch_size / max(now - previous_time, 1e-9)
    scalars = {f"train/{k}": v for k, v in averaged.items()}
    scalars.update({"train/images_per_sec": images_per_sec, "train/skipped_steps": int(state.skipped_steps)})
    writer.write_scalars(step, scalars)
    # The ETA at the pace since the last log line (clu's ReportProgress logs its own through absl's logger, which
    # the console leaves out with the other libraries' INFO records).
    remaining_s = (run.total_steps - step) * (now - previous_time) / max(step - previous_step, 1)
    logging.info(
        "step %d/%d: loss %.4f, %.1f images/s, ETA %s",
        step,
        run.total_steps,
        averaged["loss"],
        images_per_sec,
        datetime.timedelta(seconds=round(remaining_s)),
    )
    return step, now


def log_eval(run: Run, writer: ScalarWriter, step: int, state: TrainState, batches: Iterable) -> None:
    name = run.config.eval_name
    scalars = {f"{name}/{k}": v for k, v in evaluate(run, state.params, state.batch_stats, batches).items()}
    if state.ema_params is not None:
        ema = evaluate(run, state.ema_params, state.batch_stats, batches)
        scalars.update({f"ema_{name}/{k}": v for k, v in ema.items()})
    writer.write_scalars(step, scalars)
    logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))


def log_results(run: Run) -> None:
    """The last line of a finished run: its final evaluation and where the results are."""
    key = f"{run.config.eval_name}/top1"
    final = [record for record in read_metrics(run.workdir) if key in record]
    top1 = f"{key} {final[-1][key]:.4f} at step {final[-1]['step']}; " if final else ""
    log = f", {log_file_name(jax.process_index())}" if is_local(run.workdir) else ""
    tensorboard = f"; TensorBoard: tensorboard --logdir {run.workdir}" if writes_tensorboard() else ""
    logging.info("Finished: %sresults in %s (metrics.jsonl, checkpoints/%s%s).", top1, run.workdir, log, tensorboard)


def evaluate(run: Run, params: Any, batch_stats: Any, batches: Iterable) -> dict[str, float]:
    """top1 / top5 / loss over every example of the eval split exactly once (padding is masked out)."""
    totals = None
    for batch in sharding.prefetch_to_device(batches, DEVICE_PREFETCH, run.batch_sharding):
        sums = run.eval_step(params, batch_stats, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": count,
    }
