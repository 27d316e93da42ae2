"""Your own images: a folder ROOT/<split>/<class>/*.jpg|png, or a .tar/.tar.gz of one, as a tfds data set.

The folder (or archive) is converted once into a tfds data set in a cache directory, storing each
file's encoded bytes unchanged, and reused by later runs. Converting (rather than reading the files
through `tfds.folder_dataset.ImageFolder`) gives image folders everything a tfds data set has:
sub-splits for per-process sharding, file-level shuffling, and the same reader as ImageNet.

Cache layout: `<cache_dir>/image_folder/<key>/{label_map.json, sizes.json, tfds/...}`. The key is an
archive's resolved path, size, modification time and a hash of its first and last MiB, or a folder's
resolved path and the names and modification times of its split and class folders (adding, removing or
renaming files changes those; editing a file in place does not: delete the cache entry to force a
rebuild). Everything is built in a temporary directory that is renamed into place at the end
(`qkv_vit.data.cache`), so a killed run never leaves an entry that later runs trust; the size of every
file is recorded, and an entry cut short later (an interrupted copy, a disk error) is converted again.

Every file is decoded in full at conversion with the decoder the input pipeline uses (`augment.decode`),
so a file that would fail mid-run (a truncated JPEG, a TIFF named .png) is skipped and counted, or with
bad_files="error" named, before training starts. Clutter that archivers, operating systems and tools
leave beside data (`__MACOSX/`, hidden files such as `._name` and `.DS_Store`, `Thumbs.db`, `@eaDir/`, ...)
is not data and is ignored at every level; errors name paths as the user gave them (for an archive: the
archive and the member), never the temporary extraction directory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from qkv_vit.data import augment, cache
from qkv_vit.data._tensorflow import tf
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.folders import (
    Located,
    checked_path,
    extract,
    folder_key,
    reject,
    scan_image_folder,
    tar_key,
)

LABEL_MAP = "label_map.json"
_TFDS_NAME = "image_folder"
_MAX_LISTED_SKIPS = 1000
_DECODE_CHUNK = 256  # files read and decoded ahead of the tfds writer, in parallel (bounded memory)


@dataclasses.dataclass(frozen=True)
class PreparedFolder:
    """A converted image folder: where its tfds data live and what the conversion found."""

    tfds_dir: Path
    class_names: list[str]
    num_examples: dict[str, int]
    num_skipped: int
    skipped_files: list[str]  # the first _MAX_LISTED_SKIPS
    label_map_file: Path  # the conversion's record, which lists the skipped files


def prepare_image_folder(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, bad_files: str = "skip"
) -> PreparedFolder:
    """Converts the folder or archive at `path` into a cached tfds data set, or reuses the cached one; an entry
    found damaged (a file cut short or missing since it was written) is converted again, with a warning."""
    path, is_tar = checked_path(path)
    final = cache.cache_dir_of(cache_dir) / "image_folder" / (tar_key(path) if is_tar else folder_key(path))
    if cache.whole(final, LABEL_MAP, f"converting {path}"):
        return _check_cached(_load(final), path, bad_files)
    check_can_prepare()
    with cache.building(final, f"converting {path}") as temporary:
        folder = extract(path, temporary / "extracted") if is_tar else Located(root=path, source=path)
        written = temporary / "entry"
        written.mkdir()
        _build(folder, written, bad_files)
        cache.seal(written)
        cache.move_into_place(written, final, LABEL_MAP)
    return _load(final)


def _check_cached(prepared: PreparedFolder, path: Path, bad_files: str) -> PreparedFolder:
    """A cached entry converted with bad_files="skip" still holds no bad file: with "error" they are an error now."""
    if bad_files == "error" and prepared.num_skipped:
        raise DataConfigError(
            f"{path}: {prepared.skipped_files[0]} is not an image the input pipeline can decode ({prepared.num_skipped} "
            "such files were skipped when the folder was converted, all listed in its label_map.json). Remove them, "
            "or set bad_files='skip' to skip and count them."
        )
    return prepared


def check_can_prepare() -> None:
    """tfds 4.9.x prepares data sets only with `importlib_resources`, which it forgets to require (tfds#11212)."""
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        raise DataConfigError(
            "Preparing a tfds data set needs the package importlib_resources, which tensorflow-datasets uses "
            "without declaring it: pip install importlib_resources"
        ) from None


@contextlib.contextmanager
def preparing_offline(what: str, where: os.PathLike | str) -> Iterator[None]:
    """While one of our offline builders prepares `what` in `where`: tfds prints "Downloading and preparing
    dataset ..." and "... downloaded and prepared" to stdout for every builder, including ours, which download
    nothing (dataset_builder._log_download_bytes), and progress bars to stderr. A log line that says what happens
    replaces them."""
    logging.info("Preparing %s in %s (once, offline: later runs read it from there).", what, where)
    # tfds's progress bars (stderr) name its temporary files and flicker for the seconds this takes: off meanwhile.
    shown = getattr(tfds.core.utils.tqdm_utils, "_active", True)  # tfds keeps it in a module global
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(shown)


def _build(folder: Located, work: Path, bad_files: str) -> None:
    scan = scan_image_folder(folder, bad_files)
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=scan.class_names),
            "file_name": tfds.features.Text(),  # <split>/<class>/<file>, relative to ROOT
        }
    )
    generators = {split: _examples(files, folder, bad_files, scan.skipped) for split, files in scan.splits.items()}
    with preparing_offline(f"the image folder {folder.source}", work.parent.parent):
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            name=_TFDS_NAME,
            version="1.0.0",
            features=features,
            split_datasets=generators,
            data_dir=work / "tfds",
            description=f"Image folder {folder.source}",
        )
    label_map = {
        "source": str(folder.source),
        "class_names": scan.class_names,
        "label_map": {name: index for index, name in enumerate(scan.class_names)},
        "num_examples": {split: info.num_examples for split, info in builder.info.splits.items()},
        "num_skipped": len(scan.skipped),
        "skipped_files": scan.skipped[:_MAX_LISTED_SKIPS],
        "tfds_dir": Path(builder.data_dir).relative_to(work).as_posix(),
    }
    shutil.rmtree(work / "tfds" / "downloads", ignore_errors=True)  # empty folders tfds makes, nothing to download
    if scan.skipped:
        logging.warning("Skipped %d files that are not decodable images, e.g. %s", len(scan.skipped), scan.skipped[:5])
    (work / LABEL_MAP).write_text(json.dumps(label_map, indent=1))


def _examples(
    files: list[tuple[Path, str]], folder: Located, bad_files: str, skipped: list[str]
) -> Iterator[tuple[str, dict]]:
    """Yields tfds examples holding each file's bytes unchanged, for the files the pipeline can decode.

    A class folder of the split left with no decodable image is an error, as an empty class folder is.
    """
    kept = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="qkv_vit_decode_check") as pool:
        for start in range(0, len(files), _DECODE_CHUNK):
            chunk = files[start : start + _DECODE_CHUNK]
            for (file, class_name), (data, readable) in zip(chunk, pool.map(_read_checked, [f for f, _ in chunk])):
                if not readable:
                    reject(file, folder, bad_files, skipped, "not an image the input pipeline can decode")
                    continue
                kept[file.parent] += 1
                relative = file.relative_to(folder.root).as_posix()
                yield relative, {"image": data, "label": class_name, "file_name": relative}
    for class_dir in sorted({file.parent for file, _ in files} - set(kept)):
        raise DataConfigError(
            f"Class folder {folder.shown(class_dir)} holds no image the input pipeline can decode "
            "(every file was skipped): remove it or replace its files."
        )


def _read_checked(file: Path) -> tuple[bytes, bool]:
    """(the file's bytes, whether the pipeline's decoder reads the whole image): a full decode, because a cut
    JPEG's header and first rows read fine (PIL's verify() passes it) and its crop may fail only mid-run."""
    data = file.read_bytes()
    try:
        image = augment.decode(tf.constant(data))  # eager TF ops release the GIL: the pool decodes in parallel
    except tf.errors.OpError:  # InvalidArgumentError for truncated, corrupt or unsupported data
        return data, False
    return data, bool(image.shape[0] and image.shape[1])


def _load(entry: Path) -> PreparedFolder:
    label_map = json.loads((entry / LABEL_MAP).read_text())
    return PreparedFolder(
        tfds_dir=entry / label_map["tfds_dir"],
        class_names=label_map["class_names"],
        num_examples=label_map["num_examples"],
        num_skipped=label_map["num_skipped"],
        skipped_files=label_map["skipped_files"],
        label_map_file=entry / LABEL_MAP,
    )
