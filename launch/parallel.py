"""Several points of a sweep at once on one machine's GPU (`python -m launch.sweep local --parallel N`).

A small run is estimated to leave most of a GPU idle (XCiT-N12/8 at 32x32, batch 128: a few GFLOP a step in
about a thousand small kernels, docs/benchmarks.md), and every run spends a minute on the host (starting JAX,
compiling, decoding its data). N processes share the GPU instead, each with 1/N of the device memory JAX may
take (XLA_PYTHON_CLIENT_MEM_FRACTION, from MEMORY_SHARE) and 1/N of this process's host cores (taskset), a share
("slot") handed to a point when it starts and back when it ends. Each point's output goes to LOG_DIR/<point>.log;
a line per finished point is printed, and the sweep's results table at the end (qkv_vit.results).

A CPU is refused: its cores are what every run computes with, so runs at once only split them. A TPU is
refused too: libtpu lets one process at a time open a chip.
"""

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

from etils import epath

from launch.common import Step

MEMORY_SHARE = 0.9  # of device memory, split between the processes (one JAX process preallocates 0.75 alone)
REFUSALS = {
    "cpu": "the CPU's cores are what every run computes with, so runs at once only split them (two at once on a "
    "2-core machine: each 1.7 times slower, 1.2 times the total); run the points one after another (leave "
    "--parallel out)",
    "tpu": "libtpu lets one process at a time open a TPU chip; run the points one after another here, or each on "
    "its own TPU VM with `python -m launch.sweep tpu_pod`",
}
PROBE_TIMEOUT_S = 120
PROBE_FIX = "check that this Python runs `import jax` (pip install -e . there), or point --python at one that does"
STOP_TIMEOUT_S = 300  # for a stopped point to save its checkpoint before it is killed


@dataclasses.dataclass(frozen=True)
class PointJob:
    """One sweep point: its name, its run directory and the launcher's steps that train (and evaluate) it."""

    name: str
    workdir: str
    steps: tuple[Step, ...]


@dataclasses.dataclass(frozen=True)
class Devices:
    """What JAX finds on this machine: its backend ("cpu", "gpu", "tpu") and first device's kind."""

    platform: str
    kind: str


def probe(python: str) -> Devices:
    """This machine's devices as the training processes will see them, asked of a short-lived process so that
    the launcher never holds device memory itself; SystemExit (one `error:` line) where JAX cannot say."""
    code = "import jax; print(jax.default_backend()); print(jax.devices()[0].device_kind)"
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    try:
        found = subprocess.run(
            [python, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=PROBE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SystemExit(
            f"error: could not ask JAX for this machine's devices with {python}: {error}; {PROBE_FIX}"
        ) from error
    lines = found.stdout.strip().splitlines()
    if found.returncode != 0 or len(lines) < 2:
        last = (found.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: could not ask JAX for this machine's devices with {python}: {last}; {PROBE_FIX}")
    return Devices(lines[-2], lines[-1])


def refusal(parallel: int, platform: str) -> str | None:
    """Why N > 1 processes cannot share this platform's device, or None."""
    return f"--parallel {parallel} on a {platform.upper()}: {REFUSALS[platform]}" if platform in REFUSALS else None


def mps_note(devices: Devices) -> str | None:
    """A note where NVIDIA MPS is not running on an NVIDIA GPU: without it the processes take turns on it."""
    pipes = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if "nvidia" not in devices.kind.lower() or (pipes / "control").exists():
        return None
    return (
        "note: NVIDIA MPS is not running, so the processes take turns on the GPU and gain only where each waits on "
        "its host (compiling, loading data, dispatch); `nvidia-cuda-mps-control -d` lets their small kernels run "
        "side by side (docs/launching.md)"
    )


def check_one_process_per_point(jobs: Sequence[PointJob]) -> None:
    """SystemExit unless every step of every point is one command (one training process, no file to write)."""
    if any(len(step.commands) != 1 or step.file for job in jobs for step in job.steps):
        raise SystemExit("error: --parallel runs one process per point; leave --processes out")


def core_shares(slots: int, cores: Sequence[int]) -> list[list[int]]:
    """The cores in `slots` contiguous, near-equal groups (each slot all of them where there are fewer cores)."""
    cores = sorted(cores)
    if len(cores) < slots:
        return [list(cores) for _ in range(slots)]
    size, extra = divmod(len(cores), slots)
    shares, start = [], 0
    for index in range(slots):
        end = start + size + (index < extra)
        shares.append(cores[start:end])
        start = end
    return shares


def shared_command(job: PointJob, slots: int, cores: Sequence[int]) -> str:
    """The point's steps as one shell command run with one slot's share: its memory fraction in the environment of
    everything it starts, its cores for taskset (where installed), the steps chained with && inside bash -c."""
    chain = " && ".join(step.commands[0] for step in job.steps)
    share = [f"XLA_PYTHON_CLIENT_MEM_FRACTION={MEMORY_SHARE / slots:.3f}"]
    if shutil.which("taskset"):
        share += ["taskset", "-c", ",".join(map(str, cores))]
    return " ".join([*share, "bash", "-c", shlex.quote(chain)])


def exit_status(code: int) -> int:
    """A child's return code as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - code if code < 0 else code


def finished_line(job: PointJob, code: int, seconds: float, log: str | None) -> str:
    """`done NAME: top-1 76.63% (step 3900), 9m28s`, or what failed: training, or evaluation after training."""
    took = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    where = f", log {log}" if log else ""
    if code == 0:
        return f"done {job.name}: {run_summary(job.workdir)}, {took}{where}"
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    summary = run_summary(job.workdir)
    stage = f" after training finished ({summary})" if summary.startswith("top-1") else ""
    return f"FAILED {job.name}: {how}{stage} after {took}{where}"


def run_summary(workdir: str) -> str:
    """The run's final top-1 and step, or where it stands."""
    from qkv_vit import results  # imports JAX (not its devices): only once a point has ended

    try:
        run = results.read_run(epath.Path(workdir))
    except (OSError, ValueError, KeyError) as error:  # no run record yet, or one cut short
        return f"no run record ({type(error).__name__})"
    top1 = results.final_top1(run)
    return f"top-1 {top1:.2f}% (step {run.last_step})" if top1 is not None else f"unfinished at step {run.last_step}"


def sweep_table(jobs: Sequence[PointJob]) -> str:
    """qkv_vit.results' table of the points that have a run record (a line saying why where it cannot be read)."""
    from qkv_vit import results

    found = [epath.Path(job.workdir) for job in jobs if epath.Path(job.workdir, "model.json").exists()]
    if not found:
        return "No point has a run record yet.\n"
    try:
        return results.markdown([results.read_run(path) for path in found])
    except (OSError, ValueError, KeyError) as error:
        return f"No results table: a run record cannot be read ({error}); python -m qkv_vit.results shows the rest.\n"


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
            return exit_status(code)
    return 0


@dataclasses.dataclass
class Running:
    """A point being trained: its process (a session of its own), its log and its slot."""

    job: PointJob
    process: subprocess.Popen
    log: TextIO
    started: float
    slot: int


def start(job: PointJob, slot: int, command: str, log_dir: Path) -> Running:
    """Starts the point's command in a new session, its output into LOG_DIR/<point>.log (appended)."""
    log = (log_dir / f"{job.name}.log").open("a")
    print(f"+ {command}", file=log, flush=True)
    process = subprocess.Popen(["bash", "-c", command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"started {job.name} (pid {process.pid}), log {log.name}", flush=True)
    return Running(job, process, log, time.monotonic(), slot)


def stop(running: Sequence[Running]) -> None:
    """SIGTERM to every point's process group (the trainer saves a checkpoint), then waits until each group is
    gone, killing what is left after STOP_TIMEOUT_S."""
    for item in running:
        with suppress(ProcessLookupError):
            os.killpg(item.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for item in running:
        with suppress(subprocess.TimeoutExpired):
            item.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        while _group_alive(item.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with suppress(ProcessLookupError):
            os.killpg(item.process.pid, signal.SIGKILL)
        item.process.wait()
        item.log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _signals_stop_the_sweep() -> Iterator[None]:
    """SIGTERM and SIGHUP end the sweep as Ctrl-C does, through SystemExit, so its `finally` stops the points
    (Python's default for them would leave the points training, in sessions of their own)."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """No signal interrupts what runs inside (stopping the points), so none is left behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_in_parallel(jobs: Sequence[PointJob], parallel: int, log_dir: Path) -> int:
    """Up to `parallel` points at a time, each with the share of a free slot. A failure starts no new point but
    lets the running ones finish (their work is kept); the exit status is the first failure's."""
    log_dir.mkdir(parents=True, exist_ok=True)
    slots = min(parallel, len(jobs))
    shares = core_shares(slots, sorted(os.sched_getaffinity(0)))
    waiting, running, free, failure = list(jobs), [], list(range(slots)), 0
    with _signals_stop_the_sweep():
        try:
            while waiting or running:
                while waiting and free and not failure:
                    slot, job = free.pop(0), waiting.pop(0)
                    running.append(start(job, slot, shared_command(job, slots, shares[slot]), log_dir))
                if not running:
                    break
                time.sleep(0.2)
                for item in [item for item in running if item.process.poll() is not None]:
                    running.remove(item)
                    item.log.close()
                    free.append(item.slot)
                    code = item.process.returncode
                    print(finished_line(item.job, code, time.monotonic() - item.started, item.log.name), flush=True)
                    failure = failure or exit_status(code)
        finally:
            if running:
                print(f"stopping {', '.join(item.job.name for item in running)}", flush=True)
                with _signals_ignored():
                    stop(running)
    if waiting:
        print(f"not started after the failure: {', '.join(job.name for job in waiting)}", flush=True)
    return failure


def planned_commands(jobs: Sequence[PointJob], parallel: int) -> list[str]:
    """What a dry run prints: each point's commands, with --parallel the shared command of the slot it would get
    if the points took turns (slot i mod N; when run, a point takes whichever slot is free)."""
    if parallel == 1:
        return [step.describe() for job in jobs for step in job.steps]
    check_one_process_per_point(jobs)
    slots = min(parallel, len(jobs))
    shares = core_shares(slots, sorted(os.sched_getaffinity(0)))
    return [shared_command(job, slots, shares[index % slots]) for index, job in enumerate(jobs)]


def run(jobs: Sequence[PointJob], parallel: int, log_dir: Path | None, dry_run: bool) -> int:
    """Runs (or, dry, prints) the points, then prints the sweep's results table."""
    if dry_run:
        print("\n".join(planned_commands(jobs, parallel)))
        return 0
    if parallel == 1:
        code = run_serially(jobs)
    else:
        check_one_process_per_point(jobs)
        code = run_in_parallel(jobs, parallel, log_dir)
    print("\n" + sweep_table(jobs), end="", flush=True)
    return code
