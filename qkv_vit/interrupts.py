"""SIGTERM and SIGINT from the moment `python -m qkv_vit.main` starts: a clean stop, whatever the process is doing.

The train loop has its own handler (qkv_vit.train.preemption: finish the step, save a checkpoint, exit 143).
Before it (data conversion and decoding, state initialization, compilation) and after it, the handler installed
here raises `Interrupted`, a SystemExit with code 143: `finally` blocks run, so every temporary the product is
building (a data cache entry, a checkpoint) is removed, `except Exception` blocks do not swallow it, and Python
exits 143 without a traceback. main.py prints the one line that says what stopped.

Ctrl-C (SIGINT) exits 143 too, not 130: one code for "stopped on request, rerun the same command to go on".

Python runs a signal's handler in whatever Python code the main thread runs next, and that may be a garbage
collector callback or a finalizer (`__del__`, a weakref callback), where an exception cannot propagate: Python
prints it as "Exception ignored in ..." and carries on. JAX registers a gc callback (_xla_gc_callback) that runs
at every collection, so under load a signal during the data conversion landed there about every time and the run
trained to the end. `sys.unraisablehook` sees such a lost Interrupted and sends the signal again a moment later.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "terminated, restart me"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# From a timer thread, so that the main thread has left the callback that lost the stop before it is handled again.
REDELIVERY_DELAY_S = 0.05


class Interrupted(SystemExit):
    """SIGTERM or SIGINT outside the train loop. A SystemExit, so nothing but `finally` and `except
    BaseException` (which re-raise) sees it on its way out."""

    def __init__(self, signum: int):
        super().__init__(STOPPED_EXIT_CODE)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def raise_interrupted(signum: int, frame) -> None:
    del frame
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGINT raise Interrupted in the main thread (signals are only delivered there), and send
    again a signal whose Interrupted was raised where Python can only print it (see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, raise_interrupted)
        if sys.unraisablehook is not redeliver_lost_stop:
            global _previous_unraisablehook
            _previous_unraisablehook = sys.unraisablehook
            sys.unraisablehook = redeliver_lost_stop


_previous_unraisablehook = sys.__unraisablehook__


def redeliver_lost_stop(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: an Interrupted that Python could not raise (it came in a gc callback or a finalizer) is
    sent again as its signal, silently; anything else goes to the hook installed before."""
    if isinstance(unraisable.exc_value, Interrupted):
        again = threading.Timer(REDELIVERY_DELAY_S, os.kill, (os.getpid(), unraisable.exc_value.signum))
        again.daemon = True  # never keeps a finishing process alive
        again.start()
        return
    _previous_unraisablehook(unraisable)
