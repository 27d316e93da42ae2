"""Prepare a tfds data set once, through tfds's own builder API; optionally also as an image folder.

    python -m qkv_vit.data.prepare cifar10 --data_dir /data/tfds
    python -m qkv_vit.data.prepare cifar10 --image_folder data/cifar10     # what configs/cifar10.py reads
    python -m qkv_vit.data.prepare imagenet2012 --data_dir /data/tfds --manual_dir /data/tfds/downloads/manual

The same as `tfds build NAME --data_dir DIR [--manual_dir DIR]`, which in tensorflow-datasets 4.9.x fails to start
without apache-beam (its command line imports a Beam converter whatever it builds); the builders themselves need
no Beam. Data sets with downloads need a network; ImageNet's tars must be in --manual_dir. --data_dir defaults
to tfds's own (TFDS_DATA_DIR, else ~/tensorflow_datasets). --image_folder DIR then writes every split as
DIR/<split>/<class>/<index>.png (lossless; PNG keeps the pixels of tfds's arrays), the layout the image-folder
source and the in-memory pipeline read without TensorFlow: CIFAR-10 (60,000 images) takes about a minute. It
is written beside DIR and renamed into place when whole, so a DIR that exists is complete and is kept. Errors
are one `error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from qkv_vit.data import digits  # noqa: F401  (registers sklearn_digits, the offline data set, by name)
from qkv_vit.errors import one_line

# What to do when preparing fails, by the kind of error (see prepare).
PREPARE_FIXES = {
    ValueError: "check the name against tfds's catalogue (e.g. cifar10, imagenet2012, sklearn_digits)",
    AssertionError: "put the files it names in --manual_dir, then rerun",
    OSError: "check the network and that --data_dir is writable with free space, then rerun",
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="tfds data set name, e.g. cifar10, imagenet2012, sklearn_digits")
    parser.add_argument("--data_dir", help="where tfds data sets live (config.data.data_dir; default: tfds's)")
    parser.add_argument("--manual_dir", help="files a data set cannot download (ImageNet's tars)")
    parser.add_argument("--image_folder", help="also write every split here as <split>/<class>/<index>.png")
    return parser.parse_args(argv)


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Build tfds data set `name` in data_dir unless it is already there; returns its builder.
    Raises tfds's DatasetNotFoundError (a ValueError) for an unknown name, AssertionError for missing manual files,
    OSError when a download or a write fails."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def write_image_folder(builder: tfds.core.DatasetBuilder, folder: str | Path) -> dict[str, int]:
    """Every split of a prepared image-classification data set ("image" and "label" features) as
    FOLDER/<split>/<class name>/<index>.png; returns the images written per split. Written into FOLDER.partial
    first and renamed when whole; an existing FOLDER is kept as it is ({} returned)."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if folder.exists():
        return {}
    names = class_names(builder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an earlier attempt, cut short
    counts = {}
    for split in builder.info.splits:
        for index, example in enumerate(tfds.as_numpy(builder.as_dataset(split=split))):
            image = example["image"]
            target = partial / split / names[example["label"]] / f"{index:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(target)
            counts[split] = index + 1
    if not counts:
        raise ValueError(f"{builder.name} has no examples to write: prepare it again, or choose another data set.")
    partial.rename(folder)
    return counts


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    """The class names of an image-classification data set; ValueError where it is not one (an "image", a class
    "label")."""
    features = builder.info.features
    label, image = (features[key] if key in features else None for key in ("label", "image"))
    if not isinstance(label, tfds.features.ClassLabel) or not isinstance(image, tfds.features.Image):
        raise ValueError(
            f"{builder.name} is not an image-classification data set (an 'image' and a class 'label' feature): "
            "use --image_folder only for such data sets, or leave it out."
        )
    return label.names


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    where = args.data_dir or "tfds's default data_dir"
    try:
        builder = prepare(args.name, args.data_dir, args.manual_dir)
    except (ValueError, AssertionError, OSError) as error:  # the user's to fix (see prepare); anything else is a bug
        reason = one_line(str(error).split("\n")[0] if isinstance(error, ValueError) else str(error))
        fix = PREPARE_FIXES[next(kind for kind in PREPARE_FIXES if isinstance(error, kind))]
        print(f"error: preparing {args.name!r} in {where} failed: {reason.rstrip('.')}; {fix}.", file=sys.stderr)
        return 2
    setting = f": set config.data.data_dir={args.data_dir}" if args.data_dir else " (tfds's default data_dir)"
    print(f"{args.name} is prepared in {builder.data_dir}{setting}")
    if args.image_folder:
        try:
            counts = write_image_folder(builder, args.image_folder)
        except (ValueError, OSError) as error:  # not images with class labels, or the folder cannot be written
            print(
                f"error: writing {args.name} as images to {args.image_folder} failed: {error}; give --image_folder a "
                "writable place with free space, for a data set with 'image' and 'label' features.",
                file=sys.stderr,
            )
            return 2
        written = ", ".join(f"{split} {count:,}" for split, count in counts.items())
        done = f"{written} images written" if counts else "already there, kept (delete it to write it again)"
        print(f"{args.image_folder}: {done}; give it as data.path (configs/cifar10.py: path={args.image_folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
