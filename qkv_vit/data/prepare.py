"""Prepare a tfds data set once, through tfds's own builder API.

    python -m qkv_vit.data.prepare cifar10 --data_dir /data/tfds
    python -m qkv_vit.data.prepare imagenet2012 --data_dir /data/tfds --manual_dir /data/tfds/downloads/manual

The same as `tfds build NAME --data_dir DIR [--manual_dir DIR]`, which in tensorflow-datasets 4.9.x fails to start
without apache-beam (its command line imports a Beam converter whatever it builds); the builders themselves need
no Beam. Data sets with downloads need a network; ImageNet's tars must be in --manual_dir. Errors are one
`error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from qkv_vit.data import digits  # noqa: F401  (registers sklearn_digits, the offline data set, by name)
from qkv_vit.errors import one_line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="tfds data set name, e.g. cifar10, imagenet2012, sklearn_digits")
    parser.add_argument("--data_dir", required=True, help="where tfds data sets live (config.data.data_dir)")
    parser.add_argument("--manual_dir", help="files a data set cannot download (ImageNet's tars)")
    return parser.parse_args(argv)


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Build tfds data set `name` in data_dir unless it is already there; returns its builder.
    Raises tfds's DatasetNotFoundError (a ValueError) for an unknown name, AssertionError for missing manual files,
    OSError when a download or a write fails."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        builder = prepare(args.name, args.data_dir, args.manual_dir)
    except (ValueError, AssertionError, OSError) as error:  # the user's to fix (see prepare); anything else is a bug
        reason = one_line(str(error).split("\n")[0] if isinstance(error, ValueError) else str(error))
        print(f"error: preparing {args.name!r} in {args.data_dir} failed: {reason}", file=sys.stderr)
        return 2
    print(f"{args.name} is prepared in {builder.data_dir}: set config.data.data_dir={args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
