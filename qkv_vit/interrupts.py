"""SIGTERM and SIGINT from the moment `python -m qkv_vit.main` starts: a clean stop, whatever the process is doing.

The train loop has its own handler (qkv_vit.train.preemption: finish the step, save a checkpoint, exit 143).
Before it (data conversion and decoding, state initialization, compilation) and after it, the handler installed
here raises `Interrupted`, a SystemExit with code 143: `finally` blocks run, so every temporary the product is
building (a data cache entry, a checkpoint) is removed, `except Exception` blocks do not swallow it, and Python
exits 143 without a traceback. main.py prints the one line that says what stopped.

Ctrl-C (SIGINT) exits 143 too, not 130: one code for "stopped on request, rerun the same command to go on".
"""

from __future__ import annotations

import signal
import threading

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "terminated, restart me"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """SIGTERM or SIGINT outside the train loop. A SystemExit, so nothing but `finally` and `except
    BaseException` (which re-raise) sees it on its way out."""

    def __init__(self, signum: int):
        super().__init__(STOPPED_EXIT_CODE)
        self.signal_name = signal.Signals(signum).name


def raise_interrupted(signum: int, frame) -> None:
    del frame
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGINT raise Interrupted in the main thread (signals are only delivered there)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, raise_interrupted)
