"""Print a data set's example and per-class counts, and measure train-pipeline throughput.

    python -m qkv_vit.data.inspect --source image_folder --path data/cifar10-jpeg.tar.gz \\
        --preset xcit --image-size 224 --batch-size 128 --batches 20

Throughput is images/second of tf.data's train batches as the trainer takes them (decode, the preset's per-image
augmentation, uint8 out; the device normalizes, erases and mixes), measured after one warm-up batch on this host's
CPUs, also per CPU core. The last line printed is one JSON object with every result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from qkv_vit.data.config import get_config
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.pipeline import TFDataSource, open_tf_data


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.data.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="digits", choices=["digits", "tfds", "image_folder"])
    parser.add_argument("--name", default="", help="tfds data set name, for --source tfds")
    parser.add_argument("--data-dir", help="tfds data_dir, for --source tfds")
    parser.add_argument("--path", help="folder or .tar/.tar.gz, for --source image_folder")
    parser.add_argument("--cache-dir", help="where digits / image folders are prepared (default ~/.cache/qkv_vit)")
    parser.add_argument("--preset", default="xcit", help="augmentation preset: xcit, transfer, small, none")
    parser.add_argument("--image-size", type=int, help="default: the preset's (xcit 224, small 32)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches, after one warm-up batch")
    parser.add_argument("--num-parallel-calls", type=int, default=-1, help="-1: AUTOTUNE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-class-counts", action="store_true", help="skip reading every label (slow on ImageNet)")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace):
    config = get_config(args.preset, source=args.source, name=args.name)
    config.data_dir, config.path, config.cache_dir = args.data_dir, args.path, args.cache_dir
    if args.image_size:
        config.image_size = args.image_size
    config.num_parallel_calls = args.num_parallel_calls
    return config


def measure_throughput(source: TFDataSource, batch_size: int, batches: int, seed: int = 0) -> float:
    """Images per second of train batches, after one warm-up batch (graph tracing, buffer filling)."""
    iterator = source.train_batches(batch_size, seed=seed, process_index=0, process_count=1, local_device_count=1)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    config = _config(args)
    try:
        source = open_tf_data(config)
    except DataConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    prepared = source.prepared
    result = {
        "source": prepared.description,
        "num_classes": prepared.num_classes,
        "num_examples": {},
        "class_counts": {},
    }
    for role, split in (("train", prepared.train_split), ("eval", prepared.eval_split)):
        count = prepared.num_examples(split)
        result["num_examples"][split] = count
        print(f"{role} split {split!r}: {count} examples")
        if not args.no_class_counts:
            counts = dict(zip(prepared.class_names, prepared.label_counts(split)))
            result["class_counts"][split] = counts
            print("  per class: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    speed = measure_throughput(source, args.batch_size, args.batches, args.seed)
    cores = os.cpu_count() or 1
    print(
        f"train pipeline, preset {args.preset!r} at {config.image_size}x{config.image_size}, batch {args.batch_size}, "
        f"uint8 for the device to finish: {speed:.0f} images/s on {cores} CPUs ({speed / cores:.0f} per core)"
    )
    result.update(
        preset=args.preset,
        image_size=config.image_size,
        batch_size=args.batch_size,
        batches=args.batches,
        images_per_second=round(speed, 1),
        images_per_second_per_core=round(speed / cores, 1),
        cpu_count=cores,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
