"""Input-pipeline throughput and data-set counts; a thin wrapper over `python -m qkv_vit.data.inspect`.

    python benchmarks/input_pipeline.py                 # CIFAR-10 archive from ../shared/data (else the
                                                        # offline digits), xcit recipe at 224, batch 64
    python benchmarks/input_pipeline.py --preset small --image-size 32 ...   # any inspect arguments

Prints counts, images/second and a final JSON line (see qkv_vit/data/inspect.py).
"""

import sys
from pathlib import Path

from qkv_vit.data import inspect

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    args = sys.argv[1:]
    if not args:
        args = ["--preset", "xcit", "--image-size", "224", "--batch-size", "64", "--batches", "40"]
        if ARCHIVE.is_file():
            args = ["--source", "image_folder", "--path", str(ARCHIVE)] + args
    inspect.main(args)


if __name__ == "__main__":
    main()
