"""What a configured data set holds, as every source reports it (no TensorFlow needed to read it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


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
