"""Parameter and compute accounting of XCiT with each query/key/value embedding.

python -m qkv_vit.params xcit_nano_12_p16 --qkv-embed fsne --code-size 8
python -m qkv_vit.params --table            # model x QKV preset comparison
"""

import argparse
import dataclasses
import sys
from typing import Any

import jax

from qkv_vit import models
from qkv_vit.models.flops import count_macs

TABLE_MODELS = ("xcit_nano_12_p16", "xcit_tiny_12_p16", "xcit_small_12_p16")


@dataclasses.dataclass(frozen=True)
class ParamReport:
    model: str
    qkv: str
    total_params: int
    qkv_params: int  # every q/k/v embedding in the model
    qkv_params_per_block: int  # one XCA block's
    gflops: float  # multiply-accumulates per image / 1e9, as papers report GFLOPs


def report(name: str, qkv_label: str, options: dict[str, Any], image_size: int = 224) -> ParamReport:
    model = models.create(name, **options)
    params = models.init_shapes(model, image_size=model.patch_size)["params"]
    return ParamReport(
        model=name,
        qkv=qkv_label,
        total_params=models.count_params(params),
        qkv_params=count_qkv_params(params),
        qkv_params_per_block=models.count_params(params["blocks_0"]["attn"]["qkv"]) if model.depth else 0,
        gflops=count_macs(model, image_size) / 1e9,
    )


def count_qkv_params(params: dict) -> int:
    """Parameters of the query/key/value embeddings: every `qkv` module, and class attention's q, k, v."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(leaf.size for path, leaf in leaves if is_qkv_parameter([k.key for k in path]))


def is_qkv_parameter(names: list[str]) -> bool:
    # Embeddings are modules named `qkv`; the reference class attention has Dense `q`, `k`, `v` in `attn`.
    return "qkv" in names or (len(names) >= 3 and names[-3] == "attn" and names[-2] in ("q", "k", "v"))


def format_table(reports: list[ParamReport]) -> str:
    lines = [
        "| model | QKV embedding | params | QKV params | QKV params / block | GFLOPs (224) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in reports:
        lines.append(
            f"| {r.model} | {r.qkv} | {r.total_params:,} | {r.qkv_params:,} | {r.qkv_params_per_block:,} | {r.gflops:.3f} |"
        )
    return "\n".join(lines)


def preset_label(preset: str, embed_dim: int) -> str:
    options = models.qkv_preset(preset, embed_dim)
    details = [f"h={options['qkv_hidden_dim']}"] if "qkv_hidden_dim" in options else []
    details += [f"m={options['code_size']}"] if options["qkv_embed"] == "fsne" else []
    details += [f"shared {options['shared_layer']}"] if options["qkv_embed"] == "psne" else []
    return f"{preset} ({', '.join(details)})" if details else preset


def comparison_table(model_names: tuple[str, ...] = TABLE_MODELS, image_size: int = 224) -> list[ParamReport]:
    reports = []
    for name in model_names:
        embed_dim = models.MODEL_CONFIGS[name]["embed_dim"]
        for preset in models.QKV_PRESETS:
            options = models.qkv_preset(preset, embed_dim)
            reports.append(report(name, preset_label(preset, embed_dim), options, image_size))
    return reports


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkv_vit.params", description=__doc__.split("\n")[1])
    parser.add_argument("model", nargs="?", default="xcit_nano_12_p16", choices=models.list_models())
    parser.add_argument("--table", action="store_true", help="print the model x QKV preset comparison table")
    parser.add_argument("--table-models", default=",".join(TABLE_MODELS), help="comma-separated, for --table")
    parser.add_argument("--qkv", choices=list(models.QKV_PRESETS), help="a named QKV configuration")
    parser.add_argument("--qkv-embed", choices=models.QKV_EMBEDDINGS)
    parser.add_argument("--qkv-hidden-dim", type=int)
    parser.add_argument("--shared-layer", choices=("first", "second"))
    parser.add_argument("--code-size", type=int)
    parser.add_argument("--code-mode", choices=("concat", "add"))
    parser.add_argument("--qkv-in-class-attention", action="store_true", default=None)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.table:
            reports = comparison_table(tuple(args.table_models.split(",")), args.image_size)
        else:
            fields = ("qkv_embed", "qkv_hidden_dim", "shared_layer", "code_size", "code_mode", "qkv_in_class_attention")
            overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
            options = {**models.architecture(args.model, args.qkv), **overrides, "num_classes": args.num_classes}
            options = {k: v for k, v in options.items() if k not in models.MODEL_CONFIGS[args.model]}
            label = ", ".join(f"{k}={v}" for k, v in options.items() if k != "num_classes") or "linear"
            reports = [report(args.model, label, options, args.image_size)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
