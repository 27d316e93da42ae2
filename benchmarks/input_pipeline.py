"""Input-pipeline throughput and data-set counts; a thin wrapper over `python -m qkv_vit.data.inspect`.

    python benchmarks/input_pipeline.py                 # CIFAR-10 archive from ../shared/data (else the
                                                        # offline digits), xcit recipe at 224, batch 64
    python benchmarks/input_pipeline.py --rounds 3      # 3 measurements (median)
    python benchmarks/input_pipeline.py --preset small --image-size 32 ...   # any inspect arguments

Measures the train batches as they leave the host for the trainer (uint8 images for the device to finish).
Prints counts, images/second (and per core) of each round and their median, and a final JSON line.
"""

import json
import statistics
import sys
from pathlib import Path

from qkv_vit.data import inspect

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    args, rounds = sys.argv[1:], 1
    if "--rounds" in args:
        at = args.index("--rounds")
        rounds, args = int(args[at + 1]), args[:at] + args[at + 2 :]
    if not args:
        args = ["--preset", "xcit", "--image-size", "224", "--batch-size", "64", "--batches", "40"]
        if ARCHIVE.is_file():
            args = ["--source", "image_folder", "--path", str(ARCHIVE)] + args
    speeds, results = [], []
    for round_index in range(rounds):
        result = inspect.main(args + ([] if round_index == 0 else ["--no-class-counts"]))
        speeds.append(result["images_per_second"])
        results.append(result)
    median, cores = statistics.median(speeds), results[-1]["cpu_count"]
    print(f"median images/s: {median:.0f} ({median / cores:.0f} per core)")
    print(
        json.dumps(
            {
                "rounds": rounds,
                "images_per_second": speeds,
                "median": median,
                "cpu_count": cores,
                "num_examples": results[0]["num_examples"],
                "preset": results[-1]["preset"],
                "image_size": results[-1]["image_size"],
                "batch_size": results[-1]["batch_size"],
                "source": results[-1]["source"],
            }
        )
    )


if __name__ == "__main__":
    main()
