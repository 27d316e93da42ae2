"""Long work that reports itself, so that a console is never silent for long: a line when it starts, one every
EVERY_S seconds while it lasts (from a thread: XLA's compiler or a library's fit says nothing meanwhile), and its
duration when it ends."""

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

EVERY_S = 10.0  # the longest the console stays silent during a run or an analysis


@contextlib.contextmanager
def announced(
    what: str, say: Callable[[str], None] = logging.info, every_s: float = EVERY_S, brief: bool = False
) -> Iterator[None]:
    """`say`s "WHAT ...", then "WHAT: N s so far" every `every_s` seconds, then "WHAT took N s" (not after an
    exception, which says enough). `brief`, for work that is usually short and reported by its caller (an
    evaluation): only the lines while it lasts, and how long it took if it lasted that long."""
    if not brief:
        say(f"{what} ...")
    started, finished = time.perf_counter(), threading.Event()

    def tick() -> None:
        while not finished.wait(every_s):
            say(f"{what}: {time.perf_counter() - started:.0f} s so far")

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        finished.set()
        ticker.join()
    took = time.perf_counter() - started
    if not brief or took >= every_s:
        say(f"{what} took {took:.1f} s")
