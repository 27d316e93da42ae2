"""Image folders on disk, without TensorFlow: ROOT/<split>/<class>/<image>, or a .tar/.tar.gz of one.

Finding the split and class folders (an archive is extracted first), ignoring the clutter that archivers,
operating systems and tools leave beside data, naming paths as the user gave them (for an archive: the archive
and the member, never the temporary extraction directory), the cache keys of a folder or archive, and the
held-out split's name. Used by both ways of reading a folder: converted to tfds (`image_folder`) and decoded
into memory (`in_memory`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import tarfile
import zlib
from pathlib import Path

from qkv_vit.data.errors import DataConfigError
from qkv_vit.errors import describe_cause

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Names that are never data, at any level, compared without case (hidden names, starting with ".", neither): macOS
# archive metadata and folder icons, Windows and Synology thumbnails, Python caches, trash and recovery folders;
# and the ":Zone.Identifier" streams that copies out of Windows leave as files under WSL.
CLUTTER_NAMES = frozenset(
    name.lower()
    for name in (
        "__MACOSX",
        "Icon\r",
        "Thumbs.db",
        "ehthumbs.db",
        "desktop.ini",
        "@eaDir",
        "__pycache__",
        "$RECYCLE.BIN",
        "System Volume Information",
        "lost+found",
    )
)
CLUTTER_SUFFIXES = (":zone.identifier",)
# Bumped when conversion changes what it accepts, so entries made by an older check are rebuilt (2: a full decode
# with the pipeline's decoder instead of PIL's verify()).
CONVERSION_VERSION = 2
TRAIN_SPLIT_NAMES = ("train", "training")
# Held-out split names, in order of preference, compared without case.
HELD_OUT_SPLIT_NAMES = ("test", "testing", "validation", "valid", "val", "eval", "evaluation", "dev")


SAMPLED_BYTES = 1 << 20  # an archive's cache key hashes its first and last MiB (a tar's first member headers)


def tar_key(path: Path) -> str:
    """An archive's cache key: its resolved path, size, modification time and a hash of its first and last
    SAMPLED_BYTES, so that two archives of the same name, size and time (folds unpacked from one tarball, copies
    made with `cp -p`) never share an entry, and an archive replaced in place by another is converted again."""
    stat = path.stat()
    sample = hashlib.sha256()
    with open(path, "rb") as archive:
        sample.update(archive.read(SAMPLED_BYTES))
        if stat.st_size > 2 * SAMPLED_BYTES:
            archive.seek(-SAMPLED_BYTES, os.SEEK_END)
        sample.update(archive.read(SAMPLED_BYTES))
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{sample.hexdigest()}:v{CONVERSION_VERSION}"
    return f"{_stem(path)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


FOLDER_FIX = (
    "give data.path a folder of <split>/<class>/<image> files (train/ and test/ or val/), or a .tar/.tar.gz of one; "
    "`python -m qkv_vit.data.prepare cifar10 --image_folder PATH` writes CIFAR-10 as one"
)


def checked_path(path: str | os.PathLike) -> tuple[Path, bool]:
    """An image folder's path made absolute, and whether it is a tar; DataConfigError with the fix where it is neither
    an existing folder nor a tar."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataConfigError(f"Image folder path {path} does not exist: {FOLDER_FIX}.")
    is_tar = path.is_file() and path.name.endswith(TAR_SUFFIXES)
    if not (is_tar or path.is_dir()):
        raise DataConfigError(f"{path} is neither a folder nor a {'/'.join(TAR_SUFFIXES)} archive: {FOLDER_FIX}.")
    return path, is_tar


def folder_key(path: Path) -> str:
    parts = [str(path.resolve()), f"v{CONVERSION_VERSION}"]
    for split_dir in subdirs(path):
        parts.append(f"{split_dir.name}:{split_dir.stat().st_mtime_ns}")
        parts.extend(f"{split_dir.name}/{d.name}:{d.stat().st_mtime_ns}" for d in subdirs(split_dir))
    return f"{_stem(path)}-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:16]}"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in TAR_SUFFIXES:
        name = name.removesuffix(suffix)
    return name or "root"


def _is_clutter(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith(".") or name in CLUTTER_NAMES or name.endswith(CLUTTER_SUFFIXES)


def subdirs(path: Path) -> list[Path]:
    """Sub-folders that may hold data, sorted (hidden ones and clutter such as __MACOSX/ never do)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not _is_clutter(p))


def _visible_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not _is_clutter(p))


@dataclasses.dataclass(frozen=True)
class Located:
    """Where the split folders are on disk, and how to name a path below them to the user."""

    root: Path  # holds <split>/<class>/<image>
    source: Path  # the folder or archive as the user gave it (config.data.path)
    extracted: Path | None = None  # an archive's (temporary) extraction directory

    def shown(self, path: Path) -> str:
        """`path` as the user knows it: itself for a folder; the archive and the member for an archive."""
        if self.extracted is None:
            return str(path)
        member = path.relative_to(self.extracted).as_posix()
        return str(self.source) if member == "." else f"{self.source} (archive member {member})"


def extract(archive: Path, destination: Path) -> Located:
    """Extracts the archive and locates the folder holding the split folders."""
    logging.info("Extracting %s to %s", archive, destination)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(destination, filter="data")  # refuses absolute paths, links out of the tree
            else:  # Python without extraction filters (3.10 before 3.10.12)
                for member in tar.getmembers():
                    if member.name.startswith("/") or ".." in Path(member.name).parts:
                        raise DataConfigError(
                            f"Unsafe path {member.name!r} in {archive}: it points outside the archive; pack it "
                            "again from the folder (tar czf NAME.tar.gz FOLDER), or give the extracted folder as "
                            "the path."
                        )
                tar.extractall(destination)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:  # cut short, not a tar, unsafe member
        raise DataConfigError(
            f"{archive} cannot be extracted ({describe_cause(error)}): it is damaged, cut short or not a tar archive, "
            "or a member points outside it. Download or pack it again (tar czf NAME.tar.gz FOLDER), or give the "
            "extracted folder as the path."
        ) from None
    root = destination
    # An archive usually wraps ROOT in one top folder (cifar10-jpeg/train/...): step into it.
    while len(children := subdirs(root)) == 1 and _looks_like_root(children[0]):
        root = children[0]
    return Located(root=root, source=archive, extracted=destination)


def _looks_like_root(path: Path) -> bool:
    """True when `path` has the <split>/<class>/ folder levels below it."""
    return any(subdirs(split_dir) for split_dir in subdirs(path))


@dataclasses.dataclass
class FolderScan:
    splits: dict[str, list[tuple[Path, str]]]
    class_names: list[str]
    skipped: list[str]


def scan_image_folder(folder: Located, bad_files: str = "skip") -> FolderScan:
    """Lists ROOT/<split>/<class>/<image>; raises DataConfigError for a layout that cannot work."""
    split_dirs = subdirs(folder.root)
    if not split_dirs:
        raise DataConfigError(
            f"No split folders in {folder.shown(folder.root)}: put the images in ROOT/<split>/<class>/<image>.jpg|png "
            "(train/ and test/ or val/)."
        )
    splits, classes, skipped = {}, {}, []
    for split_dir in split_dirs:
        class_dirs = subdirs(split_dir)
        if not class_dirs:
            raise DataConfigError(
                f"Split folder {folder.shown(split_dir)} has no class folders: put each class's images in a folder "
                "of its own below it, <split>/<class>/<image>."
            )
        examples = []
        for class_dir in class_dirs:
            files = _visible_files(class_dir)
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            for other in sorted(set(files) - set(images)):
                reject(other, folder, bad_files, skipped, "not a .jpg/.jpeg/.png file")
            if not images:
                raise DataConfigError(
                    f"Empty class folder {folder.shown(class_dir)}: it holds no {'/'.join(IMAGE_SUFFIXES)} "
                    "images; add its images or remove the folder."
                )
            examples.extend((f, class_dir.name) for f in images)
        splits[split_dir.name] = examples
        classes[split_dir.name] = sorted(d.name for d in class_dirs)
    return FolderScan(splits, split_classes(folder, classes), skipped)


def split_classes(folder: Located, classes: dict[str, list[str]]) -> list[str]:
    """The class names of a folder, from its train split (the union of all when no split has a train name).

    A held-out split with a class folder the train split lacks (`Cat` beside `cat`, a typo, a class added to one
    split only) is an error: its images would get a label the model never trains on, and the class count would
    grow. One that lacks some of the train split's classes (a small held-out set) is reported with a warning.
    """
    train = find_split(list(classes), TRAIN_SPLIT_NAMES)
    names = classes[train] if train else sorted({name for split in classes.values() for name in split})
    for split, found in classes.items():
        extra, missing = sorted(set(found) - set(names)), sorted(set(names) - set(found))
        if extra:
            raise DataConfigError(
                f"Split folder {folder.shown(folder.root / split)} has class folders {extra[:10]} that the train split "
                f"{train!r} has not (its classes: {names[:10]}{' ...' if len(names) > 10 else ''}): their images would "
                "get labels the model never trains on. Give them the train split's class names (names are "
                "case-sensitive), or remove them."
            )
        if missing:
            logging.warning(
                "Split %r of %s has no class folder for %d of the %d classes (%s): it is evaluated on the others.",
                split,
                folder.source,
                len(missing),
                len(names),
                missing[:10],
            )
    return names


def reject(file: Path, folder: Located, bad_files: str, skipped: list[str], why: str) -> None:
    if bad_files == "error":
        raise DataConfigError(f"{folder.shown(file)} is {why} (set bad_files='skip' to skip and count such files).")
    skipped.append(file.relative_to(folder.root).as_posix())


def find_split(available: list[str], names: tuple[str, ...]) -> str | None:
    """The first of `names` (in their order of preference) that `available` has, ignoring case."""
    by_name = {split.lower(): split for split in available}
    return next((by_name[name] for name in names if name in by_name), None)


def no_held_out_split_message(description: str, available: list[str]) -> str:
    return (
        f"{description} has no held-out split to evaluate on: its splits are {available}, and none is called "
        f"{', '.join(HELD_OUT_SPLIT_NAMES)}. Set data.eval_split: one of its splits; or hold out part of the train "
        "split with data.train_split='train[:90%]' and data.eval_split='train[90%:]'; or data.eval_split='train' to "
        "evaluate on the training images (the reported accuracy is then training accuracy)."
    )
