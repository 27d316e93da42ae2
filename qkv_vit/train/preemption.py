"""SIGTERM (preemption) handling: finish the current step, save a checkpoint, exit cleanly."""

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Records SIGTERM/SIGINT; `requested(step)` tells every process the same answer at the same step."""

    def __init__(self, check_every_steps: int):
        self.flag = threading.Event()
        self.check_every_steps = max(1, check_every_steps)
        self.previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        logging.warning("Received signal %d: saving a checkpoint after the current step, then exiting.", signum)
        self.flag.set()

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.flag.is_set()
        if step % self.check_every_steps:
            return False
        # A signal reaches processes at different times: agree, so that all save the same step.
        flags = multihost_utils.process_allgather(np.asarray(self.flag.is_set()))
        return bool(np.any(flags))
