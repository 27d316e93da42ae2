"""A Plan as a user reads it (report) and as one JSON object (summary)."""

from __future__ import annotations

import dataclasses
from typing import Any

from qkv_vit.plan import hlo
from qkv_vit.plan.planning import Plan, StepCost

GiB = 2**30


def _range(values: tuple[float, float] | list[float] | None, unit: str, scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "unknown"
    low, high = (v * scale for v in values)
    return (
        f"{low:.{digits}f}-{high:.{digits}f} {unit}"
        if f"{low:.{digits}f}" != f"{high:.{digits}f}"
        else (f"{low:.{digits}f} {unit}")
    )


def _seconds(value: float | None) -> str:
    return f"{value * 1e3:.1f} ms" if value is not None else "unknown"


def step_lines(name: str, step: StepCost, plan: Plan) -> list[str]:
    hbm = plan.chip.hbm_bytes if plan.chip else None
    memory = f"{step.memory_bytes / GiB:.2f} GiB" + (
        f" of {hbm / GiB:.0f} GiB HBM ({step.memory_bytes / hbm:.0%})" if hbm else ""
    )
    lines = [
        f"{name} step (program {step.fingerprint}):",
        f"  memory per chip  {memory}",
        f"  flops per chip   {step.flops / 1e9:.1f} GFLOP" if step.flops else "  flops per chip   unknown",
        f"  bytes per chip   {step.bytes_accessed / 1e9:.2f} GB accessed"
        if step.bytes_accessed
        else "  bytes per chip   unknown",
        f"  step time        {_seconds(step.bandwidth_seconds)} (bytes / HBM bandwidth), "
        f"{_seconds(step.cost_model_seconds)} (XLA's cost model, corrected), "
        f"{_seconds(step.cycles_seconds)} (the compiler's kernel cycles summed)",
    ]
    mfu = plan.mfu(step)
    if mfu:
        lines.append(f"  MFU              {_range(mfu, '%', 100)} of the bfloat16 peak")
    for line in hlo.grouped(list(step.collectives)):
        lines.append(f"  collectives      {line}")
    return lines


def report(plan: Plan, price_per_chip_hour: float | None = None) -> str:
    config, target = plan.config, plan.target
    chip = plan.chip.name if plan.chip else target.device_kind
    lines = [
        f"Plan: {config.model_name}{f' qkv={config.qkv}' if config.qkv else ''}, {config.compute_dtype}, global "
        f"batch {config.global_batch_size} on {target.name} ({target.device_count} x {chip} in "
        f"{target.process_count} process(es)): {plan.per_chip_batch} images per chip; layers: {plan.layer_impl} "
        f"(for {target.platform}).",
        *step_lines("Train", plan.train, plan),
        *step_lines("Eval", plan.eval, plan),
    ]
    if plan.fits is not None:
        worst = max(plan.train.memory_bytes, plan.eval.memory_bytes)
        verdict = "fits" if plan.fits else f"does NOT fit: {(worst - plan.chip.hbm_bytes) / GiB:.2f} GiB over"
        lines.append(f"Memory: {verdict}.")
    if plan.max_per_chip_batch is not None:
        lines.append(
            f"Largest per-chip batch that fits: about {plan.max_per_chip_batch} (memory linear in the batch, from "
            f"compiles at {plan.per_chip_batch} and {plan.per_chip_batch // 2} per chip)."
        )
    elif plan.chip is not None:
        lines.append(
            "Largest per-chip batch that fits: not estimated (--nomax-batch, or memory did not grow with "
            "the batch between half of it and it)."
        )
    lines.append(f"Throughput: {_range(plan.images_per_s, 'images/s', digits=0)} on the slice.")
    cost = plan.cost(price_per_chip_hour)
    length = f"{plan.total_steps} steps" + (f" ({plan.steps_per_epoch} per epoch)" if plan.steps_per_epoch else "")
    if cost:
        lines.append(
            f"Run: {length}, {plan.evaluations} evaluation(s): {_range(cost['run_hours'], 'hours')}"
            + (f"; an epoch {_range(cost['epoch_hours'], 'hours', digits=2)}" if cost["epoch_hours"] else "")
            + f"; {_range(cost['chip_hours'], 'chip-hours', digits=0)}"
            + (
                f", {_range(cost['cost'], 'USD', digits=0)} at ${cost['price_per_chip_hour']:.2f} per chip-hour"
                if cost["cost"]
                else ""
            )
            + "."
        )
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _step_summary(step: StepCost, plan: Plan) -> dict[str, Any]:
    fields = dataclasses.asdict(step)
    fields["collectives"] = [dataclasses.asdict(c) for c in step.collectives]
    fields["seconds"] = step.seconds
    fields["mfu"] = plan.mfu(step)
    return fields


def summary(plan: Plan, price_per_chip_hour: float | None = None) -> dict[str, Any]:
    config, target = plan.config, plan.target
    return {
        "model": config.model_name,
        "qkv": config.qkv,
        "compute_dtype": config.compute_dtype,
        "topology": target.name,
        "device_kind": target.device_kind,
        "chips": target.device_count,
        "processes": target.process_count,
        "global_batch_size": config.global_batch_size,
        "per_chip_batch": plan.per_chip_batch,
        "layer_impl": plan.layer_impl,
        "hbm_bytes": plan.chip.hbm_bytes if plan.chip else None,
        "fits": plan.fits,
        "max_per_chip_batch": plan.max_per_chip_batch,
        "images_per_s": plan.images_per_s,
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        **plan.cost(price_per_chip_hour),
        "train": _step_summary(plan.train, plan),
        "eval": _step_summary(plan.eval, plan),
        "warnings": list(plan.warnings),
    }
