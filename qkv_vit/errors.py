"""Errors a user can fix, each raised with one message that says what is wrong and how to fix it.

`python -m qkv_vit.main` prints them as one `error: ...` line and exits with the code of their kind
(README, "What happens when things go wrong"); any other exception is a bug and keeps its traceback.
The data pipeline's `DataConfigError` and the weight import's `WeightMismatchError` are ConfigErrors: a
caller can catch every mistake in its inputs as one type.
"""

import re

MAX_CAUSE_CHARS = 300  # TensorStore errors print whole storage specs: keep the start, which says what failed


class ConfigError(ValueError):
    """A config value, command-line flag or input path that cannot work (exit code 2)."""


class CheckpointError(RuntimeError):
    """The workdir cannot be written, a checkpoint cannot be saved, or no checkpoint can be read (exit code 4)."""


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
