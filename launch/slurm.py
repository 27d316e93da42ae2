"""Submit one training run to a SLURM GPU cluster: one process per GPU on every node, through srun.

  python -m launch.slurm --nodes=2 --gpus-per-node=8 --partition=gpu --time=72:00:00 \\
      --setup="source ~/qkv_vit/.venv/bin/activate" \\
      --config=configs/imagenet.py:model=small_12_p16,qkv=fsne_m16,data_dir=/datasets/tfds \\
      --workdir=/shared/runs/s12_fsne [--dry-run] [--config.KEY=VALUE ...]

Writes an sbatch script (into the workdir, or ./slurm_jobs/ for a gs:// workdir) and submits it with
`sbatch`. The script runs `srun python -m qkv_vit.main ... --distributed` with --ntasks-per-node=GPUS
and --gpus-per-task=1, so each process sees one GPU and jax.distributed finds the coordinator, process
count and index from SLURM's environment. SLURM sends SIGTERM 120 s before the time limit (and on
preemption); the trainer then saves a checkpoint and exits with 143, and the script requeues the job,
which resumes from that checkpoint. Run from the repository root on a login node; the workdir must be a
filesystem every node sees (or a gs:// bucket).
"""

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.common import REPO, Step, add_run_arguments, parse, run_steps, train_command

PREEMPTED_EXIT_CODE = 143  # qkv_vit.main: stopped on SIGTERM after saving a checkpoint


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-task", type=int, default=8, help="Host cores per GPU process (input pipeline).")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", default="72:00:00", help="Time limit; the job requeues itself when it is reached.")
    parser.add_argument("--job-name", help="Default: the workdir's last component.")
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        help='Shell lines run before srun (repeatable), e.g. "module load cuda" or "source .venv/bin/activate".',
    )
    parser.add_argument("--python", default="python")
    add_run_arguments(parser)
    return parser


def job_name(args: argparse.Namespace) -> str:
    return args.job_name or re.sub(r"[^A-Za-z0-9._-]+", "-", args.workdir.rstrip("/").rsplit("/", 1)[-1]) or "qkv_vit"


def script_path(args: argparse.Namespace) -> Path:
    if args.workdir.startswith("gs://"):
        return Path("slurm_jobs") / f"{job_name(args)}.sbatch"
    return Path(args.workdir) / "launch.sbatch"


def sbatch_script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    logs = script_path(args).parent.absolute()
    options = {
        "job-name": job_name(args),
        "nodes": args.nodes,
        "ntasks-per-node": args.gpus_per_node,
        "gpus-per-task": 1,
        "cpus-per-task": args.cpus_per_task,
        "time": args.time,
        "partition": args.partition,
        "account": args.account,
        "output": f"{logs}/slurm-%x-%j.out",
        "signal": "TERM@120",  # to every task: the trainer saves and exits 143 before the time limit
        "requeue": None,
    }
    header = [
        f"#SBATCH --{key}" + ("" if value is None else f"={value}")
        for key, value in options.items()
        if value is not None or key == "requeue"
    ]
    train = train_command(args, overrides, "--distributed", python=args.python)
    return "\n".join(
        [
            "#!/bin/bash",
            *header,
            "",
            f"cd {shlex.quote(str(REPO))}",
            *args.setup,
            "export TF_CPP_MIN_LOG_LEVEL=2",
            f"srun --kill-on-bad-exit=1 {train}",
            "status=$?",
            f"# {PREEMPTED_EXIT_CODE}: stopped by SIGTERM (time limit, preemption) after a checkpoint; requeue to resume.",
            f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
            'exit "$status"',
            "",
        ]
    )


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> list[Step]:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit("error: --nodes and --gpus-per-node must be >= 1: give each 1 or more")
    path = script_path(args)
    return [Step((shlex.join(["sbatch", str(path)]),), file=(str(path), sbatch_script(args, overrides)))]


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse(parser(), argv)
    return run_steps(plan(args, overrides), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
