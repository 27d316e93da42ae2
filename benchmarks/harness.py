"""What every benchmark script shares: the machine description, timing, memory, compile events, output.

Each script prints readable lines and ends with one JSON object (`emit`), so runs can be compared and
parsed (`last_json_line`).
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent

# jax.monitoring event names (jax >= 0.4.3x): one of each per compiled computation.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# glibc malloc settings under which XLA's per-step buffers are reused instead of mapped fresh every step.
# XLA's CPU runtime allocates each execution's temporaries (1.5 GB for XCiT-N12/16 at batch 32) with
# posix_memalign from its worker threads; glibc serves that from a fresh mmap (a worker thread's arena
# cannot hold it) and unmaps it afterwards, so every step page-faults the whole buffer again: ~390,000
# faults and ~0.6 s of kernel time per step here. One arena, no mmap and no trimming keep the memory.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
ALLOCATORS = ("reuse", "system")


def allocator_in_use() -> str:
    return "reuse" if all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items()) else "system"


def apply_allocator(argv: list[str]) -> None:
    """Re-execute this script so that its malloc settings are the `--allocator` choice (default reuse):
    ALLOCATOR_ENV set, or removed for `system`. glibc reads them once, at process start."""
    choice = "reuse"
    for i, arg in enumerate(argv):
        if arg.startswith("--allocator="):
            choice = arg.split("=", 1)[1]
        elif arg == "--allocator" and i + 1 < len(argv):
            choice = argv[i + 1]
    if choice not in ALLOCATORS:
        sys.exit(f"error: --allocator must be one of {ALLOCATORS}, got {choice!r}")
    if not sys.platform.startswith("linux") or allocator_in_use() == choice:
        return
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    os.execve(sys.executable, [sys.executable, *argv], {**env, **ALLOCATOR_ENV} if choice == "reuse" else env)


def page_faults() -> int:
    """Minor page faults of this process so far (fresh memory being mapped in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": available_cores(),
        "python": platform.python_version(),
        "load_average": load_average(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory(devices: Sequence[Any]) -> dict[str, Any]:
    """Peak device memory where the backend reports it (GPU, TPU), else the process's peak RSS, labeled."""
    stats = [d.memory_stats() for d in devices]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return {
            "peak_memory_bytes": max(s["peak_bytes_in_use"] for s in stats),
            "peak_memory_source": "device memory_stats peak_bytes_in_use (max over devices)",
        }
    return {"peak_memory_bytes": peak_rss_bytes(), "peak_memory_source": "process peak RSS (no device memory stats)"}


class CompileEvents:
    """Counts JAX compilations (and their seconds) from jax.monitoring events, from when it is created."""

    def __init__(self) -> None:
        import jax

        self.compiles = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
        if event == BACKEND_COMPILE_EVENT:
            self.compiles += 1

    def snapshot(self) -> tuple[int, float]:
        return self.compiles, self.seconds


def time_calls(call: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls; `call` must block until its work is done."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def emit(result: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


def last_json_line(output: str) -> dict[str, Any]:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError("the benchmark printed nothing")
    return json.loads(lines[-1])


def run_script(
    script: str,
    args: Sequence[str],
    env_extra: dict[str, str] | None = None,
    timeout: float | None = None,
    system_allocator: bool = False,
) -> dict[str, Any]:
    """Run benchmarks/SCRIPT in a fresh Python process and return its final JSON line.

    `system_allocator` starts it with glibc's default malloc settings whatever this process uses."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    if system_allocator:
        env = {k: v for k, v in env.items() if k not in ALLOCATOR_ENV}
    command = [sys.executable, str(BENCHMARKS / script), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return last_json_line(result.stdout)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so that printed results paste into benchmarks/README.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
