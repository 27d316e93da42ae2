"""Total training throughput of N processes sharing one machine, as `launch.sweep local --parallel N` runs them.

    python benchmarks/parallel_runs.py                             # N = 1, 2, 4, 8 (on a GPU)
    python benchmarks/parallel_runs.py --counts 1,2 --steps 100    # on a CPU: why --parallel is refused there

For each N: N fresh `train_step.py` processes, each started as launch/parallel.py starts a sweep point (its
share of device memory, XLA_PYTHON_CLIENT_MEM_FRACTION, and of the host cores, taskset), each the trainer's
step for the model of the QKV comparison (configs/cifar10.py at depth 4: XCiT-N12/8, 32x32, batch 128, 10
classes; --qkv picks the embedding). All compile and warm up, meet at a barrier, then time --steps steps. The
total images/s is every process's timed images over the span from the first timed step's start to the last
one's end; the speed-up is that over N = 1's. Rounds of N are interleaved (--repeats), medians reported.
"""

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

sys.path.insert(0, str(harness.REPO))
from launch import parallel  # noqa: E402  (the launcher's own memory and core shares)
from launch.common import Step  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,2,4,8", help="processes at once, comma-separated")
    parser.add_argument("--qkv", default="linear", help="the QKV preset every process trains")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps after the compiling one")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every count")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    args.counts = [int(count) for count in args.counts.split(",")]
    if min(args.counts) < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--counts, --steps and --repeats must be >= 1")
    return args


def step_command(args: argparse.Namespace, barrier: str) -> str:
    """One process's train_step.py command line (the comparison's model and batch)."""
    argv = [sys.executable, str(harness.BENCHMARKS / "train_step.py"), "--model", "xcit_nano_12_p8"]
    argv += ["--qkv", args.qkv, "--depth", str(args.depth), "--image-size", "32", "--num-classes", "10"]
    argv += ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return shlex.join(argv + ["--dtype", args.dtype, "--barrier", barrier])


def run_group(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """`count` processes at once, each started as launch/parallel.py starts a point; their combined throughput."""
    shares = parallel.core_shares(count, sorted(os.sched_getaffinity(0)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory() as scratch:
        job = parallel.PointJob("step", scratch, (Step((step_command(args, f"{scratch}:{count}"),)),))
        commands = [
            parallel.shared_command(job, count, share) if count > 1 else job.steps[0].commands[0] for share in shares
        ]
        logs = [Path(scratch, f"process{index}.out") for index in range(count)]
        processes = []
        for command, log in zip(commands, logs):
            with log.open("w") as out:
                processes.append(
                    subprocess.Popen(
                        ["bash", "-c", command], stdout=out, stderr=subprocess.STDOUT, cwd=harness.REPO, env=env
                    )
                )
        failed = wait_all(processes)
        if failed is not None:
            raise RuntimeError(f"process {failed} of {count} failed:\n{logs[failed].read_text()[-3000:]}")
        results = [harness.last_json_line(log.read_text()) for log in logs]
    span = max(r["timed_until_unix_s"] for r in results) - min(r["timed_from_unix_s"] for r in results)
    return {
        "processes": count,
        "images_per_sec": sum(r["batch_size"] * r["steps"] for r in results) / span,
        "per_process_images_per_sec": [r["images_per_sec"] for r in results],
        "peak_memory_bytes": [r["peak_memory_bytes"] for r in results],
        "platform": results[0]["platform"],
        "device_kind": results[0]["device_kind"],
        "params": results[0]["params"],
    }


def wait_all(processes: list[subprocess.Popen]) -> int | None:
    """Waits for every process; at the first failure kills the others (they would wait at the barrier) and returns
    its index, else None."""
    while any(process.poll() is None for process in processes):
        failed = next((i for i, process in enumerate(processes) if process.poll() not in (None, 0)), None)
        if failed is not None:
            for process in processes:
                process.kill()
                process.wait()
            return failed
        time.sleep(0.2)
    return next((i for i, process in enumerate(processes) if process.returncode != 0), None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rounds: dict[int, list[dict[str, Any]]] = {count: [] for count in args.counts}
    for round_index in range(args.repeats):
        for count in args.counts:
            result = run_group(args, count)
            rounds[count].append(result)
            print(f"round {round_index + 1}/{args.repeats}, {count} at once: {result['images_per_sec']:.0f} images/s")
    summary = {count: harness.median([r["images_per_sec"] for r in found]) for count, found in rounds.items()}
    base = summary[1] if 1 in summary else None  # one process's images/s: what the speed-up is over
    rows = []
    for count, total in summary.items():
        peak = max(rounds[count][0]["peak_memory_bytes"]) / 2**30
        rows.append(
            (count, f"{total:.0f}", f"{total / count:.0f}", f"{total / base:.2f}x" if base else "", f"{peak:.2f}")
        )
    first = rounds[args.counts[0]][0]
    print(
        f"XCiT-N12/8 depth {args.depth}, qkv {args.qkv}, batch {args.batch_size} at 32x32, {args.dtype}, on "
        f"{first['device_kind']} ({first['platform']}), {harness.cpu_model()}, {harness.available_cores()} cores"
    )
    print(harness.format_table(["processes", "images/s", "per process", "vs 1", "peak memory GiB"], rows))
    harness.emit(
        {
            "benchmark": "parallel_runs",
            "qkv": args.qkv,
            "depth": args.depth,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "repeats": args.repeats,
            "images_per_sec": {str(count): total for count, total in summary.items()},
            "rounds": {str(count): found for count, found in rounds.items()},
            **{key: first[key] for key in ("platform", "device_kind", "params")},
            **harness.machine(),
        }
    )


if __name__ == "__main__":
    main()
