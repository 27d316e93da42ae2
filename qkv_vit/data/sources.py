"""Where tf.data reads from: a prepared tfds builder plus its split names and classes.

`prepare_source(config)` turns a data config into a `PreparedSource` (validating it, and preparing the digits or
an image folder when needed); `PreparedSource.read(split)` gives a tf.data.Dataset of still-encoded images
and int32 labels, so that shuffling and skipping cost no decoding.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from qkv_vit.data import cache, digits, image_folder
from qkv_vit.data._tensorflow import tf
from qkv_vit.data.catalog import TFDS_DATASETS
from qkv_vit.data.config import validate_config
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.folders import (
    HELD_OUT_SPLIT_NAMES,
    TRAIN_SPLIT_NAMES,
    find_split,
    no_held_out_split_message,
)
from qkv_vit.data.info import DatasetInfo, SkippedFiles, check_num_classes

# Sources that do not name their splits (image folders, other tfds sets) use the first present of
# folders.TRAIN_SPLIT_NAMES and HELD_OUT_SPLIT_NAMES; without a held-out split the eval split must be asked for.


# A feature that lists every correct class of an image, read beside its label: ImageNet ReaL's relabelling
# (tfds imagenet2012_real, Beyer et al. 2020). Eval batches carry it as "label_set", padded with -1.
LABEL_SET_FEATURES = ("real_label",)
LABEL_SET_SIZE = 16  # ReaL gives at most a handful of labels per image; more is an error, never a truncation


@dataclasses.dataclass(frozen=True)
class PreparedSource:
    """A prepared data set: the tfds builder to read, the splits to use and the class names."""

    builder: tfds.core.DatasetBuilder
    train_split: str
    eval_split: str
    class_names: list[str]
    description: str
    skipped_files: SkippedFiles | None = None  # image folders: what their conversion skipped

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str | tfds.typing.SplitArg) -> int:
        return self.builder.info.splits[split].num_examples

    def check_split(self, split: str) -> None:
        """Raises DataConfigError, listing the valid names, unless `split` (e.g. "train[:10%]") exists and has
        examples."""
        try:
            examples = self.builder.info.splits[split].num_examples
        except (ValueError, KeyError) as error:
            valid = list(self.builder.info.splits.keys())
            raise DataConfigError(
                f"Bad split {split!r} for {self.description}: {error} Choose one of its splits {valid}."
            ) from None
        if not examples:
            raise DataConfigError(f"Split {split!r} of {self.description} has no examples: choose a larger part.")

    def overlap(self, first: str, second: str) -> int:
        """How many examples the splits `first` and `second` (sub-splits such as "train[:90%]" included) share."""
        splits = dict(self.builder.info.splits.items())

        def ranges(spec: str) -> list[tuple[str, int, int]]:  # (split, first index, end index); None: the split's end
            absolute = tfds.core.ReadInstruction.from_spec(spec).to_absolute(splits)
            return [
                (a.splitname, a.from_ or 0, splits[a.splitname].num_examples if a.to is None else a.to)
                for a in absolute
            ]

        return sum(
            max(0, min(a_end, b_end) - max(a_start, b_start))
            for a_name, a_start, a_end in ranges(first)
            for b_name, b_start, b_end in ranges(second)
            if a_name == b_name
        )

    def label_counts(self, split: str) -> list[int]:
        """Examples per class in `split`, reading labels only (images stay encoded)."""
        labels = self.read(split).map(lambda example: example["label"]).batch(8192)
        counts = np.zeros(self.num_classes, np.int64)
        for batch in labels.as_numpy_iterator():
            counts += np.bincount(batch[batch >= 0], minlength=self.num_classes)[: self.num_classes]  # -1: unlabelled
        return counts.tolist()

    def info(self, num_classes: int | None = None) -> DatasetInfo:
        """The data set's summary; `num_classes` (config.data.num_classes) overrides the data set's count."""
        others = [
            split for split in self.builder.info.splits.keys() if split not in (self.train_split, self.eval_split)
        ]
        return DatasetInfo(
            self.description,
            self.train_split,
            self.eval_split,
            self.num_examples(self.train_split),
            self.num_examples(self.eval_split),
            num_classes or self.num_classes,
            self.class_names,
            others,
            self.overlap(self.train_split, self.eval_split),
            self.skipped_files,
        )

    @property
    def label_set_feature(self) -> str | None:
        """The feature listing every correct class of an image (LABEL_SET_FEATURES), where the data set has one."""
        return next((name for name in LABEL_SET_FEATURES if name in self.builder.info.features), None)

    def read(
        self, split: str | tfds.typing.SplitArg, shuffle_seed: int | None = None, label_sets: bool = False
    ) -> tf.data.Dataset:
        """Examples {"image": encoded bytes, "label": int32}, and with `label_sets` (where the data set has a
        label_set_feature) "label_set": (LABEL_SET_SIZE,) int32 padded with -1; files shuffled when a seed is
        given."""
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
        dataset = self.builder.as_dataset(
            split=split,
            shuffle_files=shuffle_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=read_config,
        )
        feature = self.label_set_feature if label_sets else None

        def example_of(example: dict) -> dict:
            found = {"image": example["image"], "label": tf.cast(example["label"], tf.int32)}
            if feature is not None:
                found["label_set"] = padded_label_set(tf.cast(example[feature], tf.int32))
            return found

        return dataset.map(example_of)


def padded_label_set(labels: tf.Tensor) -> tf.Tensor:
    """(n,) labels -> (LABEL_SET_SIZE,) padded with -1; an error (not a truncation) for more than LABEL_SET_SIZE."""
    check = tf.debugging.assert_less_equal(
        tf.size(labels), LABEL_SET_SIZE, message=f"an image with more than {LABEL_SET_SIZE} correct labels"
    )
    with tf.control_dependencies([check]):
        padded = tf.pad(labels, [[0, LABEL_SET_SIZE - tf.size(labels)]], constant_values=-1)
    return tf.ensure_shape(padded, [LABEL_SET_SIZE])  # a static shape, as the padding examples have


def prepare_source(config: ml_collections.ConfigDict) -> PreparedSource:
    """Validates the config and returns the prepared source; raises DataConfigError with the fix."""
    validate_config(config)
    if config.source == "digits":
        builder = _digits_builder(config)
        source = _make_source(builder, config, "train", "test", "the offline digits data set")
    elif config.source == "tfds":
        builder = _tfds_builder(config)
        known = TFDS_DATASETS.get(config.name)
        train, evaluation = (known.train_split, known.eval_split) if known else (None, None)
        source = _make_source(builder, config, train, evaluation, f"tfds data set {config.name!r}")
    else:
        prepared = image_folder.prepare_image_folder(config.path, config.cache_dir, config.bad_files)
        builder = tfds.builder_from_directory(os.fspath(prepared.tfds_dir))
        skipped = SkippedFiles(prepared.num_skipped, prepared.skipped_files, prepared.label_map_file)
        source = _make_source(
            builder, config, None, None, f"image folder {config.path}", skipped if prepared.num_skipped else None
        )
    check_num_classes(config.num_classes, source.class_names, source.description)
    return source


def _digits_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    cache_dir = cache.cache_dir_of(config.cache_dir)
    builder = digits.SklearnDigits(data_dir=os.fspath(cache_dir / "tfds"))
    if not builder.is_prepared():
        image_folder.check_can_prepare()
        with image_folder.preparing_offline("the digits data set from scikit-learn", builder.data_dir):
            with cache.storage_errors(cache_dir, "preparing the digits data set"):
                builder.download_and_prepare()  # seconds, offline: the images come from scikit-learn
    return builder


def _tfds_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(config.name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataConfigError(
            f"Unknown tfds data set {config.name!r}: {str(error).splitlines()[0]} "
            f"Check the name; the ones qkv_vit's README covers: {sorted(TFDS_DATASETS)}."
        ) from None
    if not builder.is_prepared():
        raise DataConfigError(_not_prepared_message(config.name, config.data_dir))
    return builder


def _not_prepared_message(name: str, data_dir: str | None) -> str:
    shown_dir = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    if name == "imagenet2012":
        manual = f"{shown_dir}/downloads/manual"
        return (
            f"tfds data set 'imagenet2012' is not prepared in {shown_dir}. ImageNet cannot be downloaded "
            f"automatically: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual}/ and run\n"
            f"  python -m qkv_vit.data.prepare imagenet2012 --data_dir {shown_dir} --manual_dir {manual}\n"
            "then set config.data_dir to that directory."
        )
    return (
        f"tfds data set {name!r} is not prepared in {shown_dir}, and this code never downloads at run time. "
        f"On a machine with internet run\n  python -m qkv_vit.data.prepare {name} --data_dir {shown_dir}\n"
        f"(copy {shown_dir}/{name}/ here if this machine is offline), then set config.data_dir to that directory."
    )


def _make_source(
    builder: tfds.core.DatasetBuilder,
    config: ml_collections.ConfigDict,
    train_default: str | None,
    eval_default: str | None,
    description: str,
    skipped_files: SkippedFiles | None = None,
) -> PreparedSource:
    """The source with its splits: the config's, else the data set's own defaults, else found by name."""
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataConfigError(
            f"{description} has no 'image' and 'label' features; it is not an image classification set: choose "
            "one that is (e.g. cifar10, imagenet2012)."
        )
    available = list(builder.info.splits.keys())
    train_split = config.train_split or train_default or find_split(available, TRAIN_SPLIT_NAMES) or "train"
    eval_split = config.eval_split or eval_default or find_split(available, HELD_OUT_SPLIT_NAMES)
    if eval_split is None:
        raise DataConfigError(no_held_out_split_message(description, available))
    source = PreparedSource(builder, train_split, eval_split, list(features["label"].names), description, skipped_files)
    source.check_split(source.train_split)
    source.check_split(source.eval_split)
    return source
