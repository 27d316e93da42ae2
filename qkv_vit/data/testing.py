"""Tiny image folders for tests: every image is one flat colour that encodes a unique example id.

`write_image_folder(root, {"train": {"cat": 3, "dog": 2}})` writes ROOT/train/cat/0000.png ...; the id
of an image is recoverable after resizing and normalization with `ids_from_images`, which lets tests
check that sharding and evaluation cover every example exactly once.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from qkv_vit.data.config import IMAGENET_MEAN, IMAGENET_STD


def id_colour(example_id: int) -> tuple[int, int, int]:
    return example_id % 256, example_id // 256 % 256, 200


def write_image_folder(
    root: str | Path,
    splits: Mapping[str, Mapping[str, int]],
    size: tuple[int, int] = (12, 10),
    image_format: str = "png",
) -> dict[str, int]:
    """Writes ROOT/<split>/<class>/<n>.<format>; returns {"<split>/<class>/<file>": example id}."""
    root, ids, next_id = Path(root), {}, 0
    for split, classes in splits.items():
        for class_name, count in classes.items():
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                image = np.zeros((size[0], size[1], 3), np.uint8) + np.array(id_colour(next_id), np.uint8)
                name = f"{n:04d}.{image_format}"
                PIL.Image.fromarray(image).save(folder / name)
                ids[f"{split}/{class_name}/{name}"] = next_id
                next_id += 1
    return ids


def write_tar(folder: str | Path, archive: str | Path, top: str = "images") -> Path:
    """Packs `folder` as <top>/... into a .tar or .tar.gz (the usual one-folder-inside layout)."""
    archive = Path(archive)
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        tar.add(folder, arcname=top)
    return archive


def ids_from_images(
    images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Inverse of id_colour for flat images (B,H,W,3), uint8 or normalized float: the example id of each."""
    centre = images[:, images.shape[1] // 2, images.shape[2] // 2]
    pixels = (
        centre.astype(np.int64) if images.dtype == np.uint8 else np.round((centre * std + mean) * 255).astype(np.int64)
    )
    return pixels[:, 0] + 256 * pixels[:, 1]
