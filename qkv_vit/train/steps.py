"""The jitted train and eval steps."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from qkv_vit.train.state import TrainState


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_decay: float | None,
    accumulation_steps: int,
    skip_nonfinite: bool,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One forward/backward/update on a global batch with soft targets (mixup and label smoothing folded in).

    A non-finite loss, gradient or updated parameter never reaches the state: the update is dropped and the step is
    recorded in `nonfinite_step`; without `skip_nonfinite` every later update is dropped too, so the state
    stays the last good one while the host notices and stops.
    """

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.fold_in(state.rng, state.step)},
        )
        loss = optax.softmax_cross_entropy(logits, batch["soft_label"]).mean()
        return loss, (updates["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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


def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, model: Any) -> dict[str, jax.Array]:
    """Sums over the real (mask = 1) examples of a padded batch: count, loss, top-1 and top-5 hits."""
    logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
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
