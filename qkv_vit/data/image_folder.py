"""Your own images: a folder ROOT/<split>/<class>/*.jpg|png, or a .tar/.tar.gz of one, as a tfds data set.

The folder (or archive) is converted once into a tfds data set in a cache directory, storing each
file's encoded bytes unchanged, and reused by later runs. Converting (rather than reading the files
through `tfds.folder_dataset.ImageFolder`) gives image folders everything a tfds data set has:
sub-splits for per-process sharding, file-level shuffling, and the same reader as ImageNet.

Cache layout: `<cache_dir>/image_folder/<key>/{label_map.json, tfds/...}`. The key is the archive's
name, size and modification time, or a folder's path and the modification times of its split and
class folders (adding or removing files changes those; editing a file in place does not: delete the
cache entry to force a rebuild). Everything is built in a temporary directory that is renamed into
place at the end, so a killed run never leaves an entry that later runs trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Iterator

import PIL.Image
import tensorflow_datasets as tfds

from qkv_vit.data._tensorflow import tf  # noqa: F401  (configures TF before tfds touches it)
from qkv_vit.data.errors import DataConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LABEL_MAP = "label_map.json"
_TFDS_NAME = "image_folder"
_MAX_LISTED_SKIPS = 1000


@dataclasses.dataclass(frozen=True)
class PreparedFolder:
    """A converted image folder: where its tfds data live and what the conversion found."""

    tfds_dir: Path
    class_names: list[str]
    num_examples: dict[str, int]
    num_skipped: int
    skipped_files: list[str]


def default_cache_dir() -> Path:
    return Path(os.environ.get("QKV_VIT_CACHE", Path.home() / ".cache" / "qkv_vit"))


def prepare_image_folder(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                         bad_files: str = "skip") -> PreparedFolder:
    """Converts the folder or archive at `path` into a cached tfds data set, or reuses the cached one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataConfigError(f"Image folder path {path} does not exist.")
    is_tar = path.is_file() and path.name.endswith(TAR_SUFFIXES)
    if not (is_tar or path.is_dir()):
        raise DataConfigError(f"{path} is neither a folder nor a {'/'.join(TAR_SUFFIXES)} archive.")
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = cache_dir / "image_folder" / (_tar_key(path) if is_tar else _folder_key(path))
    if (final / LABEL_MAP).exists():
        return _load(final)
    check_can_prepare()
    temporary = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir(parents=True)
    try:
        root = _extract(path, temporary / "extracted") if is_tar else path
        _build(root, temporary, bad_files, source=path)
        shutil.rmtree(temporary / "extracted", ignore_errors=True)  # the tfds records hold the bytes now
        if final.exists() and not (final / LABEL_MAP).exists():
            shutil.rmtree(final)  # not ours (entries appear only by rename, complete): never trust it
        try:
            os.rename(temporary, final)
        except OSError:  # another process finished the same entry first: use theirs
            if not (final / LABEL_MAP).exists():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return _load(final)


def check_can_prepare() -> None:
    """tfds 4.9.x prepares data sets only with `importlib_resources`, which it forgets to require (tfds#11212)."""
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        raise DataConfigError(
            "Preparing a tfds data set needs the package importlib_resources, which tensorflow-datasets uses "
            "without declaring it: pip install importlib_resources"
        ) from None


def _tar_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{_stem(path)}-{digest}"


def _folder_key(path: Path) -> str:
    parts = [str(path.resolve())]
    for split_dir in _subdirs(path):
        parts.append(f"{split_dir.name}:{split_dir.stat().st_mtime_ns}")
        parts.extend(f"{split_dir.name}/{d.name}:{d.stat().st_mtime_ns}" for d in _subdirs(split_dir))
    return f"{_stem(path)}-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:16]}"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in TAR_SUFFIXES:
        name = name.removesuffix(suffix)
    return name or "root"


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders, sorted (hidden ones such as macOS's .DS_Store/._* are never data)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _visible_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _extract(archive: Path, destination: Path) -> Path:
    """Extracts the archive and returns the folder holding the split folders."""
    logging.info("Extracting %s to %s", archive, destination)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, filter="data")  # refuses absolute paths, links out of the tree
        else:  # Python without extraction filters (3.10 before 3.10.12)
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise DataConfigError(f"Unsafe path {member.name!r} in {archive}.")
            tar.extractall(destination)
    root = destination
    # An archive usually wraps ROOT in one top folder (cifar10-jpeg/train/...): step into it.
    while len(children := _subdirs(root)) == 1 and _looks_like_root(children[0]):
        root = children[0]
    return root


def _looks_like_root(path: Path) -> bool:
    """True when `path` has the <split>/<class>/ folder levels below it."""
    return any(_subdirs(split_dir) for split_dir in _subdirs(path))


@dataclasses.dataclass
class FolderScan:
    splits: dict[str, list[tuple[Path, str]]]
    class_names: list[str]
    skipped: list[str]


def scan_image_folder(root: Path, bad_files: str = "skip") -> FolderScan:
    """Lists ROOT/<split>/<class>/<image>; raises DataConfigError for a layout that cannot work."""
    split_dirs = _subdirs(root)
    if not split_dirs:
        raise DataConfigError(f"No split folders in {root}: expected ROOT/<split>/<class>/<image>.jpg|png.")
    splits, classes, skipped = {}, set(), []
    for split_dir in split_dirs:
        class_dirs = _subdirs(split_dir)
        if not class_dirs:
            raise DataConfigError(f"Split folder {split_dir} has no class folders: expected {split_dir}/<class>/<image>.")
        examples = []
        for class_dir in class_dirs:
            files = _visible_files(class_dir)
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            for other in sorted(set(files) - set(images)):
                _reject(other, root, bad_files, skipped, "not a .jpg/.jpeg/.png file")
            if not images:
                raise DataConfigError(f"Empty class folder {class_dir}: it holds no {'/'.join(IMAGE_SUFFIXES)} images.")
            examples.extend((f, class_dir.name) for f in images)
            classes.add(class_dir.name)
        splits[split_dir.name] = examples
    return FolderScan(splits, sorted(classes), skipped)


def _reject(file: Path, root: Path, bad_files: str, skipped: list[str], why: str) -> None:
    relative = file.relative_to(root).as_posix()
    if bad_files == "error":
        raise DataConfigError(f"{file} is {why} (set bad_files='skip' to skip and count such files).")
    skipped.append(relative)


def _build(root: Path, work: Path, bad_files: str, source: Path) -> None:
    scan = scan_image_folder(root, bad_files)
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=scan.class_names),
            "file_name": tfds.features.Text(),  # <split>/<class>/<file>, relative to ROOT
        }
    )
    generators = {split: _examples(files, root, bad_files, scan.skipped) for split, files in scan.splits.items()}
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=_TFDS_NAME, version="1.0.0", features=features, split_datasets=generators, data_dir=work / "tfds",
        description=f"Image folder {source}",
    )
    label_map = {
        "source": str(source),
        "class_names": scan.class_names,
        "label_map": {name: index for index, name in enumerate(scan.class_names)},
        "num_examples": {split: info.num_examples for split, info in builder.info.splits.items()},
        "num_skipped": len(scan.skipped),
        "skipped_files": scan.skipped[:_MAX_LISTED_SKIPS],
        "tfds_dir": Path(builder.data_dir).relative_to(work).as_posix(),
    }
    shutil.rmtree(work / "tfds" / "downloads", ignore_errors=True)  # empty folders tfds makes, nothing to download
    if scan.skipped:
        logging.warning("Skipped %d files that are not images, e.g. %s", len(scan.skipped), scan.skipped[:5])
    (work / LABEL_MAP).write_text(json.dumps(label_map, indent=1))


def _examples(files: list[tuple[Path, str]], root: Path, bad_files: str,
              skipped: list[str]) -> Iterator[tuple[str, dict]]:
    """Yields tfds examples holding each file's bytes unchanged; checks each decodes as an image."""
    for file, class_name in files:
        data = file.read_bytes()
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception:  # PIL raises many types for broken files; any of them means "not an image"
            _reject(file, root, bad_files, skipped, "not a readable image")
            continue
        relative = file.relative_to(root).as_posix()
        yield relative, {"image": data, "label": class_name, "file_name": relative}


def _load(entry: Path) -> PreparedFolder:
    label_map = json.loads((entry / LABEL_MAP).read_text())
    return PreparedFolder(
        tfds_dir=entry / label_map["tfds_dir"],
        class_names=label_map["class_names"],
        num_examples=label_map["num_examples"],
        num_skipped=label_map["num_skipped"],
        skipped_files=label_map["skipped_files"],
    )
