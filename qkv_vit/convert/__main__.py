"""python -m qkv_vit.convert SRC DST [--model NAME]: PyTorch XCiT weights -> Orbax checkpoint for fine-tuning.

Without --model the architecture is read from the weights' shapes and matched against the named models;
an architecture that is not a named model needs --tokens-norm if it was trained with it (no weight shows it).
"""

import argparse
import sys
from typing import Any

from qkv_vit import models
from qkv_vit.convert.loading import WeightMismatchError, load_pytorch_weights
from qkv_vit.convert.mapping import infer_architecture
from qkv_vit.convert.state_dict import read_state_dict
from qkv_vit.errors import one_line
from qkv_vit.weights import save_converted

SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "cls_attn_layers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="weights: .safetensors (timm layout) or .pth/.pt (official or timm layout)")
    parser.add_argument("dst", help="output directory (must not exist)")
    parser.add_argument("--model", choices=models.list_models(), help="named model the weights belong to")
    parser.add_argument("--tokens-norm", action="store_true", help="for unnamed architectures: tokens_norm=True")
    return parser.parse_args(argv)


def resolve_architecture(args: argparse.Namespace, inferred: dict[str, Any]) -> dict[str, Any]:
    """The full architecture: a named model's (checked against the weights) or the inferred one."""
    if args.model:
        return models.architecture(args.model, num_classes=inferred["num_classes"])
    for name, named in models.MODEL_CONFIGS.items():
        if all(getattr(models.XCiT(**named), f) == inferred[f] for f in SHAPE_FIELDS):
            print(f"Weights match {name}; using its configuration.")
            return {**named, "num_classes": inferred["num_classes"]}
    print(f"Weights match no named model; using the inferred architecture with tokens_norm={args.tokens_norm}.")
    return {**inferred, "tokens_norm": args.tokens_norm}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = models.from_architecture(resolve_architecture(args, infer_architecture(read_state_dict(args.src))))
        variables = load_pytorch_weights(args.src, model)
        out = save_converted(args.dst, variables, models.architecture_of(model))
    except (WeightMismatchError, ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)  # one line, as every qkv_vit command
        return 2
    print(
        f"Wrote {models.count_params(variables['params']):,} parameters of XCiT({models.architecture_of(model)}) to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
