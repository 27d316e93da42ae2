"""Eval-mode throughput: images/second of the jitted forward pass (BatchNorm running statistics, no
dropout) at several batch sizes.

    python benchmarks/infer.py --model xcit_nano_12_p16 --batch-sizes 1,8,32,128 --image-size 224
    python benchmarks/infer.py --qkv fsne_m8 --dtype bfloat16

Each batch size compiles once (its time is reported), runs `--warmup` untimed calls, then `--steps`
timed calls; images/s is batch / median call time. The batch is placed on the devices once (a
data-parallel sharding over all of them), so this is the model's speed, not the input pipeline's.
Ends with one JSON line.
"""

import argparse
import sys
from typing import Any

import harness

DTYPES = ("float32", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qkv_vit import models

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xcit_nano_12_p16", choices=models.list_models())
    parser.add_argument("--qkv", default="", help=f"a QKV preset: {', '.join(models.QKV_PRESETS)}")
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--allocator",
        default="reuse",
        choices=harness.ALLOCATORS,
        help="reuse: glibc keeps freed memory (see harness.ALLOCATOR_ENV); system: glibc's defaults",
    )
    parser.add_argument("--depth", type=int, help="override the model's depth (e.g. 1 for a smoke test)")
    parser.add_argument("--embed-dim", type=int, help="override the token width")
    parser.add_argument("--cls-attn-layers", type=int, help="override the number of class-attention blocks")
    args = parser.parse_args(argv)
    if args.qkv and args.qkv not in models.QKV_PRESETS:
        parser.error(f"unknown --qkv preset {args.qkv!r}; choose one of {', '.join(models.QKV_PRESETS)}")
    try:
        args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("batch sizes and --steps must be >= 1, --warmup >= 0")
    return args


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from qkv_vit import models

    overrides = {
        k: v
        for k, v in {"depth": args.depth, "embed_dim": args.embed_dim, "cls_attn_layers": args.cls_attn_layers}.items()
        if v is not None
    }
    model = models.create(
        args.model, qkv=args.qkv or None, num_classes=args.num_classes, dtype=jnp.dtype(args.dtype), **overrides
    )
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, args.image_size, args.image_size, 3)))
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    forward = jax.jit(lambda v, images: model.apply(v, images, train=False))
    compile_events = harness.CompileEvents()
    rows = []
    for batch_size in args.batch_sizes:
        # Split the batch over the devices where it divides evenly, else keep it on one device.
        spec = PartitionSpec("data") if batch_size % jax.device_count() == 0 else PartitionSpec()
        images = jax.device_put(
            np.random.default_rng(0).standard_normal((batch_size, args.image_size, args.image_size, 3), np.float32),
            NamedSharding(mesh, spec),
        )
        compiles_before, seconds_before = compile_events.snapshot()
        first_s = harness.time_calls(lambda: jax.block_until_ready(forward(variables, images)), 1)[0]  # noqa: B023 - called at once
        compiles_after_first, seconds = compile_events.snapshot()
        harness.time_calls(lambda: jax.block_until_ready(forward(variables, images)), args.warmup)  # noqa: B023
        times = harness.time_calls(lambda: jax.block_until_ready(forward(variables, images)), args.steps)  # noqa: B023
        call_s = harness.median(times)
        rows.append(
            {
                "batch_size": batch_size,
                "images_per_sec": batch_size / call_s,
                "call_time_s": call_s,
                "first_call_s": first_s,
                "compile_s": seconds - seconds_before,
                "recompiled_after_first_call": compile_events.snapshot()[0] > compiles_after_first,
            }
        )
    device = jax.devices()[0]
    return {
        "benchmark": "infer",
        "model": args.model,
        "qkv": args.qkv or model.qkv_embed,
        "dtype": args.dtype,
        "image_size": args.image_size,
        "params": models.count_params(variables["params"]),
        "results": rows,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        **harness.peak_memory(jax.local_devices()),
        "allocator": harness.allocator_in_use(),
        "jax": jax.__version__,
        **harness.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    result = measure(parse_args(argv))
    print(
        f"{result['model']} qkv={result['qkv']} {result['dtype']} eval at {result['image_size']}px on "
        f"{result['devices']} {result['platform']} device(s), {result['cpu']}, {result['cores']} cores"
    )
    print(
        harness.format_table(
            ["batch", "images/s", "ms / batch", "compile s", "recompiled"],
            [
                (
                    r["batch_size"],
                    f"{r['images_per_sec']:.1f}",
                    f"{r['call_time_s'] * 1e3:.1f}",
                    f"{r['compile_s']:.1f}",
                    r["recompiled_after_first_call"],
                )
                for r in result["results"]
            ],
        )
    )
    harness.emit(result)


if __name__ == "__main__":
    harness.apply_allocator(sys.argv)
    main()
