"""A run's train and eval steps as programs for its target: the shapes of their arguments, their lowered form and a
fingerprint that names it. `python -m qkv_vit.plan` compiles these for a slice it does not have; the trainer logs
the same fingerprint before its first step, so a user sees that the devices run the program that was planned.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from qkv_vit.train import sharding

if TYPE_CHECKING:
    from qkv_vit.train.trainer import Run

FINGERPRINT_LENGTH = 16  # hex digits of the SHA-256 of the lowered program


def batch_spec(run: Run, global_batch_size: int, evaluation: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a data source delivers (data.DataSource): uint8 images at config.data.image_size, int32
    labels, and for evaluation the float32 mask of real examples; laid out as the trainer places it."""
    size, placement = run.config.data.image_size, run.steps.batch_sharding
    spec = {
        "image": jax.ShapeDtypeStruct((global_batch_size, size, size, 3), jnp.uint8, sharding=placement),
        "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32, sharding=placement),
    }
    if evaluation:
        spec["mask"] = jax.ShapeDtypeStruct((global_batch_size,), jnp.float32, sharding=placement)
    return spec


def state_spec(run: Run) -> Any:
    """The train state's shapes and dtypes, laid out as the run shards it."""
    return sharding.placed(run.steps.abstract_state, run.steps.state_sharding)


def teacher_spec(run: Run) -> Any:
    """A distillation teacher's variables' shapes and dtypes, laid out as the run shards them; None without one."""
    if run.steps.distillation is None:
        return None
    return sharding.placed(run.steps.abstract_teacher, run.steps.teacher_sharding)


def lower_train_step(run: Run) -> jax.stages.Lowered:
    """The train step on a global batch of config.global_batch_size, lowered for the run's target (the teacher's
    forward included where the run distills)."""
    return run.steps.train_step.lower(state_spec(run), batch_spec(run, run.config.global_batch_size), teacher_spec(run))


def lower_eval_step(run: Run) -> jax.stages.Lowered:
    """The eval step on a global batch of config.eval_batch_size (else global_batch_size), lowered likewise."""
    state = state_spec(run)
    size = run.config.eval_batch_size or run.config.global_batch_size
    return run.steps.eval_step.lower(state.params, state.batch_stats, batch_spec(run, size, evaluation=True))


def fingerprint(lowered: jax.stages.Lowered) -> str:
    """A name for a program: the SHA-256 of its lowered StableHLO, without source locations. The same config, code
    and JAX version on the same kind and number of devices give the same fingerprint, on any host."""
    text = lowered.as_text(debug_info=False)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LENGTH]
