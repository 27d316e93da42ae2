"""Run training on this machine: one process (all local GPUs/TPUs, or the CPU), or N processes that
train together through jax.distributed, as N hosts would.

  python -m launch.local --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m launch.local --processes=2 --cpu-devices=4 --config=configs/quickstart.py:runlocal --workdir=/tmp/q2 [--dry-run]
  python -m launch.local --processes=8 --gpu-per-process --config=configs/imagenet.py:model=nano_12_p16 --workdir=...

With --processes=N, process i gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i.
--cpu-devices=K gives each process K fake CPU devices (JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=K), which tests multi-host code on a laptop;
--gpu-per-process pins process i to GPU i (CUDA_VISIBLE_DEVICES=i). If one process fails, the others are stopped.
"""

import argparse
import sys
from collections.abc import Sequence

from launch.common import Step, add_run_arguments, parse, run_steps, train_command, with_env


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=1, help="Local processes training together (default 1).")
    parser.add_argument("--port", type=int, default=12355, help="The coordinator's port, with --processes > 1.")
    parser.add_argument("--cpu-devices", type=int, help="Run on the CPU with this many fake devices per process.")
    parser.add_argument("--gpu-per-process", action="store_true", help="Process i sees only GPU i.")
    parser.add_argument("--python", default=sys.executable)
    add_run_arguments(parser)
    return parser


def environment(args: argparse.Namespace, index: int) -> list[str]:
    """KEY=VALUE assignments for process `index`: fake CPU devices, or its own GPU."""
    env = []
    if args.cpu_devices:
        env += ["JAX_PLATFORMS=cpu", f"XLA_FLAGS=--xla_force_host_platform_device_count={args.cpu_devices}"]
    if args.gpu_per_process:
        env.append(f"CUDA_VISIBLE_DEVICES={index}")
    return env


def process_command(args: argparse.Namespace, overrides: Sequence[str], index: int) -> str:
    env = environment(args, index)
    flags = []
    if args.processes > 1:
        flags = [
            f"--coordinator_address=127.0.0.1:{args.port}",
            f"--num_processes={args.processes}",
            f"--process_id={index}",
        ]
    return with_env(train_command(args, overrides, *flags, python=args.python), env)


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> list[Step]:
    if args.processes < 1:
        raise SystemExit("error: --processes must be >= 1: give 1 or more, or leave it out for one process")
    return [Step(tuple(process_command(args, overrides, index) for index in range(args.processes)))]


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse(parser(), argv)
    return run_steps(plan(args, overrides), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
