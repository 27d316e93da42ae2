"""Time the trainer's full training step: forward, backward, AdamW update and BatchNorm statistics.

    python benchmarks/train_step.py --model xcit_nano_12_p16 --qkv-embed linear --batch-size 32 \\
        --image-size 224 --steps 10
    python benchmarks/train_step.py --qkv fsne_m8 --dtype bfloat16        # a QKV preset, bf16 compute
    python benchmarks/train_step.py --all-qkv --repeats 3                 # every preset, interleaved rounds
    python benchmarks/train_step.py --teacher regnety_160 --dtype bfloat16  # distilled: the teacher's forward too

The step is the trainer's own (`qkv_vit.train.trainer.build_run`: the same model, optimizer, schedule,
mesh, shardings, donation and jit), fed like the trainer feeds it: a host numpy batch assembled into a
global array every step. The first step's time includes compilation; then `--warmup` untimed steps;
then `--steps` timed steps, each waited for. Prints images/s (batch / median step), the step time,
compile time, peak memory, parameter count, MACs and model FLOPs utilization (MFU, where the device's
peak is known or given), whether anything compiled again after the first step, and a final JSON line.
Multi-process: the same command on each process with --coordinator-address, --num-processes,
--process-id (CPU processes talk through gloo, as `python -m qkv_vit.main` does).
"""

import argparse
import sys
import time
from typing import Any

import harness

# bf16 dense peak TFLOP/s per device, matched in this order against jax's device_kind (first match wins).
# NVIDIA datasheets (SXM parts unless named); TPUs per chip (v4 and later show one device per chip).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)
TRAIN_FLOPS_PER_MAC = 6  # forward 2 flops per multiply-add, backward twice the forward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qkv_vit import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xcit_nano_12_p16", choices=models.list_models())
    parser.add_argument("--qkv", default="", help=f"a QKV preset: {', '.join(models.QKV_PRESETS)}")
    parser.add_argument("--qkv-embed", choices=models.QKV_EMBEDDINGS, help="the embedding alone, with its defaults")
    parser.add_argument("--all-qkv", action="store_true", help="every QKV preset, each in a fresh process")
    parser.add_argument(
        "--presets",
        default=",".join(models.QKV_PRESETS),
        help="with --all-qkv: the presets to compare, comma-separated (linear first)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="with --all-qkv: interleaved rounds (medians reported)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument(
        "--layer-impl",
        default="auto",
        choices=models.LAYER_IMPLS,
        help="flax's layers or the CPU kernels (auto: cpu on a CPU backend)",
    )
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--depth", type=int, help="override the model's depth (e.g. 1 for a smoke test)")
    parser.add_argument("--embed-dim", type=int, help="override the token width")
    parser.add_argument("--num-heads", type=int, help="override the head count")
    parser.add_argument("--cls-attn-layers", type=int, help="override the number of class-attention blocks")
    parser.add_argument(
        "--teacher", help="distill from this named model (e.g. regnety_160): its forward runs in every step"
    )
    parser.add_argument("--mesh-fsdp", type=int, default=1, help="size of the mesh's fsdp axis")
    parser.add_argument("--sharding", default="replicate", choices=["replicate", "fsdp"])
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (overrides the table)")
    parser.add_argument("--profile", help="write a jax.profiler trace of the timed steps to this directory")
    parser.add_argument(
        "--barrier",
        help="DIR:N: after warmup, wait until N processes have reached DIR before the timed steps (parallel_runs.py)",
    )
    parser.add_argument(
        "--allocator",
        default="reuse",
        choices=harness.ALLOCATORS,
        help="reuse: glibc keeps freed memory (see harness.ALLOCATOR_ENV); system: glibc's defaults",
    )
    parser.add_argument("--coordinator-address", help="host:port of process 0, for a multi-process run")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)
    if args.qkv and args.qkv not in models.QKV_PRESETS:
        parser.error(f"unknown --qkv preset {args.qkv!r}; choose one of {', '.join(models.QKV_PRESETS)}")
    if args.qkv and args.qkv_embed:
        parser.error("give --qkv (a preset) or --qkv-embed (one option), not both")
    args.presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in args.presets if p not in models.QKV_PRESETS]
    if unknown or not args.presets or args.presets[0] != "linear":
        parser.error(
            f"--presets must start with linear (the baseline) and name presets of {list(models.QKV_PRESETS)}, "
            f"got {args.presets}"
        )
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def make_config(args: argparse.Namespace):
    """The trainer's config for this benchmark: its defaults (AdamW, XCiT's schedule) with our sizes."""
    from qkv_vit.train import base_config

    config = base_config()
    config.model_name, config.qkv, config.compute_dtype = args.model, args.qkv, args.dtype
    overrides = {
        "qkv_embed": args.qkv_embed,
        "depth": args.depth,
        "embed_dim": args.embed_dim,
        "num_heads": args.num_heads,
        "cls_attn_layers": args.cls_attn_layers,
        "layer_impl": args.layer_impl,
    }
    config.model.update({key: value for key, value in overrides.items() if value is not None})
    config.global_batch_size = args.batch_size
    config.data.image_size = args.image_size
    config.total_steps, config.optimizer.warmup_steps = 10_000, 100  # only shapes the lr schedule
    config.mesh.fsdp, config.sharding = args.mesh_fsdp, args.sharding
    if args.teacher:  # XCiT's † recipe: hard distillation, the teacher in the compute dtype
        config.distillation.update(type="hard", teacher_model=args.teacher)
    return config


def setup_run(config, num_classes: int):
    """The trainer's Run (model, optimizer, shardings, jitted step) without a data set: the class count,
    the only thing the trainer reads from the data to build it, is given here instead."""
    from qkv_vit.train import trainer
    from qkv_vit.train.config import check_config, check_fits
    from qkv_vit.train.target import Target

    check_config(config)
    model = trainer.build_model(config, num_classes)
    target = Target.present()
    check_fits(config, model, target)  # the trainer's one-line errors (batch vs devices, ...)
    return trainer.build_run(config, workdir=None, source=None, model=model, target=target)


def local_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0) -> dict:
    """This process's share of a global batch, as the input pipeline yields it: uint8 images and labels (the
    step normalizes, erases and mixes them on the device)."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed + jax.process_index())
    size = batch_size // jax.process_count()
    labels = rng.integers(0, num_classes, size).astype(np.int32)
    images = rng.integers(0, 256, (size, image_size, image_size, 3), dtype=np.uint8)
    return {"image": images, "label": labels}


def forward_macs(model, variables, image_size: int) -> int:
    """Multiply-adds of one image's eval-mode forward, from XLA's cost analysis of it (flops / 2): for a teacher,
    whose architecture models.flops does not count."""
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
    return int(compiled.cost_analysis()["flops"] / 2)


def wait_at_barrier(spec: str, timeout_s: float = 1800.0) -> None:
    """DIR:N: mark this process as ready in DIR, then wait until N processes are (file marks: no network)."""
    import os
    from pathlib import Path

    directory, _, count = spec.rpartition(":")
    Path(directory, f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(Path(directory).glob("ready-*"))) < int(count):
        if time.monotonic() > deadline:
            raise SystemExit(f"error: --barrier {spec}: the other processes did not arrive within {timeout_s:.0f} s")
        time.sleep(0.01)


def peak_tflops(device_kind: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from qkv_vit import models
    from qkv_vit.models.flops import count_macs
    from qkv_vit.train import sharding

    compile_events = harness.CompileEvents()
    rss_before_model = harness.peak_rss_bytes()
    config = make_config(args)
    run = setup_run(config, args.num_classes)
    state = jax.jit(run.steps.init_state, out_shardings=run.steps.state_sharding)()
    teacher = run.steps.init_teacher()  # --teacher: random variables of the named model (its cost, not its values)
    batch = local_batch(args.batch_size, args.image_size, args.num_classes)

    last_loss = float("nan")

    def step() -> None:
        nonlocal state, last_loss
        state, metrics = run.steps.train_step(state, sharding.global_batch(batch, run.steps.batch_sharding), teacher)
        last_loss = jax.block_until_ready(metrics["loss"])
        jax.block_until_ready(state)

    compiles_before, compile_seconds_before = compile_events.snapshot()
    first_step_s = harness.time_calls(step, 1)[0]
    compiles_after_first, compile_seconds = compile_events.snapshot()
    cache_after_first = run.steps.train_step._cache_size()
    harness.time_calls(step, args.warmup)
    if args.barrier:
        wait_at_barrier(args.barrier)
    if args.profile:
        jax.profiler.start_trace(args.profile)
    cpu_start, faults_start, timed_from = time.process_time(), harness.page_faults(), time.time()
    times = harness.time_calls(step, args.steps)
    timed_until = time.time()
    cpu_per_step = (time.process_time() - cpu_start) / args.steps
    faults_per_step = (harness.page_faults() - faults_start) / args.steps
    if args.profile:
        jax.profiler.stop_trace()
    later_compiles = compile_events.snapshot()[0] - compiles_after_first
    recompiled = later_compiles > 0 or run.steps.train_step._cache_size() != cache_after_first

    step_s = harness.median(times)
    images_per_sec = args.batch_size / step_s
    macs = count_macs(run.model, args.image_size)
    teacher_macs = forward_macs(run.steps.distillation.teacher, teacher, args.image_size) if args.teacher else 0
    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, args.peak_tflops)
    # The teacher's forward is model work too (2 flops per multiply-add, no backward), as in the plan's flops.
    achieved_tflops = images_per_sec * (TRAIN_FLOPS_PER_MAC * macs + 2 * teacher_macs) / 1e12
    return {
        "benchmark": "train_step",
        "model": args.model,
        "qkv": args.qkv or (args.qkv_embed or run.model.qkv_embed),
        "qkv_embed": run.model.qkv_embed,
        "dtype": args.dtype,
        "layer_impl": args.layer_impl,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "params": models.count_params(run.steps.abstract_state.params),
        "macs_per_image": macs,
        "teacher": args.teacher,
        "teacher_macs_per_image": teacher_macs,
        "steps": args.steps,
        "step_time_s": step_s,
        "step_times_s": times,
        "cpu_time_per_step_s": cpu_per_step,
        "page_faults_per_step": faults_per_step,
        "allocator": harness.allocator_in_use(),
        "images_per_sec": images_per_sec,
        "timed_from_unix_s": timed_from,
        "timed_until_unix_s": timed_until,
        "first_step_s": first_step_s,
        "compile_s": compile_seconds - compile_seconds_before,
        "compiles_in_first_step": compiles_after_first - compiles_before,
        "compiles_after_first_step": later_compiles,
        "recompiled_after_first_step": recompiled,
        "final_loss": float(last_loss),
        "train_tflops_per_sec": achieved_tflops,
        "peak_tflops_per_device": peak,
        "mfu": achieved_tflops / (peak * jax.device_count()) if peak else None,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": dict(run.mesh.shape),
        "sharding": args.sharding,
        "rss_before_model_bytes": rss_before_model,
        **harness.peak_memory(jax.local_devices()),
        "jax": jax.__version__,
        **harness.machine(),
    }


def report(result: dict[str, Any]) -> None:
    gib = 2**30
    print(
        f"{result['model']} qkv={result['qkv']} {result['dtype']} batch {result['batch_size']} at "
        f"{result['image_size']}px on {result['devices']} {result['platform']} device(s) "
        f"({result['processes']} process(es), mesh {result['mesh']}), {result['cpu']}, {result['cores']} cores"
    )
    print(f"  params {result['params']:,}, {result['macs_per_image'] / 1e9:.3f} GMACs/image")
    if result["teacher"]:
        print(f"  teacher {result['teacher']}: {result['teacher_macs_per_image'] / 1e9:.3f} GMACs/image (forward)")
    print(
        f"  step {result['step_time_s'] * 1e3:.1f} ms (median of {result['steps']}), "
        f"{result['images_per_sec']:.1f} images/s; process CPU time "
        f"{result['cpu_time_per_step_s'] * 1e3:.0f} ms/step, "
        f"{result['page_faults_per_step']:,.0f} page faults/step (allocator: {result['allocator']})"
    )
    print(f"  first step {result['first_step_s']:.1f} s (compile {result['compile_s']:.1f} s)")
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no known peak: --peak-tflops)"
    print(f"  {result['train_tflops_per_sec']:.3f} model TFLOP/s, MFU {mfu}")
    print(
        f"  peak memory {result['peak_memory_bytes'] / gib:.2f} GiB ({result['peak_memory_source']}; "
        f"RSS before the model {result['rss_before_model_bytes'] / gib:.2f} GiB)"
    )
    print(
        f"  recompiled after the first step: {result['recompiled_after_first_step']} "
        f"({result['compiles_after_first_step']} compilations after it)"
    )


def child_args(args: argparse.Namespace, preset: str) -> list[str]:
    """This command line for one preset, without --all-qkv / --repeats."""
    argv, skip = [], False
    for item in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if item in ("--all-qkv",) or item.startswith(("--repeats=", "--qkv=", "--qkv-embed=", "--presets=")):
            continue
        if item in ("--repeats", "--qkv", "--qkv-embed", "--presets"):
            skip = True
            continue
        argv.append(item)
    return argv + ["--qkv", preset]


def compare_presets(args: argparse.Namespace) -> dict[str, Any]:
    """Every QKV preset in its own process; `repeats` interleaved rounds so that noise hits all alike."""
    load_before = harness.load_average()
    runs: dict[str, list[dict]] = {preset: [] for preset in args.presets}
    for round_index in range(args.repeats):
        for preset in args.presets:
            result = harness.run_script("train_step.py", child_args(args, preset))
            runs[preset].append(result)
            print(
                f"round {round_index + 1}/{args.repeats} {preset}: {result['step_time_s'] * 1e3:.1f} ms/step, "
                f"{result['images_per_sec']:.1f} images/s",
                flush=True,
            )
    summary = {}
    for preset, results in runs.items():
        summary[preset] = {
            "params": results[0]["params"],
            "macs_per_image": results[0]["macs_per_image"],
            "step_time_s": harness.median([r["step_time_s"] for r in results]),
            "images_per_sec": harness.median([r["images_per_sec"] for r in results]),
            "compile_s": harness.median([r["compile_s"] for r in results]),
            "recompiled_after_first_step": any(r["recompiled_after_first_step"] for r in results),
            "mfu": results[0]["mfu"] and harness.median([r["mfu"] for r in results]),
        }
    baseline = summary["linear"]["step_time_s"]
    for entry in summary.values():
        entry["step_time_vs_linear"] = entry["step_time_s"] / baseline
    rows = [
        (
            p,
            f"{s['params']:,}",
            f"{s['macs_per_image'] / 1e9:.3f}",
            f"{s['step_time_s'] * 1e3:.0f}",
            f"{s['images_per_sec']:.1f}",
            f"{100 * (s['step_time_vs_linear'] - 1):+.1f}%",
            s["recompiled_after_first_step"],
        )
        for p, s in summary.items()
    ]
    print(harness.format_table(["qkv", "params", "GMACs", "step ms", "images/s", "vs linear", "recompiled"], rows))
    first = runs["linear"][0]
    return {
        "benchmark": "train_step_all_qkv",
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "presets": summary,
        "runs": runs,
        "load_average_before": load_before,
        "load_average_after": harness.load_average(),
        **{k: first[k] for k in ("cpu", "cores", "platform", "device_kind", "devices", "jax")},
    }


def initialize_distributed(args: argparse.Namespace) -> None:
    """As `python -m qkv_vit.main --coordinator_address ...` does: gloo collectives between CPU processes."""
    import jax

    if args.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.all_qkv:
        harness.emit(compare_presets(args))
        return
    initialize_distributed(args)
    started = time.perf_counter()
    result = benchmark(args)
    result["wall_s"] = time.perf_counter() - started
    import jax

    if jax.process_index() == 0:
        report(result)
        harness.emit(result)


if __name__ == "__main__":
    harness.apply_allocator(sys.argv)
    main()
