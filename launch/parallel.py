"""Several points of a sweep at once on one machine's accelerator (`python -m launch.sweep local --parallel N`).

One small run cannot fill a GPU: XCiT-N12/8 at 32x32 and batch 128 is a few GFLOP a step, so the device
waits on kernel launches and the host. N processes share it instead, each with 1/N of the device memory that
JAX may take (XLA_PYTHON_CLIENT_MEM_FRACTION, from MEMORY_SHARE) and 1/N of this process's host cores
(taskset). Each point's output goes to LOG_DIR/<point>.log; one line per finished point is printed, and the
sweep's results table at the end (qkv_vit.results).

A CPU is refused: its cores are what every run already uses, so N runs at once each go about N times slower.
A TPU is refused too: libtpu lets one process at a time open a chip.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from launch.common import Step

MEMORY_SHARE = 0.9  # of device memory, split between the processes (one JAX process preallocates 0.75 alone)
REFUSALS = {
    "cpu": "the CPU's cores are what each run already uses, so N runs at once would each go about N times slower; "
    "run the points one after another (leave --parallel out)",
    "tpu": "libtpu lets one process at a time open a TPU chip; run the points one after another here, or each on "
    "its own TPU VM with `python -m launch.sweep tpu_pod`",
}


@dataclasses.dataclass(frozen=True)
class PointJob:
    """One sweep point: its name, its run directory and the launcher's steps that train it."""

    name: str
    workdir: str
    steps: tuple[Step, ...]


def backend(python: str) -> str:
    """JAX's default backend ("cpu", "gpu", "tpu") as the training processes will see it, from a short-lived
    process, so that this launcher never holds device memory itself."""
    probe = "import jax; print(jax.default_backend())"
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    found = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: could not ask JAX for this machine's devices with {python}: {last}")
    return found.stdout.strip().splitlines()[-1]


def check_parallel(parallel: int, platform: str) -> None:
    """Raises SystemExit (one `error:` line) where N > 1 processes cannot share this machine's device."""
    if parallel < 1:
        raise SystemExit(f"error: --parallel {parallel}: give 1 or more points to run at once")
    if parallel > 1 and platform in REFUSALS:
        raise SystemExit(f"error: --parallel {parallel} on a {platform.upper()}: {REFUSALS[platform]}")


def mps_note() -> str | None:
    """A note where NVIDIA MPS is not running: without it the processes' kernels time-share the GPU."""
    pipes = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if (pipes / "control").exists():
        return None
    return (
        "note: NVIDIA MPS is not running, so the processes take turns on the GPU and gain only where each waits on "
        "its host (compiling, loading data, dispatch); `nvidia-cuda-mps-control -d` lets their small kernels run "
        "side by side (docs/launching.md)"
    )


def core_shares(parallel: int, cores: Sequence[int]) -> list[list[int]]:
    """This process's cores in `parallel` contiguous, near-equal groups (at least one core each)."""
    cores = sorted(cores)
    if len(cores) < parallel:
        return [cores] * parallel  # fewer cores than processes: they share all of them
    size, extra = divmod(len(cores), parallel)
    shares, start = [], 0
    for index in range(parallel):
        end = start + size + (index < extra)
        shares.append(cores[start:end])
        start = end
    return shares


def shared_command(command: str, parallel: int, cores: Sequence[int]) -> str:
    """A point's training command with its share of device memory and (where taskset exists) of the cores."""
    prefix = f"XLA_PYTHON_CLIENT_MEM_FRACTION={MEMORY_SHARE / parallel:.3f}"
    if shutil.which("taskset"):
        prefix = f"{prefix} taskset -c {','.join(map(str, cores))}"
    return f"{prefix} {command}"


def jobs_for_parallel(jobs: Sequence[PointJob], parallel: int) -> list[PointJob]:
    """Each job's steps as one chained command (training, then its evaluation), every part given slot
    (index mod N)'s device and core share; one process per step only."""
    shares = core_shares(parallel, sorted(os.sched_getaffinity(0)))
    shared = []
    for index, job in enumerate(jobs):
        if any(len(step.commands) != 1 or step.file for step in job.steps):
            raise SystemExit("error: --parallel runs one training process per point; leave --processes out")
        parts = [shared_command(step.commands[0], parallel, shares[index % parallel]) for step in job.steps]
        shared.append(dataclasses.replace(job, steps=(Step((" && ".join(parts),)),)))
    return shared


def finished_line(job: PointJob, code: int, seconds: float, log: str | None) -> str:
    """`done NAME: top-1 76.63% (step 3900), 9m28s` from the run's records, or why not."""
    took = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    where = f", log {log}" if log else ""
    if code != 0:
        return f"FAILED {job.name}: exit code {code} after {took}{where}"
    return f"done {job.name}: {final_top1(job.workdir)}, {took}{where}"


def final_top1(workdir: str) -> str:
    from qkv_vit import results  # imports JAX (not its devices): only once a point has finished

    try:
        run = results.read_run(results.find_runs([workdir])[0])
    except (FileNotFoundError, ValueError, KeyError) as error:
        return f"no run record ({error})"
    if not run.finished:
        return f"unfinished at step {run.last_step}"
    eval_name = run.config.get("eval_name", "val")
    return f"top-1 {100 * run.final[f'{eval_name}/top1']:.2f}% (step {run.last_step})"


def sweep_table(jobs: Sequence[PointJob]) -> str:
    """qkv_vit.results' table of the points that have a run record."""
    from qkv_vit import results

    found = [job.workdir for job in jobs if Path(job.workdir, "model.json").exists()]
    if not found:
        return "No point has a run record yet.\n"
    return results.markdown([results.read_run(path) for path in results.find_runs(found)])


def run_serially(jobs: Sequence[PointJob]) -> int:
    """Point after point, output to this terminal; the first failure stops the sweep."""
    for job in jobs:
        started = time.monotonic()
        code = 0
        for step in job.steps:
            print(f"+ {step.describe()}", file=sys.stderr, flush=True)
            code = step.execute()
            if code != 0:
                break
        print(finished_line(job, code, time.monotonic() - started, None), flush=True)
        if code != 0:
            return code
    return 0


@dataclasses.dataclass
class Running:
    job: PointJob
    process: subprocess.Popen
    log: TextIO
    started: float


def start(job: PointJob, log_dir: Path) -> Running:
    log = (log_dir / f"{job.name}.log").open("a")
    command = job.steps[0].commands[0]
    print(f"+ {command}", file=log, flush=True)
    process = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started {job.name} (pid {process.pid}), log {log.name}", flush=True)
    return Running(job, process, log, time.monotonic())


def run_in_parallel(jobs: Sequence[PointJob], parallel: int, log_dir: Path) -> int:
    """Up to `parallel` points at a time. A failure starts no new point but lets the running ones finish (their
    work is kept); the exit code is the first failure's."""
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting, running, first_failure = list(jobs), [], 0
    try:
        while waiting or running:
            while waiting and len(running) < parallel and not first_failure:
                running.append(start(waiting.pop(0), log_dir))
            if not running:
                break
            time.sleep(0.2)
            for item in [item for item in running if item.process.poll() is not None]:
                running.remove(item)
                item.log.close()
                code = item.process.returncode
                print(finished_line(item.job, code, time.monotonic() - item.started, item.log.name), flush=True)
                first_failure = first_failure or code
    finally:
        for item in running:  # interrupted: stop the training processes rather than leave them behind
            os.killpg(item.process.pid, signal.SIGTERM)
            item.process.wait()
    if waiting:
        print(f"not started after the failure: {', '.join(job.name for job in waiting)}", flush=True)
    return first_failure


def run(jobs: Sequence[PointJob], parallel: int, log_dir: Path, dry_run: bool) -> int:
    """Runs (or, dry, prints) the points, then prints the sweep's results table."""
    if parallel > 1:
        jobs = jobs_for_parallel(jobs, parallel)
    if dry_run:
        for job in jobs:
            print("\n".join(step.describe() for step in job.steps))
        return 0
    code = run_serially(jobs) if parallel == 1 else run_in_parallel(jobs, parallel, log_dir)
    print("\n" + sweep_table(jobs), end="", flush=True)
    return code
