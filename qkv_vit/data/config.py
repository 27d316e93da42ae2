"""The data part of a training config (`config.data`): sources, presets and their validation.

Start from `get_config()` and override fields, e.g.

    data = get_config("xcit", source="tfds", name="imagenet2012")
    data.data_dir = "/big/disk/tensorflow_datasets"
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from qkv_vit.data.errors import DataConfigError

SOURCES = ("digits", "tfds", "image_folder")
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
        crop_ratio=(3 / 4, 4 / 3),
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
            crop_ratio=(1.0, 1.0),
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


def get_config(preset: str = "small", source: str = "digits", name: str = "") -> ml_collections.ConfigDict:
    """A complete data config: the offline digits source with the "small" preset unless told otherwise."""
    augment = augment_config(preset)
    image_size, repeats = _PRESET_SIZES[preset]
    return ml_collections.ConfigDict(
        dict(
            source=source,  # "digits" (offline default), "tfds" or "image_folder"
            name=name,  # tfds data set name for source="tfds", e.g. "imagenet2012", "cifar10"
            data_dir=config_dict.placeholder(str),  # tfds data_dir; None: tfds's default (~/tensorflow_datasets)
            path=config_dict.placeholder(str),  # image_folder: ROOT/<split>/<class>/*.jpg, or a .tar/.tar.gz of one
            cache_dir=config_dict.placeholder(str),  # prepared digits / image folders; None: ~/.cache/qkv_vit
            train_split=config_dict.placeholder(str),  # None: the source's usual train split
            eval_split=config_dict.placeholder(str),  # None: the source's usual eval split
            num_classes=config_dict.placeholder(int),  # None: from the data set
            image_size=image_size,
            crop_ratio=1.0,  # eval: resize the short side to image_size / crop_ratio, center-crop (XCiT: 1.0)
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            augment=augment,
            repeated_augmentation=repeats,  # each image this many times per epoch (1: off)
            shuffle_buffer=10_000,  # examples (encoded bytes, before decoding)
            num_parallel_calls=-1,  # -1: tf.data AUTOTUNE
            prefetch=2,  # batches
            seed=0,
            bad_files="skip",  # image_folder: a file that is not an image is "skip"ped and counted, or an "error"
        )
    )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fields that need no data; raises DataConfigError naming the first bad one."""
    if config.source not in SOURCES:
        raise DataConfigError(f"Unknown data source {config.source!r}; choose one of {list(SOURCES)}.")
    if config.source == "tfds" and not config.name:
        raise DataConfigError('source="tfds" needs config.name, e.g. "imagenet2012" or "cifar10".')
    if config.source == "image_folder" and not config.path:
        raise DataConfigError('source="image_folder" needs config.path: a folder ROOT/<split>/<class>/ or a tar of one.')
    if config.bad_files not in ("skip", "error"):
        raise DataConfigError(f'bad_files must be "skip" or "error", not {config.bad_files!r}.')
    if config.image_size < 1 or not 0 < config.crop_ratio <= 1:
        raise DataConfigError("image_size must be >= 1 and crop_ratio in (0, 1].")
    if config.repeated_augmentation < 1:
        raise DataConfigError("repeated_augmentation must be >= 1 (1 turns it off).")
    _validate_augment(config.augment)


def _validate_augment(augment: ml_collections.ConfigDict) -> None:
    probabilities = ("flip_prob", "randaugment_prob", "erasing_prob", "mix_prob", "mix_switch_prob", "label_smoothing")
    for key in probabilities:
        if not 0.0 <= augment[key] <= 1.0:
            raise DataConfigError(f"augment.{key} must be in [0, 1], not {augment[key]}.")
    low, high = augment.crop_scale
    if not 0 < low <= high <= 1:
        raise DataConfigError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, not {augment.crop_scale}.")
    if augment.erasing_mode not in ("pixel", "const"):
        raise DataConfigError(f'augment.erasing_mode must be "pixel" or "const", not {augment.erasing_mode!r}.')
    if augment.mixup_alpha < 0 or augment.cutmix_alpha < 0 or augment.color_jitter < 0:
        raise DataConfigError("augment.mixup_alpha, cutmix_alpha and color_jitter must be >= 0.")
