"""The train state: everything a resumed run needs to continue bit for bit (the data position is `step`)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # train steps (batches) done; also where the data stream resumes
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s), so no key needs carrying forward
    ema_params: Any  # an exponential moving average of params, or None
    nonfinite_step: jax.Array  # first step whose loss or gradients were NaN/inf; -1 while none was
    skipped_steps: jax.Array  # steps whose update was dropped for being non-finite (nonfinite="skip")


def create_train_state(
    model: Any, optimizer: optax.GradientTransformation, rng: jax.Array, image_size: int, use_ema: bool
) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        rng=state_rng,
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        nonfinite_step=jnp.full((), -1, jnp.int32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )
