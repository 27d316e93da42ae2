"""Entries of the data cache (`<cache_dir>/<kind>/<key>/`): built once in a temporary directory and renamed into
place, their file sizes recorded, and checked when opened. No TensorFlow.

- Building: `building(entry)` gives a temporary directory `.tmp-<entry>-<id>/` beside the entry, locked by the
  building process (`flock` on its `.owner` file, which then names its pid) for as long as it builds, and
  removed whatever ends the build (an error, SIGTERM or Ctrl-C through main.py's handler). Temporaries that a
  killed process left (a pid in `.owner`, the lock free) are removed by the next build in the same directory,
  with a warning; where locks cannot be tested, nothing is removed.
- Storage: a write that fails for space, quota, permissions or a read-only disk becomes one StorageError naming
  the cache directory and how to point the cache elsewhere (`data.cache_dir` or QKV_VIT_CACHE).
- Damage: `seal(directory)` records every file's size in `sizes.json` before the rename; `damage(entry)` compares
  them when the entry is opened (a stat per file), so an entry cut short by an interrupted copy or a disk error is
  found before any batch is read. Entries made before sizes were recorded are not checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from qkv_vit.errors import storage_failures

TEMPORARY_PREFIX = ".tmp-"
OWNER = ".owner"  # the lock file of a temporary's builder
SIZES = "sizes.json"
# A temporary without an owner file, or with one that names no builder, is a live builder's only in the instant
# between its mkdir and its lock; older than this, it was left by a version of qkv_vit that did not lock them.
UNOWNED_GRACE_S = 600.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("QKV_VIT_CACHE", Path.home() / ".cache" / "qkv_vit"))


def cache_dir_of(configured: str | None) -> Path:
    """config.data.cache_dir, or the default (QKV_VIT_CACHE, else ~/.cache/qkv_vit)."""
    return Path(configured).expanduser() if configured else default_cache_dir()


def storage_errors(directory: Path, what: str) -> contextlib.AbstractContextManager[None]:
    """A storage failure while writing under `directory` (the cache) becomes one StorageError with the fix."""
    return storage_failures(
        lambda cause, error: (
            f"Writing the data cache failed while {what}: {cause} in {directory}. Nothing partial was kept. Free "
            "space there, or put the cache on a disk with room and write access: --config.data.cache_dir=DIR (or "
            "the environment variable QKV_VIT_CACHE=DIR)."
        ),
        not_ours=lambda error: outside(error, directory),
    )


def outside(error: BaseException, directory: Path) -> bool:
    """True for an OSError, or one a library wrapped, about a file outside `directory` (e.g. an unreadable source
    image, not the cache)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        name = getattr(error, "filename", None)
        if isinstance(error, OSError) and name:
            return not os.path.abspath(os.fspath(name)).startswith(os.path.abspath(directory))
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def building(entry: Path, what: str) -> Iterator[Path]:
    """A temporary directory, owned by this process, to build `entry` in; removed when the block ends. Storage
    failures inside the block are reported as StorageError (storage_errors)."""
    parent = entry.parent
    with storage_errors(parent, what):
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent)
        temporary = parent / f"{TEMPORARY_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        owner = open(temporary / OWNER, "a")  # noqa: SIM115 - held open (locked) for the whole build
        try:
            lock_owner(owner)
            yield temporary
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
            owner.close()


def lock_owner(owner) -> None:
    """Lock a new temporary's owner file, then write this process's pid into it: a locked file with a pid is a
    live build, a free one with a pid a dead one (an empty one is a build not yet locked: see being_built)."""
    try:
        fcntl.flock(owner, fcntl.LOCK_EX)  # blocking: only another process's being_built holds it, for an instant
    except OSError as error:
        logging.warning(
            "Cannot lock %s (%s): on a file system without locks, a temporary left by a killed process is not "
            "removed by later runs; delete such .tmp-* directories by hand.",
            owner.name,
            error.strerror,
        )
    owner.write(f"{os.getpid()}\n")
    owner.flush()


def remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporaries in `directory` whose builder is gone (killed: its lock is free), with a warning."""
    for temporary in sorted(directory.glob(f"{TEMPORARY_PREFIX}*")):
        if temporary.is_dir() and not being_built(temporary):
            logging.warning("Removing %s: a data cache entry left unfinished by a process that was killed.", temporary)
            shutil.rmtree(temporary, ignore_errors=True)


def being_built(temporary: Path) -> bool:
    """Whether a live process may be building `temporary`: its owner lock is held, or its owner file names no
    builder yet (just made, not yet locked), or the lock cannot be tested on this file system."""
    try:
        with open(temporary / OWNER, "a+") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when `owner` closes
            owner.seek(0)
            if owner.read().strip():
                return False  # the lock was free and a builder had taken it: that builder is gone
            return time.time() - os.fstat(owner.fileno()).st_mtime < UNOWNED_GRACE_S
    except FileNotFoundError:
        try:
            return time.time() - temporary.stat().st_mtime < UNOWNED_GRACE_S
        except FileNotFoundError:
            return True  # removed meanwhile by its builder: nothing to do
    except OSError:
        return True  # held (EWOULDBLOCK), or no locks here: never remove what may be a live build


def seal(directory: Path) -> None:
    """Record the size of every file below `directory` in its sizes.json, for `damage` to check on open."""
    sizes = {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != SIZES
    }
    (directory / SIZES).write_text(json.dumps(sizes, indent=0))


def damage(entry: Path) -> str | None:
    """What is wrong with a sealed entry ("train.images.npy has 123 bytes of 456", "x is missing"); None when every
    recorded file has its recorded size, or the entry records no sizes (made before they were recorded)."""
    try:
        sizes = json.loads((entry / SIZES).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return f"its {SIZES} cannot be read ({error})"
    for name, size in sizes.items():
        try:
            found = (entry / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes of the {size} written"
    return None


def whole(
    entry: Path, complete_marker: str, redo: str, unreadable: Callable[[Path], str | None] = lambda entry: None
) -> bool:
    """Whether `entry` is finished (its `complete_marker` is there) and undamaged (`damage`, and `unreadable` for
    what sizes cannot show). A damaged entry is discarded with a warning that says what is redone ("converting X")."""
    if not (entry / complete_marker).exists():
        return False
    problem = damage(entry) or unreadable(entry)
    if problem is None:
        return True
    logging.warning("The data cache entry %s is damaged (%s): %s again.", entry, problem, redo)
    discard(entry)
    return (entry / complete_marker).exists()  # kept by discard: another process rebuilt it meanwhile


def discard(entry: Path) -> None:
    """Remove a damaged entry: renamed out of the way first (atomically), so no other process opens it meanwhile.
    An entry that is whole by now was rebuilt meanwhile by another process that found it damaged too: kept."""
    if (entry / SIZES).exists() and damage(entry) is None:
        return
    aside = entry.parent / f"{TEMPORARY_PREFIX}damaged-{entry.name}-{uuid.uuid4().hex[:8]}"
    with storage_errors(entry.parent, f"removing the damaged entry {entry}"):
        try:
            os.rename(entry, aside)
        except FileNotFoundError:
            return  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def move_into_place(written: Path, entry: Path, complete_marker: str) -> None:
    """Rename the finished directory `written` to `entry`; if another process finished the same entry first (its
    `complete_marker` file exists), theirs is kept. An incomplete directory at `entry` is never trusted: replaced."""
    if entry.exists() and not (entry / complete_marker).exists():
        shutil.rmtree(entry)
    try:
        os.replace(written, entry)
    except OSError:
        if not (entry / complete_marker).exists():
            raise
