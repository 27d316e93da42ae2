"""train_and_evaluate(config, workdir): set up, resume or initialize, train, evaluate, checkpoint.

The flow, one function a stage: the config and model are checked (train.config), the workdir made writable and
locked (train.workdir), the run built (build_run), its state restored or initialized (initial_state), trained
(train_loop) and evaluated. Resume order: the workdir's own newest readable checkpoint > config.init_from
(fine-tuning, train.fine_tuning) > a fresh init. A checkpoint records what its run is (train.run_record): a rerun
that would give its step another meaning, or change what is trained, is refused. The final state is saved before the
final evaluation, and a rerun of a run whose final evaluation did not complete only evaluates. Mistakes in the config,
the data or the workdir raise ConfigError / DataConfigError / CheckpointError before anything compiles
(docs/failures.md).
"""

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from qkv_vit import data, models
from qkv_vit.errors import ConfigError, storage_failures
from qkv_vit.paths import PathLike, as_path
from qkv_vit.progress import announced
from qkv_vit.train import device_data, distillation, evaluators, program, sharding
from qkv_vit.train.checkpointing import RunCheckpoints, all_processes_agree
from qkv_vit.train.config import COMPUTE_DTYPES, check_config, check_fits, config_mistakes
from qkv_vit.train.fine_tuning import architecture_from_init, fine_tuning_state, read_init_from
from qkv_vit.train.finishing import BatchFinishing
from qkv_vit.train.logging_utils import ScalarWriter, create_writer, read_metrics, workdir_log
from qkv_vit.train.optimizer import learning_rate, make_optimizer
from qkv_vit.train.preemption import PreemptionWatcher
from qkv_vit.train.reporting import Reporter, log_data_summary, log_results
from qkv_vit.train.run_record import RunRecord, check_resume
from qkv_vit.train.state import TrainState
from qkv_vit.train.steps import JittedSteps, jit_steps
from qkv_vit.train.target import Target
from qkv_vit.train.workdir import check_workdir_path, prepare_workdir, write_failure, write_run_records
from qkv_vit.train.workdir_lock import workdir_lock

DEVICE_PREFETCH = 2  # batches on their way to the devices ahead of the step


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the checkpoint of the current step is safely written."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf (config.nonfinite="stop")."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """Everything fixed for the whole run, derived once from the config (build_run)."""

    config: ml_collections.ConfigDict
    workdir: epath.Path | None  # a local directory or a URL such as gs://bucket/run
    source: data.DataSource | None  # the train and eval data (None: a run planned, or stepped on batches of its own)
    target: Target  # the devices the program is built for (present, or a topology's)
    model: models.XCiT  # as the program computes it: layer_impl "auto" resolved for the target's platform
    mesh: jax.sharding.Mesh
    total_steps: int
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    steps: JittedSteps  # the state's layout and the jitted train and eval steps
    record: RunRecord | None  # what the run is, as its workdir's records and checkpoints hold it (None: no data)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: PathLike, allow_config_change: bool = False
) -> TrainState:
    """Train to config.total_steps (or total_epochs), resuming from WORKDIR/checkpoints if present.

    A rerun whose config changes what the checkpoints were trained with is a ConfigError unless
    `allow_config_change` (qkv_vit.train.run_record); a workdir another run holds is a ConfigError.
    """
    workdir = as_path(workdir)
    check_config(config)  # every value's type, length and range
    distillation.check_teacher_weights(config)
    model = build_model(config, config.data.num_classes)  # errors in model options before any data is read
    target = Target.present()
    check_fits(config, model, target)
    check_workdir_path(workdir)
    prepare_workdir(workdir)
    with workdir_lock(workdir, jax.process_index()), workdir_log(workdir):
        run = build_run(config, workdir, data.open_source(config.data), model, target=target)
        log_data_summary(config, run.source.info)
        checkpoints = RunCheckpoints(workdir, config)
        with finally_calling(checkpoints.close):  # waits for the save in flight
            return train_with_checkpoints(run, checkpoints, allow_config_change)


def train_with_checkpoints(run: Run, checkpoints: RunCheckpoints, allow_config_change: bool) -> TrainState:
    """Resume or initialize, then train and evaluate what is left, writing the run's records and metrics."""
    state, config_changes = initial_state(run, checkpoints, allow_config_change)
    if int(state.step) >= run.total_steps and final_evaluation_recorded(run, int(state.step)):
        logging.info("The run in %s already finished at step %d; nothing to do.", run.workdir, int(state.step))
        return state  # before the records and the writer: nothing was trained with this config

    def failure(cause: str, error: BaseException) -> str:
        return write_failure(run.workdir, checkpoints.last_complete(), cause, error)

    # Metrics, event and log files meet a full or read-only disk too, often before a checkpoint does.
    # TensorFlow's event writer raises its own types, wrapping the OSError's words (storage_cause reads them).
    with storage_failures(failure):
        if jax.process_index() == 0:  # only a run that trains or evaluates: the records describe the checkpoints
            write_run_records(run.workdir, run.record, int(state.step), config_changes)
        writer = create_writer(run.workdir)
        with finally_calling(writer.flush):
            state = train_loop(run, state, checkpoints, writer)
    log_results(run.workdir, run.config.eval_name)
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


def build_model(config: ml_collections.ConfigDict, num_classes: int | None) -> models.XCiT:
    """config's XCiT; num_classes=None keeps the named model's (build_run sets the data's). With
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


def build_run(
    config: ml_collections.ConfigDict,
    workdir: epath.Path | None,
    source: data.DataSource | None,
    model: models.XCiT | None = None,
    *,
    target: Target,
) -> Run:
    """The run's model, schedule, optimizer, shardings and jitted steps for `target`'s devices (nothing compiled
    yet; JAX is not asked which devices it has). `model`: config's model as build_model made it (None: built here);
    its class count becomes the source's unless config.data.num_classes sets one. A run without a source (planned,
    or a benchmark stepping on batches of its own) takes its length from config.total_steps and warmup_steps, or
    from the size data.catalog knows for config.data (DataConfigError if it does not)."""
    model = model if model is not None else build_model(config, config.data.num_classes)
    if source is not None and config.data.num_classes is None and model.num_classes != source.info.num_classes:
        model = model.clone(num_classes=source.info.num_classes)
    mesh = sharding.make_mesh(config.mesh, target.devices)
    total_steps, warmup_steps = run_length(config, epoch_length(config, source, target))
    with config_mistakes("config.optimizer"):
        schedule = learning_rate(config.optimizer, config.global_batch_size, total_steps, warmup_steps)
        optimizer = make_optimizer(config.optimizer, schedule)
    computed = models.for_platform(model, target.platform)
    with config_mistakes("config.distillation"):
        distilling = distillation.from_config(config, model.num_classes, computed.dtype, target.platform)
    jitted = jit_steps(
        computed,
        optimizer,
        schedule,
        mesh,
        seed=config.seed,
        image_size=config.data.image_size,
        ema_decay=config.ema_decay,
        sharding_strategy=config.sharding,
        accumulation_steps=config.optimizer.accumulation_steps,
        skip_nonfinite=config.nonfinite == "skip",
        all_reduce_dtype=COMPUTE_DTYPES[config.gradient_all_reduce_dtype],
        # The data ship uint8 batches, uncropped where the pipeline leaves cropping to the device.
        finishing=BatchFinishing.from_config(
            config.data, model.num_classes, data.crops_on_device(config.data), target.platform
        ),
        distillation=distilling,
    )
    record = None
    if source is not None:  # the config's model ("auto" as asked): the record holds for any platform
        num_params = models.count_params(jitted.abstract_state.params)
        record = RunRecord.of(config, models.architecture_of(model), num_params, total_steps, source.info)
    return Run(
        config=config,
        workdir=workdir,
        source=source,
        target=target,
        model=computed,
        mesh=mesh,
        total_steps=total_steps,
        schedule=schedule,
        optimizer=optimizer,
        steps=jitted,
        record=record,
    )


def epoch_length(config: ml_collections.ConfigDict, source: data.DataSource | None, target: Target) -> int | None:
    """Train steps per epoch on `target` (None where config.total_steps and warmup_steps make it unneeded): the
    source's, or, without one, from the train split's size in data.catalog (DataConfigError if unknown there)."""
    if config.total_steps is not None and config.optimizer.warmup_steps is not None:
        return None
    batch, processes, local = config.global_batch_size, target.process_count, target.local_device_count
    if source is not None:
        return source.steps_per_epoch(batch, process_count=processes, local_device_count=local)
    local_batch = data.local_batch_size(batch, processes, local)
    return data.known_train_examples(config.data) // processes // local_batch  # as tf.data: drop the remainder


def run_length(config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> tuple[int, int]:
    """(total steps, warmup steps): explicit step counts win over epochs."""
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
    restored = checkpoints.restore_latest(sharding.placed(run.steps.abstract_state, run.steps.state_sharding))
    if restored is not None:
        state, saved = restored
        directory = str(checkpoints.directory)
        changes = check_resume(run.record, saved, directory, str(run.workdir), allow_config_change)
        logging.info("Resuming from %s/%d.", directory, int(state.step))
        return state, changes
    config = run.config
    class_names = run.source.info.class_names
    loaded = read_init_from(config, run.model, run.steps.abstract_state, class_names) if config.init_from else None
    state = fresh_state(run)  # after init_from is read and checked: its mistakes cost no compilation
    if loaded is None:
        return state, {}
    return fine_tuning_state(config.init_from, state, loaded, run.steps.state_sharding), {}


def fresh_state(run: Run) -> TrainState:
    with announced("Initializing the model's parameters and optimizer state"):
        return jax.block_until_ready(jax.jit(run.steps.init_state, out_shardings=run.steps.state_sharding)())


def train_loop(run: Run, state: TrainState, checkpoints: RunCheckpoints, writer: ScalarWriter) -> TrainState:
    config, start, total = run.config, int(state.step), run.total_steps
    eval_batches = run.source.eval_batches(config.eval_batch_size or config.global_batch_size)
    reporter = Reporter(writer, start, total, config.global_batch_size, config.log_every_steps)
    periodic = evaluators.periodic(config, run.model, run.source, run.mesh)  # config.evaluators, their data opened
    if start >= total:  # trained and saved, but the final evaluation did not complete (a crash, a kill)
        logging.info("The run in %s finished training at step %d; running its final evaluation.", run.workdir, start)
        evaluate_all(run, state, eval_batches, periodic, reporter, start)
        return state
    teacher = load_teacher(run)  # before the step compiles: a teacher that does not fit costs no compilation
    # The fingerprint `python -m qkv_vit.plan` prints for the same config and devices (the lowering is jit's own).
    with announced("Tracing the train step"):
        fingerprint = program.fingerprint(program.lower_train_step(run))
    logging.info("Train step program %s on %s.", fingerprint, describe(run))
    train_batches = train_batch_stream(run, start)
    with PreemptionWatcher(config.log_every_steps) as preemption:
        for step in range(start + 1, total + 1):
            if step == start + 1:  # compiles first: said, timed, and left out of the pace and the ETA
                batch = next(train_batches)  # outside: reading it is not compiling
                with announced(f"Compiling the train step and running step {step}"):
                    state, metrics = run.steps.train_step(state, batch, teacher)
                    jax.block_until_ready(metrics)
                reporter.restart_clock(step)
            else:
                state, metrics = run.steps.train_step(state, next(train_batches), teacher)
            reporter.step(step, metrics)
            if step % config.log_every_steps == 0 or step == total:
                check_finite(run, state, checkpoints)
                reporter.train(step, int(state.skipped_steps))
            # The checkpoint of a step goes before its evaluation, so a failing evaluation loses no training.
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step != total:
                check_finite(run, state, checkpoints)
                checkpoints.save(step, state, run.record.step_record(step))
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step != total:
                reporter.evaluation(step, evaluate_state(run, state, eval_batches))
            for evaluator in periodic:
                if evaluator.due(step) and step != total:  # the last step's come with the final evaluation
                    reporter.evaluation(step, run_evaluator(evaluator, state))
            if step != total and preemption.requested(step):
                save_now(run, state, checkpoints, step)
                raise Preempted(f"Stopped at step {step} on a signal; checkpoint saved in {checkpoints.directory}.")
    save_now(run, state, checkpoints, total)
    evaluate_all(run, state, eval_batches, periodic, reporter, total)
    return state


def load_teacher(run: Run) -> Any:
    """The distillation teacher's variables on the devices (None without distillation). They are read from
    config.distillation.teacher_path on every start and never saved with the run: a resumed run reads them again."""
    if run.steps.distillation is None:
        return None
    path = run.config.distillation.teacher_path
    return distillation.load_variables(path, run.steps.abstract_teacher, run.steps.teacher_sharding)


def evaluate_all(
    run: Run,
    state: TrainState,
    eval_batches: Iterable,
    periodic: list[evaluators.Periodic],
    reporter: Reporter,
    step: int,
) -> None:
    """The final evaluation: every one of config.evaluators, then the eval split. The eval split's goes last: a run
    whose metrics.jsonl holds it at the last step is finished (final_evaluation_recorded), so one stopped before
    it evaluates everything again."""
    for evaluator in periodic:
        reporter.evaluation(step, run_evaluator(evaluator, state))
    reporter.evaluation(step, evaluate_state(run, state, eval_batches))


def run_evaluator(evaluator: evaluators.Periodic, state: TrainState) -> dict[str, float]:
    """One of config.evaluators on the state's parameters, not silent while it lasts."""
    with announced(f"Evaluating {evaluator.name}", brief=True):
        return evaluator.evaluate(state_variables(state))


def state_variables(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def describe(run: Run) -> str:
    """e.g. "4 x TPU v5 lite (tpu), 1 process(es), mesh {'data': 4, 'fsdp': 1}"."""
    target = run.target
    return (
        f"{target.device_count} x {target.device_kind} ({target.platform}), {target.process_count} process(es), "
        f"mesh {dict(run.mesh.shape)}"
    )


def train_batch_stream(run: Run, start: int) -> Iterator[dict[str, jax.Array]]:
    """The train batches from step `start` on, as global arrays on the devices: gathered there from a decoded train
    split they hold (device_data), or sent from the host a few batches ahead."""
    config, source, batch_sharding = run.config, run.source, run.steps.batch_sharding
    if source.train_arrays is not None:  # decoded arrays the devices may hold
        resident = device_data.on_devices(config.data.placement, source.train_arrays)
        device_data.log_placement(resident, source.train_arrays)
        if resident:
            rows = source.train_rows(config.global_batch_size, seed=config.seed, start_step=start)
            return device_data.DeviceResidentBatches(source.train_arrays, rows, batch_sharding)
    batches = source.train_batches(config.global_batch_size, seed=config.seed, start_step=start)
    return sharding.prefetch_to_device(batches, DEVICE_PREFETCH, batch_sharding)


def final_evaluation_recorded(run: Run, step: int) -> bool:
    """Whether metrics.jsonl has the evaluation of `step`; every process goes by process 0's file (shared workdir)."""
    key = f"{run.config.eval_name}/top1"
    recorded = any(record["step"] == step and key in record for record in read_metrics(run.workdir))
    return not all_processes_agree(not recorded)  # evaluate only if all see it missing: nobody waits alone


def save_now(run: Run, state: TrainState, checkpoints: RunCheckpoints, step: int) -> None:
    check_finite(run, state, checkpoints)
    checkpoints.save(step, state, run.record.step_record(step))
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


def evaluate_state(run: Run, state: TrainState, batches: Iterable) -> dict[str, float]:
    """The evaluation's scalars: <eval_name>/top1, /top5, /loss, /count, and ema_<eval_name>/* with an EMA."""
    name = run.config.eval_name
    with announced(f"Evaluating on {name}", brief=True):  # a large split (or its first compile) is not silent
        scalars = {f"{name}/{k}": v for k, v in evaluate(run, state.params, state.batch_stats, batches).items()}
        if state.ema_params is not None:
            ema = evaluate(run, state.ema_params, state.batch_stats, batches)
            scalars.update({f"ema_{name}/{k}": v for k, v in ema.items()})
    return scalars


def evaluate(run: Run, params: Any, batch_stats: Any, batches: Iterable) -> dict[str, float]:
    """top1 / top5 / loss over every example of the eval split exactly once (padding is masked out)."""
    totals = None
    for batch in sharding.prefetch_to_device(batches, DEVICE_PREFETCH, run.steps.batch_sharding):
        sums = run.steps.eval_step(params, batch_stats, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": count,
    }
