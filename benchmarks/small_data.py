"""Whole training runs on small images from an image folder or tar: the in-memory pipeline (train split on the
host or on the devices) against tf.data.

    python benchmarks/small_data.py                      # CIFAR-10 archive from ../shared/data, else generated JPEGs
    python benchmarks/small_data.py --path DIR_OR_TAR --rounds 2 --steps 200 --depth 12
    python benchmarks/small_data.py --variants in_memory_host,in_memory_device   # a machine without TensorFlow
    python benchmarks/small_data.py --smoke              # a 1-block model, a few steps (tests)

Each run is `python -m qkv_vit.main` with `configs/cifar10.py:recipe=short` (XCiT-N12/8 at 32x32, batch 128,
flips and label smoothing only, so both pipelines do the same augmentation: tf.data on the host, or the device in
the step) in a fresh process, the pipelines alternating, round after round. The figure is the trainer's own
`train/images_per_sec` (data and step together), the median over the logged intervals after the first (which
holds compilation). Data preparation (the one-time conversion or decoding) is done before timing starts.
Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Each variant: (configs/cifar10.py's source= argument, data.placement), on the image folder or tar.
VARIANTS = {
    "image_folder": ("image_folder", "auto"),
    "in_memory_host": ("in_memory", "host"),
    "in_memory_device": ("in_memory", "device"),
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--path", default=str(ARCHIVE) if ARCHIVE.is_file() else "", help="folder or tar ('': 1,200 generated JPEGs)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120, help="train steps per run")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cache-dir", default="", help="where data is prepared (default ~/.cache/qkv_vit)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--smoke", action="store_true", help="a 1-block model and a few steps")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}: choose from {', '.join(VARIANTS)}")
    return args


def write_random_folder(root: Path) -> str:
    """10 classes of generated 32x32 JPEGs (flat colours), 100 train and 20 test images each (no data set at hand)."""
    from qkv_vit.data.testing import write_image_folder

    write_image_folder(
        root,
        {"train": {f"c{i}": 100 for i in range(10)}, "test": {f"c{i}": 20 for i in range(10)}},
        size=(32, 32),
        image_format="jpg",
    )
    return str(root)


def run_once(args: argparse.Namespace, variant: str, workdir: Path) -> list[float]:
    """One training run; its logged images/s after the first interval."""
    source, placement = VARIANTS[variant]
    config = f"configs/cifar10.py:recipe=short,source={source},depth={args.depth},batch={args.batch_size}"
    config += f",path={args.path}"
    overrides = [f"--config.total_steps={args.steps}", f"--config.log_every_steps={args.log_every}"]
    overrides.append(f"--config.data.placement={placement}")
    overrides += ["--config.eval_every_steps=0", "--config.checkpoint_every_steps=0"]
    if args.cache_dir:
        overrides.append(f"--config.data.cache_dir={args.cache_dir}")
    if args.smoke:
        overrides += ["--config.model.embed_dim=32", "--config.model.num_heads=4", "--config.model.cls_attn_layers=1"]
    command = [sys.executable, "-m", "qkv_vit.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    result = subprocess.run(command, cwd=harness.REPO, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/images_per_sec"] for r in records if "train/images_per_sec" in r]
    return speeds[1:] or speeds


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.depth, args.steps, args.log_every, args.batch_size, args.rounds = 1, 6, 2, 16, 1
    speeds: dict[str, list[float]] = {variant: [] for variant in args.variants}
    with tempfile.TemporaryDirectory(prefix="qkv_vit_small_data_") as temporary:
        if not args.path:
            args.path = write_random_folder(Path(temporary) / "images")
        first = 0 if args.smoke else -1  # round -1 prepares the data (conversion, decoding), untimed
        for round_index in range(first, args.rounds):
            for variant in args.variants:
                run = run_once(args, variant, Path(temporary) / f"{variant}-{round_index}")
                if round_index >= 0:
                    speeds[variant].append(statistics.median(run))
    medians = {variant: harness.median(values) for variant, values in speeds.items()}
    print(
        harness.format_table(
            ["variant", "images/s per run (median of intervals)", "median"],
            [[v, ", ".join(f"{x:.0f}" for x in speeds[v]), f"{medians[v]:.0f}"] for v in args.variants],
        )
    )
    baseline = args.variants[0]
    ratios = {variant: medians[variant] / medians[baseline] for variant in args.variants[1:]}
    for variant, ratio in ratios.items():
        print(f"{variant} / {baseline}: {ratio:.2f}x")
    harness.emit(
        {
            "images_per_second": speeds,
            "median": medians,
            "over_" + baseline: ratios,
            "depth": args.depth,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "data": args.path or "digits",
            "machine": harness.machine(),
        }
    )


if __name__ == "__main__":
    main()
