"""train_and_evaluate(config, workdir): set up, resume or initialize, train, evaluate, checkpoint.

Resume order: the workdir's own latest checkpoint > config.init_from (fine-tuning) > a fresh init.
"""

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions

from qkv_vit import data, models
from qkv_vit.train import sharding, steps
from qkv_vit.train.checkpointing import RunCheckpoints, merge_for_fine_tuning
from qkv_vit.weights import read_variables
from qkv_vit.train.logging_utils import create_writer
from qkv_vit.train.optimizer import learning_rate, make_optimizer
from qkv_vit.train.preemption import PreemptionWatcher
from qkv_vit.train.state import TrainState, create_train_state

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NONFINITE_POLICIES = ("stop", "skip")


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the checkpoint of the current step is safely written."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf (config.nonfinite="stop")."""


@dataclasses.dataclass
class Run:
    """Everything fixed for the whole run, derived once from the config."""

    config: ml_collections.ConfigDict
    workdir: Path
    model: models.XCiT
    mesh: jax.sharding.Mesh
    total_steps: int
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    init_state: Any  # () -> TrainState, a fresh initialization
    abstract_state: TrainState
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding
    train_step: Any
    eval_step: Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train to config.total_steps (or total_epochs), resuming from WORKDIR/checkpoints if present."""
    workdir = Path(workdir).absolute()
    model = build_model(config, num_classes=None)  # errors in model options before any data is read
    validate_run_config(config, model)
    workdir.mkdir(parents=True, exist_ok=True)
    run = setup_run(config, workdir)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        (workdir / "model.json").write_text(json.dumps(model_summary(run), indent=2))
    checkpoints = RunCheckpoints(workdir, config)
    writer = create_writer(workdir)
    try:
        state = initial_state(run, checkpoints)
        return train_loop(run, state, checkpoints, writer)
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.flush()


def build_model(config: ml_collections.ConfigDict, num_classes: int | None) -> models.XCiT:
    overrides = {key: value for key, value in config.model.items() if value is not None}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {config.compute_dtype!r}.")
    return models.create(config.model_name, qkv=config.qkv or None, dtype=COMPUTE_DTYPES[config.compute_dtype], **overrides)


def validate_run_config(config: ml_collections.ConfigDict, model: models.XCiT) -> None:
    """One clear error for settings that would otherwise fail deep inside JAX, before any compile."""
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"config.nonfinite must be one of {NONFINITE_POLICIES}, got {config.nonfinite!r}.")
    if config.sharding not in sharding.SHARDING_STRATEGIES:
        raise ValueError(f"config.sharding must be one of {sharding.SHARDING_STRATEGIES}, got {config.sharding!r}.")
    devices = jax.device_count()
    for name in ("global_batch_size", "eval_batch_size"):
        size = config.get(name)
        if size is not None and (size < 1 or size % devices):
            raise ValueError(f"config.{name}={size} is not divisible by the {devices} devices; use a multiple of {devices}.")
    if config.data.image_size % model.patch_size:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} is not divisible by the patch size {model.patch_size}."
        )
    if config.optimizer.accumulation_steps < 1:
        raise ValueError("config.optimizer.accumulation_steps must be >= 1.")
    data.validate_config(config.data)


def setup_run(config: ml_collections.ConfigDict, workdir: Path) -> Run:
    num_classes = data.dataset_info(config.data)[2]
    model = build_model(config, num_classes)
    mesh = sharding.make_mesh(config.mesh)
    total_steps, warmup_steps = run_length(config)
    schedule = learning_rate(config.optimizer, config.global_batch_size, total_steps, warmup_steps)
    optimizer = make_optimizer(config.optimizer, schedule)
    init = functools.partial(
        create_train_state, model, optimizer, jax.random.PRNGKey(config.seed), config.data.image_size,
        config.ema_decay is not None,
    )
    abstract_state = jax.eval_shape(init)
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        functools.partial(
            steps.train_step, model=model, optimizer=optimizer, schedule=schedule, ema_decay=config.ema_decay,
            accumulation_steps=config.optimizer.accumulation_steps, skip_nonfinite=config.nonfinite == "skip",
        ),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(functools.partial(steps.eval_step, model=model), out_shardings=sharding.replicated(mesh))
    return Run(config, workdir, model, mesh, total_steps, schedule, optimizer, init, abstract_state, state_sharding,
               batch_sharding, train_step, eval_step)


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
        raise ValueError(f"The run has {total} steps: set config.total_steps or config.total_epochs higher.")
    return total, warmup


def initial_state(run: Run, checkpoints: RunCheckpoints) -> TrainState:
    latest = checkpoints.latest_step()
    if latest is not None:
        logging.info("Resuming from %s/%d.", checkpoints.directory, latest)
        abstract = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), run.abstract_state, run.state_sharding
        )
        return checkpoints.restore(latest, abstract)
    state = fresh_state(run)
    if run.config.init_from:
        state = fine_tuning_state(run, state)
    return state


def fresh_state(run: Run) -> TrainState:
    return jax.jit(run.init_state, out_shardings=run.state_sharding)()


def fine_tuning_state(run: Run, state: TrainState) -> TrainState:
    """Weights from config.init_from (never its optimizer state or step): the start of a fine-tuning run."""
    source = run.config.init_from
    loaded = read_variables(source, use_ema=run.config.init_from_ema)
    fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    merged = merge_for_fine_tuning(fresh, loaded, source)
    logging.info("Initialized from %s.", source)
    params = jax.device_put(merged["params"], run.state_sharding.params)
    batch_stats = jax.device_put(merged["batch_stats"], run.state_sharding.batch_stats)
    ema = jax.device_put(merged["params"], run.state_sharding.ema_params) if state.ema_params is not None else None
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema)


def train_loop(run: Run, state: TrainState, checkpoints: RunCheckpoints, writer: metric_writers.MetricWriter) -> TrainState:
    config, start, total = run.config, int(state.step), run.total_steps
    if start >= total:
        logging.info("The run in %s already finished at step %d; nothing to do.", run.workdir, start)
        return state
    train_batches = data.build_train_iterator(config.data, config.global_batch_size, seed=config.seed, start_step=start)
    eval_batches = data.build_eval_iterator(config.data, config.eval_batch_size or config.global_batch_size)
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer)
    pending, last_log = [], (start, time.perf_counter())
    with PreemptionWatcher(config.log_every_steps) as preemption:
        for step in range(start + 1, total + 1):
            state, metrics = run.train_step(state, sharding.global_batch(next(train_batches), run.batch_sharding))
            pending.append(metrics)
            report(step)
            if step % config.log_every_steps == 0 or step == total:
                check_finite(run, state, checkpoints)
                last_log = log_train(run, writer, step, pending, last_log, state)
                pending = []
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step != total:
                log_eval(run, writer, step, state, eval_batches)
            if step != total and step % config.checkpoint_every_steps == 0:
                check_finite(run, state, checkpoints)
                checkpoints.save(step, state, meta(run, step))
            if step != total and preemption.requested(step):
                save_now(run, state, checkpoints, step)
                raise Preempted(f"Stopped at step {step} on a signal; checkpoint saved in {checkpoints.directory}.")
    log_eval(run, writer, total, state, eval_batches)
    save_now(run, state, checkpoints, total)
    return state


def meta(run: Run, step: int) -> dict[str, Any]:
    return {"step": step, "data_position": step, "model_name": run.config.model_name,
            "model_config": json.loads(json.dumps(model_config(run.model), default=str))}


def model_summary(run: Run) -> dict[str, Any]:
    """What the run trains, for tools that read workdirs (e.g. a results table): name, preset, options, size."""
    return {"model_name": run.config.model_name, "qkv": run.config.qkv,
            "model_config": json.loads(json.dumps(model_config(run.model), default=str)),
            "num_params": models.count_params(run.abstract_state.params)}


def model_config(model: models.XCiT) -> dict[str, Any]:
    fields = [f.name for f in dataclasses.fields(model) if f.init and f.name not in ("parent", "name")]
    return {name: getattr(model, name) for name in fields}


def save_now(run: Run, state: TrainState, checkpoints: RunCheckpoints, step: int) -> None:
    check_finite(run, state, checkpoints)
    checkpoints.save(step, state, meta(run, step))
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


def log_train(run: Run, writer: metric_writers.MetricWriter, step: int, pending: list[dict], last_log: tuple[int, float],
              state: TrainState) -> tuple[int, float]:
    previous_step, previous_time = last_log
    now = time.perf_counter()
    averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
    images_per_sec = (step - previous_step) * run.config.global_batch_size / max(now - previous_time, 1e-9)
    scalars = {f"train/{k}": v for k, v in averaged.items()}
    scalars.update({"train/images_per_sec": images_per_sec, "train/skipped_steps": int(state.skipped_steps)})
    writer.write_scalars(step, scalars)
    logging.info("step %d/%d: loss %.4f, %.1f images/s", step, run.total_steps, averaged["loss"], images_per_sec)
    return step, now


def log_eval(run: Run, writer: metric_writers.MetricWriter, step: int, state: TrainState, batches: Iterable) -> None:
    name = run.config.eval_name
    scalars = {f"{name}/{k}": v for k, v in evaluate(run, state.params, state.batch_stats, batches).items()}
    if state.ema_params is not None:
        ema = evaluate(run, state.ema_params, state.batch_stats, batches)
        scalars.update({f"ema_{name}/{k}": v for k, v in ema.items()})
    writer.write_scalars(step, scalars)
    logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))


def evaluate(run: Run, params: Any, batch_stats: Any, batches: Iterable) -> dict[str, float]:
    """top1 / top5 / loss over every example of the eval split exactly once (padding is masked out)."""
    totals = None
    for batch in batches:
        sums = run.eval_step(params, batch_stats, sharding.global_batch(batch, run.batch_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count, "loss": totals["loss"] / count, "count": count}
