"""The same training step (benchmarks/train_step.py) on 1, 2, 4, 8 devices of one process and on several
processes, as a table.

    python benchmarks/scaling.py                                   # XCiT-N12/16, global batch 32, 224x224
    python benchmarks/scaling.py --devices 1,2,4,8 --processes 2 --batch-size 32 --steps 5

Devices: each run is a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=N, so on a
CPU-only machine the N "devices" are slices of the same cores: the batch is split N ways and the
gradients are all-reduced, but no compute is added. The figures then show what the SPMD partitioning
and the collectives cost, not a speedup; on N real accelerators the same command measures real scaling.
Processes: P processes joined with jax.distributed (CPU collectives through gloo, as
`python -m qkv_vit.main --coordinator_address ...`), each feeding its share of the global batch; each
is pinned to its own cores where there are enough (`--no-pin` to let them share all cores).
The global batch is the same in every row. Ends with one JSON line.
"""

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

import harness

PASSED_THROUGH = (
    "model",
    "qkv",
    "batch_size",
    "image_size",
    "steps",
    "warmup",
    "depth",
    "embed_dim",
    "cls_attn_layers",
    "dtype",
    "sharding",
    "mesh_fsdp",
    "allocator",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts of one process")
    parser.add_argument("--processes", type=int, default=2, help="also run this many processes (0: skip)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin each process to its own cores")
    parser.add_argument("--model", default="xcit_nano_12_p16")
    parser.add_argument("--qkv", default="linear")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, the same in every row")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--cls-attn-layers", type=int, help="override the number of class-attention blocks")
    parser.add_argument("--embed-dim", type=int)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sharding", default="replicate", choices=["replicate", "fsdp"])
    parser.add_argument("--mesh-fsdp", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        "--allocator",
        default="reuse",
        choices=harness.ALLOCATORS,
        help="malloc settings of every run (train_step.py --allocator)",
    )
    args = parser.parse_args(argv)
    try:
        args.devices = [int(n) for n in args.devices.split(",") if n]
    except ValueError:
        parser.error(f"--devices must be comma-separated integers, got {args.devices!r}")
    for count in args.devices + ([args.processes] if args.processes else []):
        if count < 1 or args.batch_size % count:
            parser.error(f"the global batch {args.batch_size} must split evenly over {count} devices/processes")
    return args


def train_step_args(args: argparse.Namespace) -> list[str]:
    argv = []
    for name in PASSED_THROUGH:
        value = getattr(args, name)
        if value is not None and value != "":
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def with_device_count(count: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}".strip()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_sets(processes: int) -> list[set[int]] | None:
    """Disjoint core sets, one per process, or None when there are fewer cores than processes."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < processes:
        return None
    share = len(cores) // processes
    return [set(cores[i * share : (i + 1) * share]) for i in range(processes)]


def run_processes(args: argparse.Namespace) -> dict[str, Any]:
    """`args.processes` train_step.py processes joined by jax.distributed; returns process 0's result."""
    address = f"127.0.0.1:{free_port()}"
    pins = None if args.no_pin else core_sets(args.processes)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **with_device_count(1)}
    procs = []
    for process_id in range(args.processes):
        command = [
            sys.executable,
            str(harness.BENCHMARKS / "train_step.py"),
            *train_step_args(args),
            "--coordinator-address",
            address,
            "--num-processes",
            str(args.processes),
            "--process-id",
            str(process_id),
        ]
        pin = (lambda cores=pins[process_id]: os.sched_setaffinity(0, cores)) if pins else None
        procs.append(
            subprocess.Popen(
                command,
                cwd=harness.REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=pin,
            )
        )
    outputs = [p.communicate(timeout=args.timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        if p.returncode:
            raise RuntimeError(f"a process of the {args.processes}-process run failed:\n{err[-3000:]}")
    result = harness.last_json_line(outputs[0][0])
    result["pinned_cores"] = [sorted(c) for c in pins] if pins else None
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = harness.load_average()
    results = []
    for count in args.devices:
        result = harness.run_script("train_step.py", train_step_args(args), with_device_count(count), args.timeout)
        results.append(result)
        print(f"{count} device(s): {result['images_per_sec']:.1f} images/s", flush=True)
    if args.processes:
        result = run_processes(args)
        results.append(result)
        print(f"{args.processes} processes: {result['images_per_sec']:.1f} images/s", flush=True)
    base = results[0]["images_per_sec"]
    rows = [
        (
            r["processes"],
            r["devices"],
            r["batch_size"] // r["devices"],
            f"{r['step_time_s'] * 1e3:.0f}",
            f"{r['images_per_sec']:.1f}",
            f"{r['images_per_sec'] / base:.2f}",
            f"{r['compile_s']:.1f}",
            r["recompiled_after_first_step"],
        )
        for r in results
    ]
    print(
        harness.format_table(
            [
                "processes",
                "devices",
                "batch / device",
                "step ms",
                "images/s",
                "vs first row",
                "compile s",
                "recompiled",
            ],
            rows,
        )
    )
    summary = [
        {
            k: r[k]
            for k in (
                "processes",
                "devices",
                "mesh",
                "step_time_s",
                "images_per_sec",
                "compile_s",
                "recompiled_after_first_step",
                "peak_memory_bytes",
            )
        }
        for r in results
    ]
    harness.emit(
        {
            "benchmark": "scaling",
            "model": args.model,
            "qkv": args.qkv,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "results": summary,
            "platform": results[0]["platform"],
            "cpu": results[0]["cpu"],
            "cores": results[0]["cores"],
            "load_average_before": load_before,
            "load_average_after": harness.load_average(),
        }
    )


if __name__ == "__main__":
    main()
