"""The train and eval steps, and their jitted, sharded form (`jit_steps`), which the trainer and the benchmarks
share. Nothing here needs TensorFlow: a model can be stepped on synthetic batches where only JAX is installed."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qkv_vit.train import sharding
from qkv_vit.train.distillation import Distillation, abstract_variables, random_init
from qkv_vit.train.finishing import BatchFinishing, finish_train_batch, normalize
from qkv_vit.train.state import TrainState, create_train_state

AUGMENTATION_STREAM = 0x6175  # fold_in tag: the step's augmentation key, apart from its dropout key


def gradients(
    params: Any,
    batch_stats: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    teacher_variables: Any = None,
    *,
    model: Any,
    mesh: Mesh,
    all_reduce_dtype: jnp.dtype,
    distillation: Distillation | None = None,
) -> tuple[jax.Array, Any, jax.Array, Any]:
    """(loss, new batch_stats, logits, gradients) of a finished global batch, sharded over every axis of `mesh`.

    Each device computes its shard's loss and float32 gradients, and the gradients are averaged over the devices
    in `all_reduce_dtype`, explicitly: as DistributedDataParallel under PyTorch's AMP, whose per-GPU gradients of
    float32 parameters are all-reduced in float32 (bfloat16: as DDP's bf16_compress_hook). Left to XLA, the
    average is taken where the bfloat16 products are, in bfloat16. BatchNorm groups may span devices
    (layers.BatchNorm's axis_name); each device draws its own dropout and drop-path masks, as each GPU does.
    With `distillation` the teacher (its variables gathered as the student's parameters are) sees each device's
    shard and the loss is distillation.Distillation.loss of the base loss.
    """
    axes = tuple(mesh.axis_names)
    on_shards = model.clone(batch_norm_layer=functools.partial(model.batch_norm_layer, axis_name=axes))

    def on_shard(
        params: Any, batch_stats: Any, images: jax.Array, soft_labels: jax.Array, key: jax.Array, teacher: Any
    ) -> tuple:
        teacher_logits = distillation.teacher_logits(teacher, images) if distillation else None

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
            logits, updates = on_shards.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(key, jax.lax.axis_index(axes))},
            )
            loss = optax.softmax_cross_entropy(logits, soft_labels).mean()
            if distillation:
                loss = distillation.loss(loss, logits, teacher_logits)
            return loss, (updates["batch_stats"], logits)

        # Gradients with respect to a per-device copy of the parameters: this device's, summed below. (With
        # respect to the replicated parameters JAX would sum them itself, in the dtype the model casts them to.)
        local = jax.lax.pcast(params, axes, to="varying")
        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(local)
        grads = jax.tree.map(lambda g: jax.lax.pmean(g.astype(all_reduce_dtype), axes).astype(g.dtype), grads)
        return jax.lax.pmean(loss, axes), batch_stats, logits, grads

    return jax.shard_map(
        on_shard, mesh=mesh, in_specs=(P(), P(), P(axes), P(axes), P(), P()), out_specs=(P(), P(), P(axes), P())
    )(params, batch_stats, batch["image"], batch["soft_label"], key, teacher_variables)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    teacher_variables: Any = None,
    *,
    model: Any,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float | None,
    accumulation_steps: int,
    skip_nonfinite: bool,
    mesh: Mesh,
    all_reduce_dtype: jnp.dtype,
    finishing: BatchFinishing | None = None,
    distillation: Distillation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One forward/backward/update on a global batch, sharded over every axis of `mesh`.

    With `finishing` the batch is {"image" uint8, "label"}, normalized, erased and mixed here (finishing.py; each
    device mixes its shard); without, it is already finished: {"image" float32, "label", "soft_label"}. The
    gradients are averaged over the devices in `all_reduce_dtype` (`gradients`). With `distillation`, the teacher's
    `teacher_variables` (never updated) supervise the student and the loss is the combined one.
    A non-finite loss, gradient or updated parameter never reaches the state: the update is dropped and the step is
    recorded in `nonfinite_step`; without `skip_nonfinite` every later update is dropped too, so the state
    stays the last good one while the host notices and stops.
    """
    step_key = jax.random.fold_in(state.rng, state.step)  # keys from the run's seed and the step: exact resume
    if finishing is not None:
        batch = finish_train_batch(batch, jax.random.fold_in(step_key, AUGMENTATION_STREAM), finishing, mesh)
    loss, batch_stats, logits, grads = gradients(
        state.params,
        state.batch_stats,
        batch,
        step_key,
        teacher_variables,
        model=model,
        mesh=mesh,
        all_reduce_dtype=all_reduce_dtype,
        distillation=distillation,
    )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_decay is not None:
        ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)

    param_norm = optax.tree.norm(params)  # also catches an update that overflowed the parameters
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    apply = finite if skip_nonfinite else finite & (state.nonfinite_step < 0)

    def keep(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=keep(ema_params, state.ema_params),
        nonfinite_step=jnp.where(~finite & (state.nonfinite_step < 0), state.step, state.nonfinite_step),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "lr": schedule(state.step // accumulation_steps),
        "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    }
    return new_state, metrics


def eval_step(
    params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, model: Any, finishing: BatchFinishing | None = None
) -> dict[str, jax.Array]:
    """Sums over the real (mask = 1) examples of a padded batch: count, loss, top-1 and top-5 hits.

    With `finishing` the images are uint8 and normalized here; without, they are already normalized float32.
    """
    images = batch["image"] if finishing is None else normalize(batch["image"], finishing.mean, finishing.std)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    return {
        "count": mask.sum(),
        "loss": (loss * mask).sum(),
        "top1": ((top_k[:, 0] == labels) * mask).sum(),
        "top5": ((top_k == labels[:, None]).any(-1) * mask).sum(),
    }


@dataclasses.dataclass(frozen=True)
class JittedSteps:
    """A run's state layout and compiled-on-first-call steps."""

    init_state: Callable[[], TrainState]  # a fresh initialization (jit it with out_shardings=state_sharding)
    abstract_state: TrainState  # shapes and dtypes only
    state_sharding: Any
    batch_sharding: NamedSharding
    train_step: Callable  # (state, batch, teacher variables or None) -> (state, metrics); the state is donated
    eval_step: Callable  # (params, batch_stats, batch) -> sums
    distillation: Distillation | None = None  # the teacher, where config.distillation is on
    abstract_teacher: Any = None  # its variables' shapes and dtypes (None without a teacher)
    teacher_sharding: Any = None  # and their layout: as the student's parameters
    # Random teacher variables laid out as teacher_sharding (benchmarks, tests: a step's cost, not its values).
    init_teacher: Callable[[], Any] = lambda: None


def jit_steps(
    model: Any,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    seed: int,
    image_size: int,
    ema_decay: float | None,
    sharding_strategy: str,
    accumulation_steps: int,
    skip_nonfinite: bool,
    all_reduce_dtype: jnp.dtype,
    finishing: BatchFinishing | None,
    distillation: Distillation | None = None,
) -> JittedSteps:
    """The steps jitted over `mesh`: the state placed by `sharding_strategy` ("replicate" or "fsdp"), the batch
    split over every device, gradients averaged over the devices in `all_reduce_dtype`, the state donated to the
    train step; shapes from jax.eval_shape. A distillation teacher's variables are laid out as the parameters are."""
    init = functools.partial(
        create_train_state, model, optimizer, jax.random.PRNGKey(seed), image_size, ema_decay is not None
    )
    abstract_state = jax.eval_shape(init)
    state_sharding = sharding.state_shardings(abstract_state, mesh, sharding_strategy)
    batch_sharding = sharding.batch_sharding(mesh)
    teacher = {}
    if distillation is not None:
        abstract_teacher = abstract_variables(distillation.teacher, image_size)
        teacher_sharding = sharding.state_shardings(abstract_teacher, mesh, sharding_strategy)
        init_teacher = jax.jit(random_init(distillation.teacher, image_size), out_shardings=teacher_sharding)
        teacher = dict(
            distillation=distillation,
            abstract_teacher=abstract_teacher,
            teacher_sharding=teacher_sharding,
            init_teacher=init_teacher,
        )
    jitted_train_step = jax.jit(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            ema_decay=ema_decay,
            accumulation_steps=accumulation_steps,
            skip_nonfinite=skip_nonfinite,
            finishing=finishing,
            mesh=mesh,
            all_reduce_dtype=all_reduce_dtype,
            distillation=distillation,
        ),
        in_shardings=(state_sharding, batch_sharding, teacher.get("teacher_sharding")),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    jitted_eval_step = jax.jit(
        functools.partial(eval_step, model=model, finishing=finishing), out_shardings=sharding.replicated(mesh)
    )
    return JittedSteps(
        init, abstract_state, state_sharding, batch_sharding, jitted_train_step, jitted_eval_step, **teacher
    )
