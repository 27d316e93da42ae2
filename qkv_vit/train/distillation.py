"""Knowledge distillation as XCiT trained its distilled († / §) models: DeiT's DistillationLoss (facebookresearch/xcit
and facebookresearch/deit `losses.py`), config.distillation.

XCiT has no distillation token: its training forward returns (x, x), so the one class-token head is both the output
the base loss sees and the one the teacher supervises. The teacher sees the student's own finished batch (after
mixup / cutmix, normalized as the student's), in eval mode, without gradient: engine.py calls
`criterion(samples, outputs, targets)` with the mixed samples. The loss is

    (1 - alpha) * base + alpha * distill
    hard: cross_entropy(student, argmax(teacher))                       (DeiT's --distillation-type hard)
    soft: KL(softmax(teacher / tau) || softmax(student / tau)) summed, * tau^2 / (batch * classes)

where `base` is the run's own loss (soft-target cross-entropy with mixup and label smoothing folded in) and the soft
loss divides by batch x classes (DeiT's `/ outputs_kd.numel()`), not by the batch alone. XCiT's † rows: hard, alpha
0.5, tau 1.0 (main.py's defaults), teacher RegNetY-16GF (timm's regnety_160 with DeiT's weights).

The teacher is any model qkv_vit reads: converted XCiT weights of any size, a qkv_vit run, or converted RegNetY
weights (python -m qkv_vit.convert). It runs inside the jitted train step in the compute dtype, its variables sharded
as the student's parameters (config.sharding), never updated and never saved in the run's checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qkv_vit import models
from qkv_vit.errors import CheckpointError, ConfigError
from qkv_vit.models import regnet
from qkv_vit.tree import flatten, unflatten
from qkv_vit.weights import read_architecture, read_weights

if TYPE_CHECKING:  # type hints only: the step needs no ml_collections
    import ml_collections

DISTILLATION_TYPES = ("none", "soft", "hard")

# config.distillation's defaults: off; XCiT's main.py defaults for alpha, tau and the teacher's model.
DEFAULTS = dict(
    type="none",  # "hard" (XCiT's † models), "soft", or "none"
    alpha=0.5,  # the distillation term's weight; the base loss gets 1 - alpha
    tau=1.0,  # the soft loss's temperature
    teacher_model="",  # a name (regnety_160, xcit_*): the architecture where teacher_path records none
    teacher_path=None,  # the teacher's weights: converted (python -m qkv_vit.convert) or a qkv_vit run directory
)


@dataclasses.dataclass(frozen=True)
class Distillation:
    """What the train step needs: the loss's kind and weights, and the teacher module (applied in eval mode)."""

    kind: str  # "soft" or "hard"
    alpha: float
    tau: float
    teacher: nn.Module

    def loss(self, base: jax.Array, student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
        """(1 - alpha) * base + alpha * distillation_loss, a float32 scalar."""
        distill = distillation_loss(student_logits, teacher_logits, self.kind, self.tau)
        return (1 - self.alpha) * base + self.alpha * distill

    def teacher_logits(self, variables: Any, images: jax.Array) -> jax.Array:
        """The teacher's float32 logits (B, classes) of the student's finished images, eval mode, no gradient."""
        logits = self.teacher.apply(variables, images, train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, kind: str, tau: float) -> jax.Array:
    """DeiT's distillation term, a float32 scalar, from logits (B, classes): "hard" is the mean cross-entropy with
    the teacher's argmax; "soft" is KL(teacher || student) at temperature tau, summed, times tau^2, divided by
    B x classes (torch.nn.functional.kl_div(..., reduction='sum', log_target=True) * T * T / numel)."""
    student = student_logits.astype(jnp.float32)
    teacher = teacher_logits.astype(jnp.float32)
    if kind == "hard":
        return optax.softmax_cross_entropy_with_integer_labels(student, jnp.argmax(teacher, axis=-1)).mean()
    if kind == "soft":
        log_student = jax.nn.log_softmax(student / tau, axis=-1)
        log_teacher = jax.nn.log_softmax(teacher / tau, axis=-1)
        kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student))
        return kl * (tau * tau) / student.size
    raise ValueError(f"Unknown distillation type {kind!r}: choose one of {DISTILLATION_TYPES[1:]}.")


def is_on(config: ml_collections.ConfigDict) -> bool:
    return config.distillation.type != "none"


def check_teacher_weights(config: ml_collections.ConfigDict) -> None:
    """A run that trains (not one planned or benchmarked) needs the teacher's weights: ConfigError without them."""
    if is_on(config) and not config.distillation.teacher_path:
        raise ConfigError(
            f"config.distillation.type={config.distillation.type!r} trains from a teacher's weights: set "
            "config.distillation.teacher_path (converted with python -m qkv_vit.convert, or a qkv_vit run directory)."
        )


def teacher_architecture(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """The teacher's stored architecture (JSON, as weights.read_architecture gives it): the one recorded with
    config.distillation.teacher_path, else that of the named config.distillation.teacher_model with the student's
    `num_classes` (the weights, read later, are checked against it). ConfigError where neither says, or where the
    two disagree."""
    options = config.distillation
    recorded = None
    if options.teacher_path:
        try:
            recorded = read_architecture(options.teacher_path)
        except (FileNotFoundError, CheckpointError) as error:  # a bad input of this run, not its storage failing
            raise ConfigError(f"config.distillation.teacher_path: {error}") from None
    named = named_architecture(options.teacher_model, num_classes) if options.teacher_model else None
    if recorded is None and named is None:
        raise ConfigError(
            "config.distillation needs a teacher: set config.distillation.teacher_path to its weights (converted "
            "with python -m qkv_vit.convert, or a qkv_vit run directory), and teacher_model to its name where the "
            "weights record no architecture."
        )
    if recorded is not None and named is not None and not same_model(recorded, named):
        raise ConfigError(
            f"config.distillation.teacher_model={options.teacher_model!r} is not the model recorded with "
            f"teacher_path={options.teacher_path} ({describe(recorded)}): leave teacher_model empty or name that one."
        )
    return recorded if recorded is not None else named


def named_architecture(name: str, num_classes: int) -> dict[str, Any]:
    """The stored-architecture JSON of a named teacher with `num_classes` classes: a RegNet or an XCiT."""
    if name in regnet.REGNET_CONFIGS:
        return regnet.architecture_of(regnet.create(name, num_classes=num_classes))
    if name in models.MODEL_CONFIGS:
        return models.architecture_of(models.create(name, num_classes=num_classes))
    known = [*regnet.REGNET_CONFIGS, *models.MODEL_CONFIGS]
    raise ConfigError(f"Unknown config.distillation.teacher_model {name!r}: choose one of {', '.join(known)}.")


# What a model's name stands for: a RegNet's configuration; an XCiT's size and patch (models.MODEL_CONFIGS), whatever
# its QKV embedding or training options (drop path, BatchNorm groups) were.
NAMED_FIELDS = {"regnet": ("family", "name"), "xcit": ("patch_size", "embed_dim", "depth", "num_heads", "tokens_norm")}


def same_model(recorded: dict[str, Any], named: dict[str, Any]) -> bool:
    """Whether a recorded architecture is the named model: the same family and what the name stands for."""
    family = named.get("family", "xcit")
    if recorded.get("family", "xcit") != family:
        return False
    return all(recorded.get(field) == named.get(field) for field in NAMED_FIELDS[family])


def describe(architecture: dict[str, Any]) -> str:
    if architecture.get("family") == "regnet":
        return f"RegNet {architecture.get('name')}"
    fields = ("patch_size", "embed_dim", "depth", "num_heads", "qkv_embed")
    return "XCiT(" + ", ".join(f"{k}={architecture.get(k)}" for k in fields) + ")"


def build_teacher(architecture: dict[str, Any], num_classes: int, dtype: Any, platform: str) -> nn.Module:
    """The teacher module of a stored architecture, computing in `dtype`, with the layers for `platform`'s devices.
    ConfigError if its class count is not the student's `num_classes`."""
    if architecture.get("family") == "regnet":
        teacher = regnet.from_architecture(architecture, dtype=dtype)
    else:
        teacher = models.for_platform(
            models.from_architecture({**models.architecture_from_json(architecture), "dtype": dtype}), platform
        )
    if teacher.num_classes != num_classes:
        raise ConfigError(
            f"The teacher ({describe(architecture)}) predicts {teacher.num_classes} classes, the student "
            f"{num_classes}: give config.distillation.teacher_path a teacher trained on the student's classes."
        )
    return teacher


def from_config(config: ml_collections.ConfigDict, num_classes: int, dtype: Any, platform: str) -> Distillation | None:
    """config.distillation as the train step takes it; None when it is off."""
    if not is_on(config):
        return None
    options = config.distillation
    teacher = build_teacher(teacher_architecture(config, num_classes), num_classes, dtype, platform)
    return Distillation(kind=options.type, alpha=options.alpha, tau=options.tau, teacher=teacher)


def abstract_variables(teacher: nn.Module, image_size: int) -> Any:
    """The teacher's variables as shapes and dtypes ({'params', 'batch_stats'}), nothing allocated."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: teacher.init(jax.random.key(0), images, train=False))


def random_init(teacher: nn.Module, image_size: int, seed: int = 0) -> Callable[[], Any]:
    """A function initializing the teacher's variables at random (benchmarks and tests: the step's cost, not its
    values); jit it with out_shardings."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return lambda: teacher.init(jax.random.key(seed), images, train=False)


def load_variables(path: str, abstract: Any, shardings: Any) -> Any:
    """The teacher's variables read from `path`, checked against the teacher's shapes, laid out as `shardings`.

    Every process reads the file and places its own shards (jax.make_array_from_callback), so a pod needs no
    broadcast. ConfigError naming the variables that differ, or saying the file cannot be read.
    """
    try:
        loaded = flatten(read_weights(path).variables)
    except CheckpointError as error:  # a damaged teacher is a bad input of this run, not its own storage failing
        raise ConfigError(f"config.distillation.teacher_path: {error}") from None
    wanted = flatten(abstract)
    differ = sorted(
        "/".join(key)
        for key in set(wanted) | set(loaded)
        if key not in wanted or key not in loaded or np.shape(loaded[key]) != wanted[key].shape
    )
    if differ:
        raise ConfigError(
            f"config.distillation.teacher_path={path} does not fit the teacher ({len(differ)} variables differ: "
            f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}): give teacher_path the weights of that "
            "teacher, or set config.distillation.teacher_model to the model they are."
        )
    placements = flatten(shardings)

    def place(key: tuple[str, ...]) -> jax.Array:
        value = np.asarray(loaded[key], dtype=wanted[key].dtype)
        return jax.make_array_from_callback(value.shape, placements[key], lambda index: value[index])

    logging.info("Distillation teacher: %d variables from %s.", len(wanted), path)
    return unflatten({key: place(key) for key in wanted})
