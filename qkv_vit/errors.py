"""Errors a user can fix, each raised with one message that says what is wrong and how to fix it.

`python -m qkv_vit.main` prints them as one `error: ...` line and exits with the code of their kind
(docs/failures.md, "Exit codes"); any other exception is a bug and keeps its traceback.
The data pipeline's `DataConfigError` and the weight import's `WeightMismatchError` are ConfigErrors: a
caller can catch every mistake in its inputs as one type.
"""

import contextlib
import errno
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator

MAX_CAUSE_CHARS = 300  # TensorStore errors print whole storage specs: keep the start, which says what failed


class ConfigError(ValueError):
    """A config value, command-line flag or input path that cannot work (exit code 2)."""


class StorageError(RuntimeError):
    """A write the product makes failed for space, permissions or a read-only file system, or stored data cannot be
    read back (exit code 4): the data cache, the workdir's logs, metrics and checkpoints."""


class CheckpointError(StorageError):
    """The workdir cannot be written, a checkpoint cannot be saved, or no checkpoint can be read (exit code 4)."""


# What a failed write says when the disk, not the program, is at fault: full, over quota, read-only, not permitted.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# The same causes as libraries that do not raise OSError word them (TensorFlow's gfile, TensorStore, Orbax).
STORAGE_MESSAGES = (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "Operation not permitted",
)


def one_line(message: str) -> str:
    """A message on one line (some messages put a command or a list on lines of their own)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def describe_cause(error: BaseException) -> str:
    """A library's exception as a short clause for our own messages: its type and the start of its message
    (terminal colour codes, which some libraries put in messages, removed)."""
    message = one_line(re.sub(r"\x1b\[[0-9;]*m", "", str(error)))
    if len(message) > MAX_CAUSE_CHARS:
        message = message[:MAX_CAUSE_CHARS] + " ..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def storage_cause(error: BaseException) -> str | None:
    """What a failed write's storage says ("No space left on device", ...), looking through the exception's chain of
    causes (libraries wrap the OSError in their own types); None when the failure is not the storage's."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error.strerror or os.strerror(error.errno)
        text = str(error)
        found = next((message for message in STORAGE_MESSAGES if message.lower() in text.lower()), None)
        if found:
            return found
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def storage_failures(
    message: Callable[[str, BaseException], str], not_ours: Callable[[BaseException], bool] = lambda error: False
) -> Iterator[None]:
    """Inside the block, an exception whose chain says the storage failed (storage_cause) becomes one StorageError
    with `message(cause, error)`, unless `not_ours(error)`; ConfigErrors and StorageErrors pass as they are."""
    try:
        yield
    except (ConfigError, StorageError):
        raise
    except Exception as error:
        cause = storage_cause(error)
        if cause is None or not_ours(error):
            raise
        raise StorageError(message(cause, error)) from None


def quiet_on_broken_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """A command's main whose output may be piped into `head`: when the reader closes the pipe the command stops
    quietly, as Unix tools do, instead of with a BrokenPipeError traceback (Python's documented recipe: stdout
    pointed at /dev/null, so that its final flush cannot fail again)."""

    @functools.wraps(main)
    def run(*args: object, **kwargs: object) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()  # a piped stdout is buffered: its last write would otherwise fail after this try
            return code
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return run
