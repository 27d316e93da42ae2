"""Our training step against the reference PyTorch XCiT's eager step, back to back on this machine.

    python benchmarks/versus_torch.py --rounds 3 --steps 10          # XCiT-N12/16, batch 32, 224x224

Each round runs benchmarks/train_step.py (ours, float32) then benchmarks/torch_train_step.py, each in a
fresh process with the same model, batch, image size and step counts, so that load from other
processes on a shared machine falls on both alike; the medians over rounds are compared. Prints the
load average before and after (how quiet the machine was) and a final JSON line.
"""

import argparse
from typing import Any

import harness


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xcit_nano_12_p16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depth", type=int, help="override the depth of both models (smoke tests)")
    parser.add_argument("--cls-attn-layers", type=int, help="override the number of class-attention blocks")
    parser.add_argument("--embed-dim", type=int, help="override the token width of both models")
    parser.add_argument("--adamw", default="default", help="torch.optim.AdamW implementation for PyTorch")
    parser.add_argument(
        "--allocator",
        default="reuse",
        choices=harness.ALLOCATORS,
        help="malloc settings for our step (train_step.py --allocator); PyTorch always runs with glibc's defaults",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def common_args(args: argparse.Namespace) -> list[str]:
    argv = [
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--image-size",
        str(args.image_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    for flag, value in (
        ("--depth", args.depth),
        ("--embed-dim", args.embed_dim),
        ("--cls-attn-layers", args.cls_attn_layers),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def compare(args: argparse.Namespace) -> dict[str, Any]:
    load_before = harness.load_average()
    ours, reference = [], []
    for round_index in range(args.rounds):
        ours.append(
            harness.run_script(
                "train_step.py", common_args(args) + ["--qkv-embed", "linear", "--allocator", args.allocator]
            )
        )
        reference.append(
            harness.run_script(
                "torch_train_step.py", common_args(args) + ["--adamw", args.adamw], system_allocator=True
            )
        )
        print(
            f"round {round_index + 1}/{args.rounds}: ours {ours[-1]['images_per_sec']:.1f} images/s, "
            f"PyTorch {reference[-1]['images_per_sec']:.1f} images/s (load {harness.load_average()})",
            flush=True,
        )
    ours_ips = harness.median([r["images_per_sec"] for r in ours])
    torch_ips = harness.median([r["images_per_sec"] for r in reference])
    print(
        harness.format_table(
            ["implementation", "images/s (median)", "step ms (median)", "first step s", "peak RSS GiB"],
            [
                (
                    "qkv_vit (JAX, jit)",
                    f"{ours_ips:.1f}",
                    f"{harness.median([r['step_time_s'] for r in ours]) * 1e3:.0f}",
                    f"{harness.median([r['first_step_s'] for r in ours]):.1f}",
                    f"{max(r['peak_memory_bytes'] for r in ours) / 2**30:.2f}",
                ),
                (
                    "reference (PyTorch eager)",
                    f"{torch_ips:.1f}",
                    f"{harness.median([r['step_time_s'] for r in reference]) * 1e3:.0f}",
                    f"{harness.median([r['first_step_s'] for r in reference]):.1f}",
                    f"{max(r['peak_memory_bytes'] for r in reference) / 2**30:.2f}",
                ),
            ],
        )
    )
    print(f"ours / PyTorch: {ours_ips / torch_ips:.2f}x")
    return {
        "benchmark": "versus_torch",
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "ours_images_per_sec": ours_ips,
        "torch_images_per_sec": torch_ips,
        "speedup": ours_ips / torch_ips,
        "ours_rounds": [r["images_per_sec"] for r in ours],
        "torch_rounds": [r["images_per_sec"] for r in reference],
        "recompiled_after_first_step": any(r["recompiled_after_first_step"] for r in ours),
        "allocator": ours[0]["allocator"],
        "ours_cpu_time_per_step_s": harness.median([r["cpu_time_per_step_s"] for r in ours]),
        "torch_cpu_time_per_step_s": harness.median([r["cpu_time_per_step_s"] for r in reference]),
        "torch": reference[0]["torch"],
        "jax": ours[0]["jax"],
        "cpu": ours[0]["cpu"],
        "cores": ours[0]["cores"],
        "load_average_before": load_before,
        "load_average_after": harness.load_average(),
    }


def main(argv: list[str] | None = None) -> None:
    harness.emit(compare(parse_args(argv)))


if __name__ == "__main__":
    main()
