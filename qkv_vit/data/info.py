"""What a configured data set holds, as every source reports it (no TensorFlow needed to read it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qkv_vit.data.errors import DataConfigError


@dataclasses.dataclass(frozen=True)
class SkippedFiles:
    """Files an image folder's conversion skipped as not decodable images (data.bad_files="skip")."""

    count: int
    examples: list[str]  # the first few, relative to the folder
    listed_in: Path  # the file that lists them


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a configured data set holds and which parts a run uses."""

    description: str  # e.g. "image folder /data/pets"
    train_split: str
    eval_split: str
    train_examples: int
    eval_examples: int
    num_classes: int  # config.data.num_classes if set, else the data set's
    class_names: list[str]
    other_splits: list[str]  # present but neither trained nor evaluated on
    train_eval_overlap: int  # examples the eval split shares with the train split (e.g. eval_split="train")
    skipped_files: SkippedFiles | None


def check_num_classes(num_classes: int | None, class_names: list[str], description: str) -> None:
    """DataConfigError for a config.data.num_classes (None: the data set's) below the data set's class count."""
    if num_classes is not None and num_classes < len(class_names):
        raise DataConfigError(
            f"num_classes={num_classes} is less than the {len(class_names)} classes of {description}: set "
            f"config.data.num_classes to {len(class_names)} or more, or leave it unset to take the data set's."
        )
