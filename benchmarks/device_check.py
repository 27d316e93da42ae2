"""One command on a GPU (or TPU) host: how fast qkv_vit trains there, and against timm on the same device.

    python benchmarks/device_check.py                      # about 7 minutes on one GPU; writes device_check.jsonl
    python benchmarks/device_check.py --out $OUT/device_check.jsonl --budget-s 420
    python benchmarks/device_check.py --smoke              # a 1-block model at 32x32 on any backend, seconds

Measures, in order of importance, until --budget-s is spent (what does not fit is recorded as skipped):
host-to-device copy rates of a uint8 and a float32 batch; then the trainer's own training step (AdamW,
BatchNorm statistics, the device-side finishing of uint8 batches: normalization, random erasing, mixup /
cutmix) of XCiT-N12/16 and T12/16 at batch 256, 224x224, in bfloat16 and float32, QKV linear and F-SNE m=8,
layer_impl "flax" and "cpu", on a device-resident uint8 batch and fed from host numpy batches (the
trainer's feeding: two batches in flight): images/s, step time, compile time, MFU against the device's
bfloat16 peak, the step's device memory (XLA's memory analysis); and, where torch and timm import, timm's XCiT training step (AMP
bfloat16, AdamW) eager and under torch.compile on the same device.

Each step is the trainer's own, built from configs/imagenet.py by trainer.build_run for this machine's devices, and
recorded with its program fingerprint (the one `python -m qkv_vit.plan` prints for the same config and devices).
Needs jax, flax, optax, ml_collections and this package: no TensorFlow, tfds or clu (the accelerator machines it
is meant for lack them; ml_collections is a small pure-Python wheel). Every measurement is printed and appended to the JSONL file as soon as
it is made, so a run cut short keeps what it measured. The last line printed is a JSON summary.
"""

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from train_step import TRAIN_FLOPS_PER_MAC, peak_tflops

sys.path.insert(0, str(harness.REPO))  # configs/ is not a package of the installed project
NUM_CLASSES = 1000
TIMM_NAMES = {"xcit_nano_12_p16": "xcit_nano_12_p16_224", "xcit_tiny_12_p16": "xcit_tiny_12_p16_224"}


def plan(smoke: bool) -> list[dict[str, Any]]:
    """The measurements, most important first. Step configs: model, qkv, dtype, layer_impl, feed."""

    def step(model, qkv="linear", dtype="bfloat16", impl="flax", feed="device"):
        return {"kind": "train_step", "model": model, "qkv": qkv, "dtype": dtype, "layer_impl": impl, "feed": feed}

    nano, tiny = "xcit_nano_12_p16", "xcit_tiny_12_p16"
    order = [
        {"kind": "copy"},
        step(nano),
        {"kind": "timm", "model": nano, "compiled": False},
        step(nano, feed="host"),
        step(nano, impl="cpu"),
        step(nano, "fsne_m8"),
        step(nano, dtype="float32"),
        step(tiny),
        {"kind": "timm", "model": nano, "compiled": True},
        step(tiny, "fsne_m8"),
        {"kind": "timm", "model": tiny, "compiled": False},
        {"kind": "timm", "model": tiny, "compiled": True},
    ]
    if smoke:  # one step configuration through every path: flax layers, host feeding, bf16
        return [{"kind": "copy"}, step(nano, feed="host"), {"kind": "timm", "model": nano, "compiled": False}]
    every = [
        step(m, q, d, i, f)
        for m, q, d, i, f in itertools.product(
            (nano, tiny), ("linear", "fsne_m8"), ("bfloat16", "float32"), ("flax", "cpu"), ("device", "host")
        )
    ]
    return order + [config for config in every if config not in order]


def record(out: Path, result: dict[str, Any]) -> None:
    print(json.dumps(result, sort_keys=True), flush=True)
    with out.open("a") as file:
        file.write(json.dumps(result, sort_keys=True) + "\n")


def copy_rates(args: argparse.Namespace) -> dict[str, Any]:
    """Host-to-device copy rate of one batch, uint8 and float32 (median of 5 copies, after one)."""
    import jax
    import numpy as np

    device = jax.local_devices()[0]
    result = {"batch": args.batch_size, "image_size": args.image_size}
    for dtype in ("uint8", "float32"):
        batch = np.zeros((args.batch_size, args.image_size, args.image_size, 3), dtype)
        jax.device_put(batch, device).block_until_ready()
        seconds = harness.median(harness.time_calls(lambda: jax.device_put(batch, device).block_until_ready(), 5))  # noqa: B023 - called at once
        result[f"{dtype}_gb_per_s"] = round(batch.nbytes / seconds / 1e9, 2)
        result[f"{dtype}_images_per_s"] = round(args.batch_size / seconds, 1)
    return result


def step_config(config: dict[str, Any], args: argparse.Namespace):
    """configs/imagenet.py (XCiT's recipe: AdamW, BatchNorm groups of 64, erasing, mixup / cutmix, label smoothing)
    for one measured configuration: its model, QKV embedding, compute dtype and layers, at this batch and size."""
    from configs import imagenet

    size = config["model"].removeprefix("xcit_")
    run_config = imagenet.get_config(f"model={size},qkv={config['qkv']},batch={args.batch_size}")
    run_config.compute_dtype = config["dtype"]
    run_config.model.layer_impl = config["layer_impl"]
    run_config.data.image_size = args.image_size
    run_config.total_steps, run_config.optimizer.warmup_steps = 500_000, 6_250  # only shape the lr schedule
    if args.smoke:
        run_config.model.update(depth=1, embed_dim=32, num_heads=4, cls_attn_layers=1)
        run_config.model.batch_norm_group_size = None  # a batch of 8
    return run_config


def build_step(config: dict[str, Any], args: argparse.Namespace):
    """The trainer's own run (trainer.build_run) for this machine's devices, with a fresh state."""
    from qkv_vit.train import trainer
    from qkv_vit.train.config import check_config, check_fits
    from qkv_vit.train.target import Target

    run_config = step_config(config, args)
    check_config(run_config)
    model = trainer.build_model(run_config, NUM_CLASSES)
    target = Target.present()
    check_fits(run_config, model, target)
    run = trainer.build_run(run_config, None, None, model, target=target)
    return run, trainer.fresh_state(run)


def train_step(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from qkv_vit.models.flops import count_macs
    from qkv_vit.train import program, sharding

    run, state = build_step(config, args)
    jitted = run.steps
    rng = np.random.default_rng(0)
    pool = [
        {
            "image": rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), np.uint8),
            "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32),
        }
        for _ in range(3)
    ]
    if config["feed"] == "device":
        resident = sharding.global_batch(pool[0], jitted.batch_sharding)
        batches = itertools.repeat(resident)
    else:  # as the trainer feeds: host numpy batches put on the devices two steps ahead
        batches = sharding.prefetch_to_device(itertools.cycle(pool), 2, jitted.batch_sharding)
    start = time.perf_counter()
    lowered = jitted.train_step.lower(state, next(batches), None)  # no distillation teacher
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    for _ in range(1 + args.warmup):
        state, metrics = compiled(state, next(batches), None)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, next(batches), None)
    loss = float(jax.block_until_ready(metrics["loss"]))
    step_s = (time.perf_counter() - start) / args.steps
    devices = jax.devices()
    images_per_s = args.batch_size / step_s
    peak = peak_tflops(devices[0].device_kind, args.peak_tflops)
    achieved = images_per_s * TRAIN_FLOPS_PER_MAC * count_macs(run.model, args.image_size) / 1e12
    return {
        **config,
        "batch": args.batch_size,
        "image_size": args.image_size,
        "images_per_s": round(images_per_s, 1),
        "step_ms": round(1e3 * step_s, 2),
        "compile_s": round(compile_s, 1),
        "program": program.fingerprint(lowered),  # python -m qkv_vit.plan's for the same config and devices
        "loss": loss,
        "model_tflops": round(achieved, 2),
        "mfu_vs_bf16_peak": round(achieved / (peak * len(devices)), 4) if peak else None,
        "step_memory_bytes": step_memory(compiled),
        "process_peak_memory_so_far": harness.peak_memory(devices),
    }


def step_memory(compiled: Any) -> int | None:
    """The compiled step's own device memory (arguments, outputs, temporaries; the donated state counted once),
    from XLA's memory analysis: per configuration, unlike the process's peak, which only grows."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def timm_step(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """timm's XCiT training step: AdamW, AMP bfloat16, channels-first float batches already on the device."""
    try:
        import timm
        import torch
    except ImportError as error:
        return {**config, "skipped": f"needs torch and timm ({error})"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this configuration's peak, not the process's
    overrides = (
        dict(depth=1, embed_dim=32, num_heads=4, cls_attn_layers=1, img_size=args.image_size) if args.smoke else {}
    )
    model = timm.create_model(TIMM_NAMES[config["model"]], num_classes=NUM_CLASSES, **overrides).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    targets = torch.softmax(torch.randn(args.batch_size, NUM_CLASSES, device=device), dim=-1)
    forward = torch.compile(model) if config["compiled"] else model

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = torch.sum(-targets * torch.log_softmax(forward(images), dim=-1), dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    synchronize()
    first_s = time.perf_counter() - start  # includes torch.compile's compilation
    for _ in range(args.warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {
        **config,
        "device": device,
        "batch": args.batch_size,
        "image_size": args.image_size,
        "images_per_s": round(args.batch_size / step_s, 1),
        "step_ms": round(1e3 * step_s, 2),
        "first_step_s": round(first_s, 1),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peak_memory_bytes": memory,
    }


MEASURE: dict[str, Callable[[dict[str, Any], argparse.Namespace], dict[str, Any]]] = {
    "copy": lambda config, args: {**config, **copy_rates(args)},
    "train_step": train_step,
    "timm": timm_step,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "device_check.jsonl"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no measurement after this many seconds")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--peak-tflops", type=float, help="bfloat16 peak TFLOP/s per device (default: a table)")
    parser.add_argument("--smoke", action="store_true", help="a 1-block model at 32x32, batch 8, a short plan")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.smoke else 256)
    args.image_size = args.image_size or (32 if args.smoke else 224)
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # JAX would take 75% of the GPU at start, leaving timm (in this process) too little; and each configuration's
    # memory is read from XLA's analysis, so nothing is lost by allocating on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = jax.devices()[0]
    record(
        out,
        {
            "kind": "device",
            "backend": jax.default_backend(),
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
            "jax": jax.__version__,
            "peak_bf16_tflops": peak_tflops(device.device_kind, args.peak_tflops),
            "smoke": args.smoke,
            "date": time.strftime("%Y-%m-%d"),
            **harness.machine(),
        },
    )
    done, skipped = [], []
    for config in plan(args.smoke):
        if time.perf_counter() - started > args.budget_s:
            skipped.append(config)
            record(out, {**config, "skipped": f"over the {args.budget_s:.0f} s budget"})
            continue
        try:
            result = MEASURE[config["kind"]](config, args)
        except Exception as error:  # one failing configuration (e.g. out of memory) must not lose the others
            result = {**config, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        record(out, {**result, "elapsed_s": round(time.perf_counter() - started, 1)})
        done.append(result)
    summary = {
        "kind": "summary",
        "measured": len(done),
        "skipped": len(skipped),
        "out": str(out),
        "seconds": round(time.perf_counter() - started, 1),
    }
    harness.emit(summary)
    return summary


if __name__ == "__main__":
    main()
