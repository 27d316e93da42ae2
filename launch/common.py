"""What every launcher shares: the training command, its command-line arguments, and steps that either
run or, with --dry-run, print exactly what would run."""

import argparse
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Step:
    """Shell commands started together and waited on together (one, for most steps), after writing a file."""

    commands: tuple[str, ...] = ()
    file: tuple[str, str] | None = None  # (path, text), e.g. an sbatch script

    def describe(self) -> str:
        lines = []
        if self.file:
            path, text = self.file
            lines += [f"# write {path}:", *(f"#   {line}" if line else "#" for line in text.splitlines())]
        return "\n".join(lines + list(self.commands))

    def execute(self) -> int:
        """Writes the file, runs the commands with bash; the first failure stops the others and is returned."""
        if self.file:
            path, text = self.file
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        processes = [subprocess.Popen(["bash", "-c", command], start_new_session=True) for command in self.commands]
        try:
            return wait_all(processes)
        finally:
            for process in processes:
                if process.poll() is None:  # interrupted: do not leave training processes behind
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait()


def wait_all(processes: list[subprocess.Popen]) -> int:
    remaining = list(processes)
    while remaining:
        for process in list(remaining):
            try:
                code = process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            remaining.remove(process)
            if code != 0:
                return code  # the caller's finally stops the rest
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="A config file and its arguments, e.g. configs/imagenet.py:model=nano_12_p16."
    )
    parser.add_argument(
        "--workdir", required=True, help="The run's directory (gs://... on TPU pods; a shared path on SLURM)."
    )
    parser.add_argument("--dry-run", action="store_true", help="Print every command (and file) instead of running it.")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Known arguments, plus --config.KEY=VALUE overrides passed on to qkv_vit.main unchanged."""
    args, rest = parser.parse_known_args(argv)
    bad = [item for item in rest if not item.startswith("--config.")]
    if bad:
        parser.error(
            f"unrecognized arguments {bad}; only --config.KEY=VALUE overrides are passed on to the trainer: write "
            "trainer settings as --config.KEY=VALUE, and see --help for the launcher's own flags"
        )
    return args, rest


def train_command(args: argparse.Namespace, overrides: Sequence[str], *flags: str, python: str = "python") -> str:
    """`python -m qkv_vit.main --config=... --workdir=... [flags] [overrides]` as one shell-quoted line."""
    argv = [python, "-m", "qkv_vit.main", f"--config={args.config}", f"--workdir={args.workdir}", *flags, *overrides]
    return shlex.join(argv)


def with_env(command: str, env: Sequence[str]) -> str:
    """Prefix KEY=VALUE assignments (validated) to a shell command."""
    for item in env:
        if "=" not in item or not item.partition("=")[0].isidentifier():
            raise SystemExit(f"error: --env takes KEY=VALUE, got {item!r}: write it as --env NAME=VALUE")
    assignments = [f"{key}={shlex.quote(value)}" for key, _, value in (item.partition("=") for item in env)]
    return " ".join([*assignments, command])


def run_steps(steps: Sequence[Step], dry_run: bool) -> int:
    """Prints each step (dry run) or runs them in order, stopping at the first failure."""
    for step in steps:
        if dry_run:
            print(step.describe())
            continue
        print(f"+ {step.describe()}", file=sys.stderr, flush=True)
        code = step.execute()
        if code != 0:
            print(
                f"error: step failed with exit code {code}: {step.commands[0] if step.commands else step.file[0]}; "
                "fix what its output above says, then rerun",
                file=sys.stderr,
            )
            return code
    return 0
