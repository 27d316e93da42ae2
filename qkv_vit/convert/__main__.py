"""python -m qkv_vit.convert SRC DST [--model NAME]: PyTorch XCiT weights -> Orbax checkpoint for fine-tuning.

Without --model the architecture is read from the weights' shapes and matched against the named models;
an architecture that is not a named model needs --tokens-norm if it was trained with it (no weight shows it).

timm RegNet weights (the distillation teacher regnety_160) are recognised by their keys, or named with --model,
and written the same way with the architecture {"family": "regnet", "name": ..., "num_classes": ...}.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from qkv_vit import models
from qkv_vit.convert import regnet as regnet_convert
from qkv_vit.convert.loading import WeightMismatchError, load_pytorch_weights, recorded_qkv_activation
from qkv_vit.convert.mapping import infer_architecture, qkv_options
from qkv_vit.convert.state_dict import read_state_dict
from qkv_vit.errors import one_line
from qkv_vit.models import regnet
from qkv_vit.weights import save_converted

SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "cls_attn_layers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="weights: .safetensors (timm layout) or .pth/.pt (official or timm layout)")
    parser.add_argument("dst", help="output directory (must not exist)")
    parser.add_argument(
        "--model", choices=models.list_models() + regnet.list_regnets(), help="named model the weights belong to"
    )
    parser.add_argument("--tokens-norm", action="store_true", help="for unnamed architectures: tokens_norm=True")
    return parser.parse_args(argv)


def resolve_architecture(args: argparse.Namespace, inferred: dict[str, Any]) -> dict[str, Any]:
    """The full architecture: a named model's (checked against the weights) or the inferred one."""
    if args.model:
        return {**models.architecture(args.model, num_classes=inferred["num_classes"]), **qkv_options(inferred)}
    for name, named in models.MODEL_CONFIGS.items():
        if all(getattr(models.XCiT(**named), f) == inferred[f] for f in SHAPE_FIELDS):
            print(f"Weights match {name}; using its configuration.")
            return {**named, "num_classes": inferred["num_classes"], **qkv_options(inferred)}
    print(f"Weights match no named model; using the inferred architecture with tokens_norm={args.tokens_norm}.")
    return {**inferred, "tokens_norm": args.tokens_norm}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        regnet_weights = read_regnet_weights(args)
        if regnet_weights is not None:
            return convert_regnet(args, regnet_weights)
        inferred = infer_architecture(read_state_dict(args.src))
        if "qkv_embed" in inferred:  # a non-linear QKV embedding: no weight's shape shows its activation
            inferred["qkv_activation"], source = recorded_qkv_activation(args.src)
            print(f"QKV activation {inferred['qkv_activation']} ({source}).")
        model = models.from_architecture(resolve_architecture(args, inferred))
        variables = load_pytorch_weights(args.src, model)
        out = save_converted(args.dst, variables, models.architecture_of(model))
    except (WeightMismatchError, ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)  # one line, as every qkv_vit command
        return 2
    print(
        f"Wrote {models.count_params(variables['params']):,} parameters of XCiT({models.architecture_of(model)}) to {out}"
    )
    return 0


def read_regnet_weights(args: argparse.Namespace) -> regnet_convert.StateDict | None:
    """The RegNet weights the command converts: read when --model names a RegNet (ValueError if the file holds
    none) or when no --model is given and the file holds RegNet keys; None for XCiT (the file is not read then)."""
    if args.model in models.MODEL_CONFIGS:
        return None
    if args.model in regnet.REGNET_CONFIGS:
        return regnet_convert.read_regnet_state_dict(args.src)
    return regnet_convert.read_if_regnet(args.src)


def convert_regnet(args: argparse.Namespace, state_dict: regnet_convert.StateDict) -> int:
    """Write RegNet weights as converted weights: the RegNet --model names (else the named one whose shapes the
    weights have), with the file's class count. Raises as regnet_convert.regnet_variables and save_converted."""
    if args.model:
        head = state_dict.get("head.fc.weight")
        architecture = {"family": regnet.FAMILY, "name": args.model, "num_classes": 0 if head is None else len(head)}
    else:
        architecture = regnet_convert.infer_regnet_architecture(state_dict)
        print(f"Weights match {architecture['name']}; using its configuration.")
    model = regnet.from_architecture(architecture)
    variables = regnet_convert.regnet_variables(state_dict, model, Path(args.src).name)
    out = save_converted(args.dst, variables, regnet.architecture_of(model))
    print(f"Wrote {models.count_params(variables['params']):,} parameters of RegNet({architecture}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
