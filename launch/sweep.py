"""Expand a config file's sweep into one run per point and hand each to a launcher (local, slurm, tpu_pod).

  python -m launch.sweep local --config=configs/cifar10.py --sweep=depth=4,epochs=2 --workdir=workdirs/cifar10_sweep
  python -m launch.sweep slurm --config=configs/imagenet.py --sweep=code_size --workdir=/shared/in1k_codes --nodes=2
  python -m launch.sweep tpu_pod --config=configs/imagenet.py --sweep=paper --workdir=gs://BUCKET/in1k \\
      --tpu=my-v4-32 --zone=us-central2-b --setup [--only=NAME ...] [--dry-run] [--config.KEY=VALUE ...]

Point p (named from its arguments by qkv_vit.sweep.point_name) runs in WORKDIR/<p's name>; every other
option goes to the launcher unchanged. SLURM points become separate jobs; local and TPU points run one
after another, and steps that every point shares (--create, --setup) run once. Rerunning the same
command resumes unfinished points and skips finished ones (the trainer finds them done).
"""

import argparse
import sys
from collections.abc import Sequence

from launch import common, local, slurm, tpu_pod
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
    return parser


def plan(argv: Sequence[str] | None) -> tuple[list[common.Step], bool]:
    """Every point's launcher steps, shared ones once, and whether this is a dry run."""
    args, rest = parser().parse_known_args(argv)
    if ":" in args.config:
        raise SystemExit("error: --config takes the file only; the sweep supplies each point's arguments")
    points = expand(args.config, args.sweep)
    unknown = sorted(set(args.only) - {point.name for point in points})
    if unknown:
        raise SystemExit(f"error: --only {unknown} not in the sweep; its points: {', '.join(p.name for p in points)}")
    launcher = LAUNCHERS[args.launcher]
    steps, dry_run = [], False
    for point in points:
        if args.only and point.name not in args.only:
            continue
        workdir = f"{args.workdir.rstrip('/')}/{point.name}"
        point_args, overrides = common.parse(
            launcher.parser(), [*rest, f"--config={point.config}", f"--workdir={workdir}"]
        )
        dry_run = point_args.dry_run
        steps += [step for step in launcher.plan(point_args, overrides) if step not in steps]
    return steps, dry_run


def main(argv: Sequence[str] | None = None) -> int:
    steps, dry_run = plan(argv)
    return common.run_steps(steps, dry_run)


if __name__ == "__main__":
    sys.exit(main())
