"""Expand a config file's sweep into one run per point and hand each to a launcher (local, slurm, tpu_pod).

  python -m launch.sweep local --config=configs/cifar10.py --sweep=depth=4,epochs=2 --workdir=workdirs/cifar10_sweep
  python -m launch.sweep local --parallel=4 --config=configs/cifar10.py --sweep=source=in_memory --workdir=workdirs/c10
  python -m launch.sweep slurm --config=configs/imagenet.py --sweep=code_size --workdir=/shared/in1k_codes --nodes=2
  python -m launch.sweep tpu_pod --config=configs/imagenet.py --sweep=paper --workdir=gs://BUCKET/in1k \\
      --tpu=my-v4-32 --zone=us-central2-b --setup [--only=NAME ...] [--dry-run] [--config.KEY=VALUE ...]

Point p (named from its arguments by qkv_vit.sweep.point_name) runs in WORKDIR/<p's name>; every other
option goes to the launcher unchanged. SLURM points become separate jobs; TPU points run one after another,
and steps that every point shares (--create, --setup) run once. Local points run one after another, or
--parallel=N at a time on one GPU (launch/parallel.py: each with 1/N of its memory and of the host cores,
output to --log-dir; refused on a CPU or TPU); a line per finished point, then the sweep's results table.
Rerunning the same command resumes unfinished points and skips finished ones (the trainer finds them done).
"""

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from etils import epath

from launch import common, local, parallel, slurm, tpu_pod
from qkv_vit.errors import ConfigError
from qkv_vit.sweep import expand

LAUNCHERS = {"local": local, "slurm": slurm, "tpu_pod": tpu_pod}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("launcher", choices=sorted(LAUNCHERS))
    parser.add_argument("--config", required=True, help="A config file with get_sweep(), without arguments.")
    parser.add_argument(
        "--sweep", default=None, help="The argument of get_sweep(), e.g. code_size or depth=4,epochs=2."
    )
    parser.add_argument("--workdir", required=True, help="The sweep's directory; each point gets a subdirectory.")
    parser.add_argument("--only", action="append", default=[], help="Run only this point (by name; repeatable).")
    parser.add_argument(
        "--parallel", type=int, default=1, help="local: train this many points at once on this machine's GPU."
    )
    parser.add_argument("--log-dir", help="local --parallel: each point's output goes here (default WORKDIR/logs).")
    parser.add_argument(
        "--evaluate",
        help="local: after training, `python -m qkv_vit.evaluate POINT --config=... ARGS`, given as --evaluate=ARGS "
        "(e.g. --evaluate=--ood=digits), unless POINT/evaluation.json exists",
    )
    return parser


def plan(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[parallel.PointJob], bool]:
    """The sweep's arguments, every chosen point's launcher steps, and whether this is a dry run."""
    args, rest = parser().parse_known_args(argv)
    check_sweep_arguments(args)
    try:
        points = expand(args.config, args.sweep)
    except (ConfigError, FileNotFoundError) as error:  # the config file's own words, with its fix
        raise SystemExit(f"error: {error}") from None
    unknown = sorted(set(args.only) - {point.name for point in points})
    if unknown:
        raise SystemExit(
            f"error: --only {unknown} not in the sweep; choose among its points: {', '.join(p.name for p in points)}"
        )
    launcher = LAUNCHERS[args.launcher]
    jobs, dry_run = [], False
    for point in points:
        if args.only and point.name not in args.only:
            continue
        workdir = f"{args.workdir.rstrip('/')}/{point.name}"
        point_args, overrides = common.parse(
            launcher.parser(), [*rest, f"--config={point.config}", f"--workdir={workdir}"]
        )
        dry_run = point_args.dry_run
        steps = launcher.plan(point_args, overrides)
        if args.evaluate is not None and not epath.Path(workdir, "evaluation.json").exists():
            steps.append(evaluation_step(point_args, overrides, args.evaluate))
        jobs.append(parallel.PointJob(point.name, workdir, tuple(steps)))
    if args.parallel > 1:
        check_machine(args.parallel, point_args, dry_run)
    return args, jobs, dry_run


def check_sweep_arguments(args: argparse.Namespace) -> None:
    """One `error:` line for options that do not go together, before anything is probed or built."""
    if ":" in args.config:
        raise SystemExit(
            "error: --config takes the file only, as the sweep supplies each point's arguments: leave out the :ARG"
        )
    if args.launcher != "local" and (args.parallel != 1 or args.log_dir or args.evaluate is not None):
        raise SystemExit(
            f"error: --parallel, --log-dir and --evaluate are for local sweeps; {args.launcher} runs its own way: "
            "leave them out, or sweep with the local launcher"
        )
    if args.parallel < 1:
        raise SystemExit(f"error: --parallel {args.parallel}: give 1 or more points to run at once")
    if args.log_dir and args.parallel == 1:
        raise SystemExit(
            "error: --log-dir is where --parallel points write their output, and one at a time they print here: "
            "add --parallel N (N > 1), or leave --log-dir out"
        )
    if args.evaluate is not None and any(arg.startswith("--output") for arg in shlex.split(args.evaluate)):
        raise SystemExit("error: --evaluate writes each point's POINT/evaluation.json; leave --output out of it")


def check_machine(parallel_count: int, point_args: argparse.Namespace, dry_run: bool) -> None:
    """Refuses --parallel where the machine's device cannot be shared (a note instead on a dry run, which only
    prints), and notes where MPS would let the processes run side by side."""
    if point_args.cpu_devices:
        devices = parallel.Devices("cpu", "cpu")
    else:
        try:
            devices = parallel.probe(point_args.python)
        except SystemExit as error:
            if not dry_run:
                raise
            print(f"note: printed only; {str(error).removeprefix('error: ')}", file=sys.stderr)
            return
    reason = parallel.refusal(parallel_count, devices.platform)
    if reason and not dry_run:
        raise SystemExit(f"error: {reason}")
    note = f"note: printed only; run here, {reason}" if reason else parallel.mps_note(devices)
    if note:
        print(note, file=sys.stderr)


def evaluation_step(args: argparse.Namespace, overrides: Sequence[str], evaluate: str) -> common.Step:
    """`python -m qkv_vit.evaluate WORKDIR --config=... [EVALUATE] [overrides]` in the training process's environment
    (fake CPU devices, a pinned GPU): the point's final weights, with its config and the sweep's --config.KEY=VALUE
    overrides (e.g. the data's path), into WORKDIR/evaluation.json."""
    argv = [args.python, "-m", "qkv_vit.evaluate", args.workdir, f"--config={args.config}"]
    command = shlex.join([*argv, *shlex.split(evaluate), *overrides])
    return common.Step((common.with_env(command, local.environment(args, 0)),))


def log_dir(args: argparse.Namespace) -> Path:
    """Where --parallel points write their output: --log-dir, else WORKDIR/logs (a local path)."""
    if args.log_dir:
        return Path(args.log_dir)
    if "://" in args.workdir:
        raise SystemExit(
            f"error: --parallel with --workdir={args.workdir}: give a local --log-dir for the points' output"
        )
    return Path(args.workdir) / "logs"


def main(argv: Sequence[str] | None = None) -> int:
    args, jobs, dry_run = plan(argv)
    if args.launcher == "local":
        return parallel.run(jobs, args.parallel, log_dir(args) if args.parallel > 1 else None, dry_run)
    steps = []  # steps every point shares (a TPU VM's --create, --setup) run once, before the first point
    for job in jobs:
        steps += [step for step in job.steps if step not in steps]
    return common.run_steps(steps, dry_run)


if __name__ == "__main__":
    sys.exit(main())
