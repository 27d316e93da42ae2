"""One run at a time in a workdir: an exclusive lock taken before the run writes anything there.

Each process of a run locks its own file, WORKDIR/.lock (process 0) or WORKDIR/.lock.process<i>, with `flock`,
and writes who holds it (host, pid, start time) into it. A second run's process finds the lock taken and stops
with a ConfigError naming the holder, and so do the other processes of that run. The kernel (or, on NFS, the
lock manager) releases the lock when its process ends however it ends, `kill -9` included, so a rerun after a
crash or a preemption is not blocked; the file left behind is only overwritten. On a file system without locks
(some parallel file systems mounted without them) a warning says the workdir is unprotected; object stores
(gs://, s3://) have no locks: there, two runs in one workdir are not detected.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator

from qkv_vit.errors import ConfigError
from qkv_vit.paths import PathLike, as_path, is_local
from qkv_vit.train.checkpointing import all_processes_agree


def lock_file_name(process_index: int) -> str:
    return ".lock" if process_index == 0 else f".lock.process{process_index}"


@contextlib.contextmanager
def workdir_lock(workdir: PathLike, process_index: int) -> Iterator[None]:
    """Hold the workdir's lock of `process_index` for the block; ConfigError if another run holds it."""
    if not is_local(workdir):
        logging.info("%s is an object store, which has no locks: make sure no other run uses this workdir.", workdir)
        yield
        return
    path = as_path(workdir) / lock_file_name(process_index)
    with open(path, "a+", encoding="utf-8") as lock:
        taken = not acquired(lock, path)
        lock.seek(0)
        found = holder(lock.read()) if taken else "found by another process of this run"
        if not all_processes_agree(not taken):  # every process stops, not only those that found their lock taken
            raise ConfigError(
                f"The workdir {workdir} is in use by another run ({found}): two runs in one workdir would delete "
                "each other's checkpoints and write every metric twice. Wait for it to finish or stop it (rerunning "
                "the same command then resumes), or give this run another --workdir."
            )
        lock.seek(0)
        lock.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        lock.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}) + "\n")
        lock.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)


def acquired(lock, path) -> bool:
    """Take the exclusive lock without waiting: False if another process holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        logging.warning(
            "Cannot lock %s (%s): this file system has no file locks, so a second run in the same workdir would not "
            "be noticed.",
            path,
            error.strerror,
        )
    return True


def holder(record: str) -> str:
    """The lock file's record as words: "pid 123 on host a, started 2026-12-04T18:00:00+00:00"."""
    try:
        held = json.loads(record)
        return f"pid {held['pid']} on host {held['host']}, started {held['started']}"
    except (ValueError, KeyError, TypeError):
        return "its lock file names no holder yet"
