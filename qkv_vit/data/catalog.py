"""The tfds data sets the paper and the transfer configs use: their default splits, class counts and split sizes.

The sizes let a run be planned (qkv_vit.plan: its steps per epoch, hence its length and cost) where the data are
not at hand and TensorFlow is not installed; a run that trains reads them from the data set itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qkv_vit.data.errors import DataConfigError


@dataclasses.dataclass(frozen=True)
class KnownDataset:
    train_split: str
    eval_split: str
    num_classes: int
    split_sizes: dict[str, int]  # examples per split, as tfds' dataset_info records them


TFDS_DATASETS = {
    "imagenet2012": KnownDataset("train", "validation", 1000, {"train": 1_281_167, "validation": 50_000}),
    # ImageNet's validation images with ReaL's label sets (evaluation only: it has no train split).
    "imagenet2012_real": KnownDataset("validation", "validation", 1000, {"validation": 50_000}),
    "cifar10": KnownDataset("train", "test", 10, {"train": 50_000, "test": 10_000}),
    "cifar100": KnownDataset("train", "test", 100, {"train": 50_000, "test": 10_000}),
    "stl10": KnownDataset("train", "test", 10, {"train": 5_000, "test": 8_000, "unlabelled": 100_000}),
    "cars196": KnownDataset("train", "test", 196, {"train": 8_144, "test": 8_041}),
}


def known_examples(data_config: Any, kind: str) -> int | None:
    """The size of config.data's "train" or "eval" split from TFDS_DATASETS, without reading the data; None where
    the table cannot say (another source or data set, a split such as "train[:90%]")."""
    known = TFDS_DATASETS.get(data_config.name) if data_config.source == "tfds" else None
    if known is None:
        return None
    split = (
        data_config.train_split or known.train_split if kind == "train" else data_config.eval_split or known.eval_split
    )
    return known.split_sizes.get(split)


def known_num_classes(data_config: Any) -> int | None:
    """config.data's class count: its num_classes if set, else TFDS_DATASETS' (None where neither says)."""
    known = TFDS_DATASETS.get(data_config.name) if data_config.source == "tfds" else None
    return data_config.num_classes or (known.num_classes if known else None)


def known_train_examples(data_config: Any) -> int:
    """known_examples(data_config, "train"); DataConfigError where the table cannot say."""
    examples = known_examples(data_config, "train")
    if examples is None:
        split = data_config.train_split or "its default train split"
        raise DataConfigError(
            f"The size of {data_config.source} data set {data_config.name!r} ({split}) is not in "
            f"qkv_vit/data/catalog.py, which knows the tfds splits "
            f"{ {name: list(known.split_sizes) for name, known in TFDS_DATASETS.items()} }; set config.total_steps "
            "and config.optimizer.warmup_steps so that the run's length needs no data."
        )
    return examples
