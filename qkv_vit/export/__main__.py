"""python -m qkv_vit.export WEIGHTS OUT [--format timm|official] [--safetensors] [--ema]: XCiT weights -> PyTorch.

WEIGHTS is converted weights, a run's workdir, its checkpoints/ or one step directory; OUT a new directory that
gets the state dict (pytorch_model.pth, or model.safetensors), config.json and README.md (the model card).
"""

import argparse
import sys

from qkv_vit.errors import ConfigError, StorageError, one_line
from qkv_vit.export.exporting import export_weights
from qkv_vit.export.state_dict import LAYOUTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.export", description=__doc__.split("\n")[0])
    parser.add_argument("weights", help="converted weights, a run's workdir, its checkpoints/ or a step directory")
    parser.add_argument("out", help="output directory (must not exist)")
    parser.add_argument("--format", choices=LAYOUTS, default="timm", help="state-dict key layout (default: timm)")
    parser.add_argument("--safetensors", action="store_true", help="write model.safetensors (needs no PyTorch)")
    parser.add_argument("--ema", action="store_true", help="export the run's EMA parameters")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export_weights(args.weights, args.out, args.format, args.safetensors, args.ema)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, ImportError, StorageError) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)  # one line, as every qkv_vit command
        return 2
    print(f"Wrote {args.format}-layout XCiT weights, config.json and the model card README.md to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
