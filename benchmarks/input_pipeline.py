"""Input-pipeline throughput and data-set counts; a thin wrapper over `python -m qkv_vit.data.inspect`.

    python benchmarks/input_pipeline.py                 # CIFAR-10 archive from ../shared/data (else the
                                                        # offline digits), xcit recipe at 224, batch 64
    python benchmarks/input_pipeline.py --rounds 3      # alternate the two outputs 3 times (medians)
    python benchmarks/input_pipeline.py --preset small --image-size 32 ...   # any inspect arguments

Measures the two ways a batch can leave the host, alternating them in one sitting: uint8 images for the
device to finish (what the trainer does) and float32 batches finished on the host (normalized, erased,
mixed: what it did before). Prints counts, images/second (and per core) of each, and a final JSON line.
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
    speeds = {"uint8": [], "host_finished": []}
    results = []
    for round_index in range(rounds):
        for name, extra in (("host_finished", ["--finish-on-host"]), ("uint8", [])):
            counts = [] if (round_index, name) == (0, "host_finished") else ["--no-class-counts"]
            result = inspect.main(args + extra + counts)
            speeds[name].append(result["images_per_second"])
            results.append(result)
    summary = {name: statistics.median(values) for name, values in speeds.items()}
    cores = results[-1]["cpu_count"]
    print(
        f"median images/s: uint8 {summary['uint8']:.0f} ({summary['uint8'] / cores:.0f} per core), finished on the "
        f"host {summary['host_finished']:.0f} ({summary['host_finished'] / cores:.0f} per core): "
        f"{summary['uint8'] / summary['host_finished']:.2f}x"
    )
    print(
        json.dumps(
            {
                "rounds": rounds,
                "images_per_second": speeds,
                "median": summary,
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
