"""python -m qkv_vit.analysis CHECKPOINT_DIR --out DIR [--method pca|tsne]: plots and JSON of F-SNE codes."""

import argparse
import logging
import sys

from qkv_vit.analysis.report import analyze_codes
from qkv_vit.progress import announced
from qkv_vit.weights import read_weights

LOGGER = logging.getLogger("qkv_vit.analysis")  # this command's progress lines, and its modules'


def show_progress() -> None:
    """The analysis' progress lines on stderr, without other libraries' records (once per process)."""
    if LOGGER.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.analysis", description=__doc__)
    parser.add_argument("checkpoint", help="a training workdir's checkpoint directory, or converted weights")
    parser.add_argument("--out", required=True, help="directory for codes.json and the PNG plots")
    parser.add_argument("--method", choices=("pca", "tsne"), default="pca", help="2-D embedding of the codes")
    args = parser.parse_args(argv)
    show_progress()
    try:
        with announced(f"Reading the weights in {args.checkpoint}", say=LOGGER.info):
            params = read_weights(args.checkpoint).variables["params"]
        stats = analyze_codes(params, args.out, args.method)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{len(stats['layers'])} layers of codes (m={stats['code_size']}); mean |cos| between C_q, C_k, C_v: "
        f"{stats['mean_abs_cosine']:.3f} (max {stats['max_abs_cosine']:.3f}). Wrote {args.out}/codes.json and plots."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
