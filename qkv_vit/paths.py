"""Workdir and checkpoint locations: local paths or cloud URLs (gs://bucket/run), through etils.epath.

Orbax, TensorBoard and tfds all accept both; our own file writes go through `as_path` so that a run on a
TPU pod can keep its workdir in a bucket that every worker sees.
"""

import os

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """False for URLs with a scheme (gs://, s3://, ...), which do not support appending or atomic renames."""
    return "://" not in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """A local path made absolute, with `~` expanded (a quoted --workdir="~/runs/a" reaches us unexpanded), so
    logs and checkpoints name it fully; a URL left as it is."""
    text = os.fspath(path)
    return epath.Path(os.path.abspath(os.path.expanduser(text)) if is_local(text) else text)
