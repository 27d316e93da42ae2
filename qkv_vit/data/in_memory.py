"""Data sets that fit in memory (CIFAR-10/100, STL-10, the digits, image folders up to MAX_BYTES), decoded once
into uint8 arrays without TensorFlow, and served as batches of those arrays.

`data.pipeline = "in_memory"` serves `data.source = "image_folder"` (`data.path`: an image folder or tar) or
"digits" (the offline digits) this way. The first run decodes every image with PIL (in threads), resizes it as the eval pipeline
does (short side to image_size / crop_pct, bicubic, centre crop to image_size; an image already of that size
is kept pixel for pixel) and caches the arrays in `<cache_dir>/in_memory/<key>/` (one .npy file per array, their
sizes recorded: an entry cut short later is decoded again, `qkv_vit.data.cache`); later runs map those files into
memory, so that several processes on one host (one per GPU) share one copy.

The host does no per-image work at all: a train batch is a gather of rows, in an order drawn per epoch from the
seed (the same permutation on every process; process p takes the p-th slice of each global batch, so processes
read disjoint parts and together every example of the epoch). The train step crops and flips on the device
(`qkv_vit.train.finishing`), from stateless keys, so resume stays exact. Crop: random-resized-crop over the
stored image (`augment.crop_scale`, `crop_aspect`) or pad-and-crop (`augment.crop_padding`); flip:
`augment.flip_prob`. RandAugment, colour jitter and repeated augmentation run only in the tf.data pipelines:
they are refused here. Where the train split lives, the host or every device, is `data.placement`
(`qkv_vit.train.device_data`); either way the batches are the same.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import ml_collections
import numpy as np

from qkv_vit.data import cache
from qkv_vit.data.config import validate_config
from qkv_vit.data.errors import DataConfigError, batch_too_large
from qkv_vit.data.folders import (
    HELD_OUT_SPLIT_NAMES,
    TRAIN_SPLIT_NAMES,
    Located,
    checked_path,
    extract,
    find_split,
    folder_key,
    no_held_out_split_message,
    reject,
    scan_image_folder,
    tar_key,
)
from qkv_vit.data.info import DatasetInfo, SkippedFiles, check_num_classes
from qkv_vit.data.protocol import Batch, DataSource, Stream

MAX_BYTES = 16 << 30  # decoded arrays larger than this belong in a streaming source (image_folder, tfds)
DIGITS_TEST_EVERY = 5  # the offline digits: every 5th image is held out (1,437 train / 360 test)
_FORMAT_VERSION = 2  # bumped when the cached arrays would change (2: .npy files, memory-mapped; 1: one .npz)
_META = "meta.json"


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int32


@dataclasses.dataclass(frozen=True)
class ArraySource(DataSource):
    """A DataSource holding its splits as arrays decoded once: a train batch is a gather of rows, on the host
    (train_batches) or, from `train_rows`, on devices that hold `train_arrays` (qkv_vit.train.device_data). An
    epoch is the whole global batches of the train split (the remainder is left out each epoch)."""

    splits: dict[str, ArraySplit]
    info: DatasetInfo
    crops_on_device: ClassVar[bool] = True  # the host does no per-image work

    @property
    def train_arrays(self) -> ArraySplit:
        return self.splits[self.info.train_split]

    def _steps_per_epoch(self, local_batch: int, process_count: int) -> int:
        examples, global_batch = len(self.train_arrays.labels), local_batch * process_count
        if examples < global_batch:
            raise batch_too_large(
                f"Global batch size {global_batch}", examples, f"of {self.info.description}", examples
            )
        return examples // global_batch

    def _train_rows(self, stream: Stream) -> Iterator[np.ndarray]:
        global_batch = stream.local_batch * stream.process_count
        steps = self._steps_per_epoch(stream.local_batch, stream.process_count)
        epoch, step = divmod(stream.start_step, steps)
        while True:
            order = epoch_order(stream.seed, epoch, len(self.train_arrays.labels))
            for position in range(step, steps):
                first = position * global_batch + stream.process_index * stream.local_batch
                yield order[first : first + stream.local_batch]
            epoch, step = epoch + 1, 0

    def _train_batches(self, stream: Stream) -> Iterator[Batch]:
        split = self.train_arrays
        for rows in self._train_rows(stream):
            yield {"image": split.images[rows], "label": split.labels[rows]}

    def _eval_batches(self, split: str, local_batch: int, process_index: int, process_count: int) -> ArrayEvalBatches:
        if split not in self.splits:
            raise DataConfigError(
                f"Bad split {split!r} for {self.info.description}: choose one of its splits {sorted(self.splits)}."
            )
        return ArrayEvalBatches(self.splits[split], local_batch, process_index, process_count)


def open_in_memory(config: ml_collections.ConfigDict) -> ArraySource:
    """config.data's image folder, archive or digits as arrays (decoded now, or loaded from the cache); DataConfigError
    with the fix."""
    validate_config(config)
    check_device_augmentation(config)
    if config.source == "image_folder":
        cache_dir = cache.cache_dir_of(config.cache_dir)
        splits, class_names, skipped = _folder_arrays(Path(config.path).expanduser(), cache_dir, config)
        description = f"image folder {config.path} (in memory)"
    else:  # validate_config allows the digits besides
        splits, class_names, skipped = _digits_arrays(config.image_size), [str(d) for d in range(10)], None
        description = "the offline digits data set (in memory)"
    for split in (config.train_split, config.eval_split):
        if split is not None and split not in splits:
            raise DataConfigError(
                f"Split {split!r} is not one of {description}'s splits {sorted(splits)}: choose one of them (a "
                "whole split), or set pipeline='tf_data' for sub-splits such as 'train[:90%]'."
            )
    train_split = config.train_split or find_split(list(splits), TRAIN_SPLIT_NAMES) or "train"
    eval_split = config.eval_split or find_split(list(splits), HELD_OUT_SPLIT_NAMES)
    if eval_split is None:
        raise DataConfigError(no_held_out_split_message(description, sorted(splits)))
    if train_split not in splits:
        raise DataConfigError(
            f"{description} has no train split: its splits are {sorted(splits)}; set data.train_split to one of them."
        )
    check_num_classes(config.num_classes, class_names, description)
    others = [split for split in splits if split not in (train_split, eval_split)]
    info = DatasetInfo(
        description,
        train_split,
        eval_split,
        len(splits[train_split].labels),
        len(splits[eval_split].labels),
        config.num_classes or len(class_names),
        class_names,
        others,
        len(splits[train_split].labels) if train_split == eval_split else 0,
        skipped,
    )
    return ArraySource(splits, info)


def check_device_augmentation(config: ml_collections.ConfigDict) -> None:
    """The in-memory pipeline's train augmentation is what the device does: refuse what only tf.data does."""
    augment = config.augment
    host_only = {
        "augment.randaugment_layers": augment.randaugment_layers,
        "augment.color_jitter": augment.color_jitter,
        "repeated_augmentation": config.repeated_augmentation - 1,
    }
    set_keys = [key for key, value in host_only.items() if value]
    if set_keys:
        raise DataConfigError(
            f"pipeline='in_memory' crops, flips, erases and mixes on the device; {', '.join(set_keys)} run only in "
            "the tf.data pipelines. Set them off (randaugment_layers=0, color_jitter=0, repeated_augmentation=1) "
            "or use pipeline='tf_data'."
        )


# ---- decoding once, with a cache ----


def _folder_arrays(
    path: Path, cache_dir: Path, config: ml_collections.ConfigDict
) -> tuple[dict[str, ArraySplit], list[str], SkippedFiles | None]:
    path, is_tar = checked_path(path)
    key = tar_key(path) if is_tar else folder_key(path)
    entry = cache_dir / "in_memory" / f"{key}-{config.image_size}-{config.crop_pct:g}-v{_FORMAT_VERSION}"
    if not cache.whole(entry, _META, f"decoding {path}", _unreadable):
        _decode_folder(path, is_tar, entry, config)
    return _load(entry, config.bad_files, path)


def _unreadable(entry: Path) -> str | None:
    """Why the entry's arrays cannot be opened (entries made before sizes were recorded are checked this way)."""
    try:
        _read(entry)
    except (OSError, ValueError, KeyError, EOFError) as error:  # e.g. "mmap length is greater than file size"
        return str(error)
    return None


def _decode_folder(path: Path, is_tar: bool, entry: Path, config: ml_collections.ConfigDict) -> None:
    """Decode every image of the folder into the cache directory `entry`, written whole or not at all."""
    with cache.building(entry, f"decoding {path}") as work:
        folder = extract(path, work / "extracted") if is_tar else Located(root=path, source=path)
        scan = scan_image_folder(folder, config.bad_files)
        bytes_needed = sum(len(files) for files in scan.splits.values()) * config.image_size**2 * 3
        if bytes_needed > MAX_BYTES:
            raise DataConfigError(
                f"{path} would take {bytes_needed / 2**30:.1f} GiB decoded at {config.image_size}x{config.image_size}, "
                f"more than pipeline='in_memory' holds ({MAX_BYTES / 2**30:.0f} GiB): use pipeline='tf_data'."
            )
        written = work / "entry"
        written.mkdir()
        for split, files in scan.splits.items():
            images, labels = _decode_split(files, folder, scan, config)
            np.save(written / f"{split}.images.npy", images)
            np.save(written / f"{split}.labels.npy", labels)
        if scan.skipped:  # a readable list beside the arrays, which the run's warning points at
            skipped_list(written).write_text("\n".join(scan.skipped) + "\n")
        meta = {"class_names": scan.class_names, "skipped": scan.skipped, "splits": sorted(scan.splits)}
        (written / _META).write_text(json.dumps(meta))
        cache.seal(written)
        cache.move_into_place(written, entry, _META)


def _decode_split(
    files: list[tuple[Path, str]], folder: Located, scan, config: ml_collections.ConfigDict
) -> tuple[np.ndarray, np.ndarray]:
    label_of = {name: index for index, name in enumerate(scan.class_names)}
    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="qkv_vit_decode") as pool:  # PIL frees the GIL
        decoded = list(pool.map(lambda item: decode(item[0], config.image_size, config.crop_pct), files))
    kept = [(image, label_of[name]) for image, (file, name) in zip(decoded, files) if image is not None]
    for image, (file, _) in zip(decoded, files):
        if image is None:
            reject(file, folder, config.bad_files, scan.skipped, "not an image PIL can decode")
    if not kept:
        raise DataConfigError(
            f"No image of {folder.shown(files[0][0].parent.parent)} could be decoded: replace its files with "
            "JPEG or PNG images."
        )
    return np.stack([image for image, _ in kept]), np.asarray([label for _, label in kept], np.int32)


def decode(file: Path, image_size: int, crop_pct: float = 1.0) -> np.ndarray | None:
    """The whole image as (image_size, image_size, 3) uint8, as the eval pipeline sizes it: short side to
    floor(image_size / crop_pct) (bicubic, antialiased), centre crop; None if PIL cannot decode all of it."""
    import PIL.Image

    try:
        with PIL.Image.open(file) as opened:
            image = opened.convert("RGB")  # decodes every row: a truncated file raises here
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        return None
    return resize_and_crop(image, image_size, crop_pct)


def resize_and_crop(image, image_size: int, crop_pct: float = 1.0) -> np.ndarray:
    """PIL image -> (image_size, image_size, 3) uint8: short side to floor(image_size / crop_pct), centre crop."""
    import PIL.Image

    short = math.floor(image_size / crop_pct)
    width, height = image.size
    if min(width, height) != short:
        scale = short / min(width, height)
        image = image.resize((max(short, round(width * scale)), max(short, round(height * scale))), PIL.Image.BICUBIC)
        width, height = image.size
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)


def _load(entry: Path, bad_files: str, path: Path) -> tuple[dict[str, ArraySplit], list[str], SkippedFiles | None]:
    splits, meta = _read(entry)
    skipped = meta["skipped"]
    if skipped and bad_files == "error":
        raise DataConfigError(
            f"{path}: {skipped[0]} is not an image PIL can decode ({len(skipped)} such files were skipped when the "
            f"folder was decoded into {entry}). Remove them, or set bad_files='skip'."
        )
    return (
        splits,
        meta["class_names"],
        SkippedFiles(len(skipped), skipped[:5], skipped_list(entry)) if skipped else None,
    )


def _read(entry: Path) -> tuple[dict[str, ArraySplit], dict]:
    """The arrays and record of one cache entry, read-only. The images are memory-mapped: pages are read on first
    use and held by the OS's page cache, which every process on the host shares, so 8 processes (one per GPU) hold
    one copy, not 8."""
    meta = json.loads((entry / _META).read_text())
    splits = {
        split: _read_only(
            ArraySplit(np.load(entry / f"{split}.images.npy", mmap_mode="r"), np.load(entry / f"{split}.labels.npy"))
        )
        for split in meta["splits"]
    }
    return splits, meta


def _read_only(split: ArraySplit) -> ArraySplit:
    split.images.setflags(write=False)
    split.labels.setflags(write=False)
    return split


def skipped_list(entry: Path) -> Path:
    """The text file that lists the files a decoding skipped, one per line."""
    return entry / "skipped.txt"


def _digits_arrays(image_size: int) -> dict[str, ArraySplit]:
    """scikit-learn's digits (0..16 counts spread over 0..255, grey to RGB), resized to image_size, read-only."""
    import PIL.Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([resize_and_crop(PIL.Image.fromarray(g).convert("RGB"), image_size) for g in grey])
    test = np.arange(len(grey)) % DIGITS_TEST_EVERY == 0
    labels = digits.target.astype(np.int32)
    return {
        "train": _read_only(ArraySplit(images[~test], labels[~test])),
        "test": _read_only(ArraySplit(images[test], labels[test])),
    }


# ---- batches ----


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The train split's order in `epoch`: a permutation drawn from (seed, epoch), the same on every process."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class ArrayEvalBatches:
    """Eval batches of one process: re-iterable, each pass covers its part of the split once, padded so that
    every process runs the same number of batches (`mask` 0 on padding)."""

    def __init__(self, split: ArraySplit, local_batch: int, process_index: int, process_count: int):
        parts = np.array_split(np.arange(len(split.labels)), process_count)
        self.split, self.rows, self.local_batch = split, parts[process_index], local_batch
        self.num_batches = math.ceil(max(len(part) for part in parts) / local_batch)
        self.num_examples = len(self.rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        size = self.split.images.shape[1:]
        for index in range(self.num_batches):
            rows = self.rows[index * self.local_batch : (index + 1) * self.local_batch]
            pad = self.local_batch - len(rows)
            yield {
                "image": np.concatenate([self.split.images[rows], np.zeros((pad, *size), np.uint8)]),
                "label": np.concatenate([self.split.labels[rows], np.zeros(pad, np.int32)]),
                "mask": np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)]),
            }

    def __len__(self) -> int:
        return self.num_batches
