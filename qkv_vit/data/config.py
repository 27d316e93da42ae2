"""The data part of a training config (`config.data`): sources, presets and the rules for every field.

Start from `get_config()` and override fields, e.g.

    data = get_config("xcit", source="tfds", name="imagenet2012")
    data.data_dir = "/big/disk/tensorflow_datasets"
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath

import ml_collections
from ml_collections import config_dict

from qkv_vit import config_rules as rules
from qkv_vit.data.errors import DataConfigError

SOURCES = ("digits", "tfds", "image_folder")  # where the data come from
# How batches are made: "tf_data" streams them on the host (qkv_vit.data.pipeline), "in_memory" gathers them from
# arrays decoded once, without TensorFlow (qkv_vit.data.in_memory: image folders, archives and the digits).
PIPELINES = ("tf_data", "in_memory")
PLACEMENTS = ("auto", "device", "host")  # where pipeline="in_memory" holds the train split (qkv_vit.train.device_data)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def augment_config(preset: str = "xcit") -> ml_collections.ConfigDict:
    """Every magnitude and probability of the train augmentation, for a named preset.

    Presets: "xcit" (XCiT's ImageNet recipe at 224), "transfer" (XCiT/DeiT fine-tuning: as xcit
    without random erasing), "small" (a lighter recipe for 32x32 images such as CIFAR), "none"
    (resize only: no randomness at all, for smoke tests).
    """
    xcit = dict(
        # Random-resized-crop: area fraction and aspect ratio ranges (torchvision/timm defaults).
        crop_scale=(0.08, 1.0),
        crop_aspect=(3 / 4, 4 / 3),
        # Pad-and-crop instead (torchvision's RandomCrop(size, padding=crop_padding), CIFAR's classic): zero
        # padding on every side, then a uniformly placed crop of the original size; 0: off.
        crop_padding=0,
        flip_prob=0.5,
        # RandAugment "rand-m9-mstd0.5-inc1": 2 ops from timm's increasing-severity set, each
        # applied with probability 0.5 at magnitude N(9, 0.5) clipped to [0, 10].
        randaugment_layers=2,
        randaugment_magnitude=9.0,
        randaugment_magnitude_std=0.5,
        randaugment_magnitude_max=10.0,
        randaugment_prob=0.5,
        # XCiT passes --color-jitter 0.4, but timm applies color jitter only when RandAugment is
        # off, so the reference trains without it; 0.0 reproduces that. Set 0.4 to add it anyway.
        color_jitter=0.0,
        # Random erasing after normalization: one box, area 2%-33%, aspect 0.3-3.3, N(0,1) pixels.
        erasing_prob=0.25,
        erasing_mode="pixel",
        erasing_area=(0.02, 1 / 3),
        erasing_aspect_min=0.3,
        # Mixup / cutmix per batch (timm "batch" mode) with label smoothing folded in.
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        mix_prob=1.0,
        mix_switch_prob=0.5,
        label_smoothing=0.1,
    )
    presets = {
        "xcit": xcit,
        "transfer": dict(xcit, erasing_prob=0.0),
        "small": dict(
            xcit,
            crop_scale=(0.35, 1.0),
            randaugment_magnitude=5.0,
            erasing_prob=0.1,
            mixup_alpha=0.2,
            cutmix_alpha=0.0,
        ),
        "none": dict(
            xcit,
            crop_scale=(1.0, 1.0),
            crop_aspect=(1.0, 1.0),
            flip_prob=0.0,
            randaugment_layers=0,
            erasing_prob=0.0,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            label_smoothing=0.0,
        ),
    }
    if preset not in presets:
        raise DataConfigError(f"Unknown augmentation preset {preset!r}; choose one of {sorted(presets)}.")
    return ml_collections.ConfigDict(presets[preset])


# Image size and repeated augmentation that go with each preset.
_PRESET_SIZES = {"xcit": (224, 3), "transfer": (224, 1), "small": (32, 1), "none": (32, 1)}


def get_config(
    preset: str = "small", source: str = "digits", name: str = "", pipeline: str = "tf_data"
) -> ml_collections.ConfigDict:
    """A complete data config: the offline digits through tf.data with the "small" preset unless told otherwise."""
    augment = augment_config(preset)
    image_size, repeats = _PRESET_SIZES[preset]
    return ml_collections.ConfigDict(
        dict(
            source=source,  # "digits" (offline default), "tfds" or "image_folder" (path)
            pipeline=pipeline,  # "tf_data", or "in_memory" (image_folder or digits decoded once into arrays)
            name=name,  # tfds data set name for source="tfds", e.g. "imagenet2012", "cifar10"
            data_dir=config_dict.placeholder(str),  # tfds data_dir; None: tfds's default (~/tensorflow_datasets)
            path=config_dict.placeholder(str),  # image_folder: ROOT/<split>/<class>/*.jpg, or a tar of one
            cache_dir=config_dict.placeholder(str),  # prepared digits / image folders; None: ~/.cache/qkv_vit
            train_split=config_dict.placeholder(str),  # None: the source's usual train split
            eval_split=config_dict.placeholder(str),  # None: the source's usual eval split
            num_classes=config_dict.placeholder(int),  # None: from the data set
            image_size=image_size,
            crop_pct=1.0,  # eval: resize the short side to image_size / crop_pct, center-crop (timm's crop_pct; XCiT: 1.0)
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            augment=augment,
            repeated_augmentation=repeats,  # each image this many times per epoch (1: off)
            shuffle_buffer=10_000,  # examples (encoded bytes, before decoding)
            num_parallel_calls=-1,  # -1: tf.data AUTOTUNE
            prefetch=2,  # batches
            bad_files="skip",  # image_folder: a file that is not an image is "skip"ped and counted, or an "error"
            placement="auto",  # pipeline in_memory: the train split on the "device"s or the "host"; "auto": on them if it fits
        )
    )


TUPLE_HINT = 'On the command line write a tuple in quotes, e.g. --config.data.augment.crop_scale="(0.08, 1.0)".'
SCALE_HINT = "Images are scaled to [0, 1] before normalizing: ImageNet's are mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)."

AUGMENT_RULES = {
    "crop_scale": rules.numbers(
        2, 0.0, 1.0, low_open=True, ordered=True, what="(min, max) of the area fraction", hint=TUPLE_HINT
    ),
    "crop_aspect": rules.numbers(
        2, 0.0, low_open=True, ordered=True, what="(min, max) of the aspect ratio", hint=TUPLE_HINT
    ),
    "crop_padding": rules.integer(0),
    "flip_prob": rules.probability(),
    "randaugment_layers": rules.integer(0),
    "randaugment_magnitude": rules.number(0.0),
    "randaugment_magnitude_std": rules.number(0.0),
    "randaugment_magnitude_max": rules.number(0.0, low_open=True),  # magnitudes are divided by it
    "randaugment_prob": rules.probability(),
    "color_jitter": rules.number(0.0),
    "erasing_prob": rules.probability(),
    "erasing_mode": rules.text(("pixel", "const")),
    "erasing_area": rules.numbers(
        2, 0.0, 1.0, low_open=True, ordered=True, what="(min, max) of the area fraction", hint=TUPLE_HINT
    ),
    "erasing_aspect_min": rules.number(0.0, 1.0, low_open=True),  # aspect ratios in [min, 1/min]
    "mixup_alpha": rules.number(0.0),
    "cutmix_alpha": rules.number(0.0),
    "mix_prob": rules.probability(),
    "mix_switch_prob": rules.probability(),
    "label_smoothing": rules.probability(),
}

DATA_RULES = {
    "source": dataclasses.replace(
        rules.text(SOURCES),
        hint='It says where the data come from; how batches are made is pipeline ("tf_data", or "in_memory" for an '
        "image_folder or the digits decoded once into arrays).",
    ),
    "pipeline": rules.text(PIPELINES),
    "name": rules.text(),
    "data_dir": rules.text(nonempty=True, optional=True),
    "path": rules.text(nonempty=True, optional=True),
    "cache_dir": rules.text(nonempty=True, optional=True),
    "train_split": rules.text(nonempty=True, optional=True),
    "eval_split": rules.text(nonempty=True, optional=True),
    "num_classes": rules.integer(1, optional=True),
    "image_size": rules.integer(1),
    "crop_pct": rules.number(0.1, 1.0),  # eval images are resized to image_size / crop_pct first
    "mean": rules.numbers(3, 0.0, 1.0, what="(red, green, blue)", hint=f"{SCALE_HINT} {TUPLE_HINT}"),
    "std": rules.numbers(3, 0.0, 1.0, low_open=True, what="(red, green, blue)", hint=f"{SCALE_HINT} {TUPLE_HINT}"),
    "augment": AUGMENT_RULES,
    "repeated_augmentation": rules.integer(1),
    "shuffle_buffer": rules.integer(0),
    "num_parallel_calls": rules.integer(1, or_minus_one=True),  # -1: tf.data AUTOTUNE
    "prefetch": rules.integer(0, or_minus_one=True),
    "bad_files": rules.text(("skip", "error")),
    "placement": rules.text(PLACEMENTS),
}


def validate_config(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Checks every field (type, length, range) and what each source needs, before any data is read; raises
    DataConfigError naming the first bad field (`prefix` + its key, e.g. "config.data.")."""
    rules.check_values(config, DATA_RULES, prefix, DataConfigError)
    if config.pipeline == "in_memory" and config.source == "tfds":
        raise DataConfigError(
            f'{prefix}pipeline="in_memory" decodes image folders, archives and the digits (source="image_folder" or '
            '"digits") without TensorFlow; a tfds data set is read by tf.data: set pipeline="tf_data".'
        )
    if config.source == "tfds" and not config.name:
        raise DataConfigError(
            f'source="tfds" needs a data set name: set {prefix}name, e.g. "imagenet2012" or "cifar10".'
        )
    if config.source == "image_folder" and not config.path:
        raise DataConfigError(
            f'source="image_folder" needs a path: set {prefix}path to a folder ROOT/<split>/<class>/ or a tar of one.'
        )
    augment = config.augment
    if augment.crop_padding and (tuple(augment.crop_scale) != (1.0, 1.0) or tuple(augment.crop_aspect) != (1.0, 1.0)):
        raise DataConfigError(
            f"{prefix}augment.crop_padding={augment.crop_padding} (pad-and-crop) replaces random-resized-crop: set "
            f'{prefix}augment.crop_scale="(1.0, 1.0)" and crop_aspect="(1.0, 1.0)", or crop_padding=0.'
        )
    if config.placement == "device" and config.pipeline != "in_memory":
        raise DataConfigError(
            f'{prefix}placement="device" holds an in-memory data set on the devices (tf.data streams from the host): '
            f'set {prefix}pipeline="in_memory", or {prefix}placement="host".'
        )


def data_name(source: str, name: str, path: str | None) -> str:
    """A short name for the data a config reads: the tfds data set's name, the image folder's or archive's name
    without its suffixes, or "digits"."""
    if source == "tfds":
        return name
    if source == "image_folder" and path:
        return PurePath(path).name.split(".")[0]
    return source
