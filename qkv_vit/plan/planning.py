"""plan(config, target): the train and eval steps the trainer would run on `target`, compiled, and what the
compiler says of them per chip: memory against HBM, flops, bytes moved, a step-time range, collectives; from
those, images/s, the run's length, chip-hours and cost, and warnings about the recipe at this scale.

Every figure is a compiler estimate, not a measurement: three step times bound the step from different sides
(docs/benchmarks.md, "Planning a slice"), and none of them sees the input pipeline or the host.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import ml_collections

from qkv_vit import data, models
from qkv_vit.data.catalog import known_examples, known_num_classes
from qkv_vit.errors import ConfigError
from qkv_vit.plan import hlo
from qkv_vit.plan.chips import Chip, chip_of
from qkv_vit.train import program, trainer
from qkv_vit.train.config import check_config, check_fits
from qkv_vit.train.target import Target

SMALL_MIXING_SHARD = 16  # images per chip below which per-chip mixup / cutmix pairs few images (XCiT mixed 64)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One compiled step on one chip, as the compiler estimates it."""

    fingerprint: str  # program.fingerprint of the lowered step
    memory_bytes: int  # arguments + outputs + temporaries - what the outputs reuse of the arguments
    flops: float | None
    bytes_accessed: float | None
    bandwidth_seconds: float | None  # bytes accessed / HBM bandwidth
    cost_model_seconds: float | None  # XLA's optimal_seconds with libtpu's negative custom calls taken out
    raw_cost_model_seconds: float | None  # optimal_seconds as XLA reports it
    cycles_seconds: float | None  # the compiler's per-kernel cycle estimates summed, over the clock
    collectives: tuple[hlo.Collective, ...]

    @property
    def seconds(self) -> tuple[float, float] | None:
        """(fastest, slowest) of the step-time estimates."""
        known = [s for s in (self.bandwidth_seconds, self.cost_model_seconds, self.cycles_seconds) if s and s > 0]
        return (min(known), max(known)) if known else None


def compile_step(lowered: Any, target: Target) -> StepCost:
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    peak -= memory.alias_size_in_bytes
    costs = compiled.cost_analysis() or {}
    costs = costs[0] if isinstance(costs, list) else costs
    text = compiled.as_text()
    chip = chip_of(target.device_kind)
    accessed, raw = costs.get("bytes accessed"), costs.get("optimal_seconds")
    return StepCost(
        fingerprint=program.fingerprint(lowered),
        memory_bytes=int(peak),
        flops=costs.get("flops"),
        bytes_accessed=accessed,
        bandwidth_seconds=accessed / chip.hbm_bytes_per_s if chip and accessed else None,
        cost_model_seconds=raw + hlo.negative_cost_calls(text) if raw is not None else None,
        raw_cost_model_seconds=raw,
        cycles_seconds=hlo.summed_cycles(text) / chip.clock_hz if chip else None,
        collectives=tuple(hlo.collectives(text, target.device_count)),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A config's run on a target, compiled: its steps' costs per chip and what follows from them (report.py)."""

    config: ml_collections.ConfigDict
    target: Target
    chip: Chip | None
    layer_impl: str  # the layers the program computes with (layer_impl "auto" resolved for the target)
    per_chip_batch: int
    steps_per_epoch: int | None
    total_steps: int
    evaluations: int  # of the eval split during the run, the final one included
    eval_steps: int | None  # eval batches per evaluation (None: the eval split's size is not known)
    train: StepCost
    eval: StepCost
    max_per_chip_batch: int | None  # the largest that fits HBM, linear in the batch from two compiles
    warnings: tuple[str, ...]

    @property
    def fits(self) -> bool | None:
        if self.chip is None:
            return None
        return max(self.train.memory_bytes, self.eval.memory_bytes) <= self.chip.hbm_bytes

    def mfu(self, step: StepCost) -> tuple[float, float] | None:
        """(lowest, highest) fraction of the chip's bfloat16 peak that a step's flops reach in its step times."""
        if not (step.flops and self.chip and step.seconds):
            return None
        return tuple(step.flops / self.chip.peak_bf16_flops / seconds for seconds in reversed(step.seconds))

    @property
    def images_per_s(self) -> tuple[float, float] | None:
        seconds = self.train.seconds
        batch = self.config.global_batch_size
        return (batch / seconds[1], batch / seconds[0]) if seconds else None

    def run_seconds(self) -> tuple[float, float] | None:
        """(fastest, slowest) time of the whole run: its train steps and its evaluations."""
        train, evaluation = self.train.seconds, self.eval.seconds
        if train is None:
            return None
        per_eval = [s * self.eval_steps for s in evaluation] if evaluation and self.eval_steps else [0.0, 0.0]
        return tuple(self.total_steps * t + self.evaluations * e for t, e in zip(train, per_eval))

    def cost(self, price_per_chip_hour: float | None) -> dict[str, Any]:
        run = self.run_seconds()
        price = (
            price_per_chip_hour if price_per_chip_hour is not None else (self.chip and self.chip.price_per_chip_hour)
        )
        if run is None:
            return {}
        chip_hours = [seconds / 3600 * self.target.device_count for seconds in run]
        return {
            "run_hours": [s / 3600 for s in run],
            "epoch_hours": [self.steps_per_epoch * s / 3600 for s in self.train.seconds]
            if self.steps_per_epoch
            else None,
            "chip_hours": chip_hours,
            "price_per_chip_hour": price,
            "cost": [hours * price for hours in chip_hours] if price else None,
        }


def plan(config: ml_collections.ConfigDict, target: Target, max_batch: bool = True) -> Plan:
    """Compile config's train and eval steps for `target` as the trainer builds them (trainer.build_run), reading
    data only where data.catalog does not know what the program needs of them (source_if_needed); ConfigError /
    DataConfigError as the trainer would raise them, before anything compiles. `max_batch`: compile the train step
    once more at half the batch to estimate the largest per-chip batch that fits."""
    run = planned_run(config, target)
    train = compile_step(program.lower_train_step(run), target)
    evaluation = compile_step(program.lower_eval_step(run), target)
    per_chip = config.global_batch_size // target.device_count
    chip = chip_of(target.device_kind)
    largest = largest_batch(config, target, train.memory_bytes, chip) if max_batch and chip else None
    eval_steps = eval_batches(config)
    every = config.eval_every_steps
    return Plan(
        config=config,
        target=target,
        chip=chip,
        layer_impl=models.layer_impl_of(run.model),
        per_chip_batch=per_chip,
        steps_per_epoch=trainer.epoch_length(config, run.source, target),
        total_steps=run.total_steps,
        evaluations=1 + (max(0, (run.total_steps - 1) // every) if every else 0),
        eval_steps=eval_steps,
        train=train,
        eval=evaluation,
        max_per_chip_batch=largest,
        warnings=tuple(warnings(config, target, run.model, train)),
    )


def planned_run(config: ml_collections.ConfigDict, target: Target) -> trainer.Run:
    """The Run the trainer would build for config on target, checked as the trainer checks it, with no data read
    where data.catalog knows what the program needs of them."""
    check_config(config)
    source = source_if_needed(config)
    model = trainer.build_model(config, None if source else known_num_classes(config.data))
    check_fits(config, model, target)
    return trainer.build_run(config, None, source, model, target=target)


def source_if_needed(config: ml_collections.ConfigDict) -> data.DataSource | None:
    """The data, opened, where the program needs their class count or the run's length their size and
    data.catalog does not know it (an image folder, the digits: data at hand); else None, and nothing is read."""
    needs_size = config.total_steps is None or config.optimizer.warmup_steps is None
    size_known = not needs_size or known_examples(config.data, "train") is not None
    if size_known and known_num_classes(config.data) is not None:
        return None
    logging.info("Reading %s: data.catalog does not know its size or classes.", config.data.name or config.data.source)
    return data.open_source(config.data)


def eval_batches(config: ml_collections.ConfigDict) -> int | None:
    """Eval batches per evaluation (the last one padded), where data.catalog knows the eval split's size."""
    examples = known_examples(config.data, "eval")
    return math.ceil(examples / (config.eval_batch_size or config.global_batch_size)) if examples else None


def largest_batch(config: ml_collections.ConfigDict, target: Target, memory: int, chip: Chip) -> int | None:
    """The largest per-chip batch whose train step fits the chip's HBM: memory taken as linear in the batch
    through the compiled step at this batch and at half of it. None where half the batch is no valid run."""
    half = config.copy_and_resolve_references()
    half.global_batch_size = config.global_batch_size // 2
    if half.global_batch_size % target.device_count or half.global_batch_size < target.device_count:
        return None
    try:
        half_run = planned_run(half, target)
    except ConfigError as error:
        logging.info("No compile at half the batch (%s): the largest batch is not estimated.", error)
        return None
    half_memory = compile_step(program.lower_train_step(half_run), target).memory_bytes
    per_chip = config.global_batch_size // target.device_count
    per_image = (memory - half_memory) / (per_chip - per_chip // 2)
    if per_image <= 0:
        return None
    return int((chip.hbm_bytes - (memory - per_image * per_chip)) // per_image)


def warnings(config: ml_collections.ConfigDict, target: Target, model: Any, train: StepCost) -> list[str]:
    """What a user should know before renting the slice: the recipe's behaviour at this per-chip batch, and the
    estimates' own faults."""
    found = []
    per_chip, group = config.global_batch_size // target.device_count, model.batch_norm_group_size
    if target.device_count > 1 and (group is None or per_chip % group):
        found.append(
            f"BatchNorm groups of {group or config.global_batch_size} images span the chips' shards of {per_chip} "
            "images: each BatchNorm layer sums its statistics over the chips (two small all-reduces per layer)."
        )
    augment = config.data.augment
    if augment.mix_prob > 0 and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0) and per_chip < SMALL_MIXING_SHARD:
        found.append(
            f"Each chip mixes (mixup / cutmix) its own {per_chip} images with one lambda per chip; XCiT mixed 64 "
            "images per GPU."
        )
    if config.sharding == "fsdp" and config.mesh.fsdp != 1:
        ops = {c.op for c in train.collectives}
        if "all-gather" not in ops:
            found.append(
                "config.sharding='fsdp' produced no all-gather: the sharded parameters are gathered by all-reduce."
            )
        if "reduce-scatter" not in ops:
            found.append(
                "config.sharding='fsdp' produced no reduce-scatter: the gradients are all-reduced in full, "
                "as without FSDP; only the parameters' and optimizer state's memory is divided."
            )
    if train.raw_cost_model_seconds is not None and train.raw_cost_model_seconds < 0:
        found.append(
            f"XLA's cost model gave a negative step time ({train.raw_cost_model_seconds:.1f} s); the cost-model "
            f"estimate here adds back libtpu's {hlo.NEGATIVE_COST_CALL} custom calls (-1 s each)."
        )
    return found
