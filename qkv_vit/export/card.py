"""The model card (README.md) written beside exported weights: the architecture, the parameter count, the data, the
recipe and the measured accuracy, each from the records of the run that trained the weights (its model.json,
config.json, metrics.jsonl and evaluation.json: docs/training.md); what no record says is written as unknown."""

import dataclasses
import json
from pathlib import Path
from typing import Any

from qkv_vit.paths import PathLike, as_path
from qkv_vit.results import model_label, qkv_label
from qkv_vit.train.logging_utils import read_metrics
from qkv_vit.weights import find_state_item, is_converted

UNKNOWN = "unknown"
NAN = float("nan")
SHOWN_CLASSES = 20


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where exported weights come from: a run's records (workdir set), or converted weights (no run)."""

    weights: str  # the path given to the export
    workdir: Path | None  # the run's workdir; None for converted weights
    step: int | None  # the checkpoint step the weights are from
    summary: dict[str, Any]  # the run's model.json ({} if none)
    config: dict[str, Any]  # the run's config.json ({} if none)
    metrics: list[dict[str, Any]]  # the run's metrics.jsonl records
    evaluation: dict[str, Any]  # the run's evaluation.json (python -m qkv_vit.evaluate), {} if none


def provenance(weights: PathLike) -> Provenance:
    """The records of the run whose checkpoint `weights` is (a workdir, its checkpoints/, a step directory), or
    none for converted weights; a record that is absent or unreadable is left empty."""
    path = as_path(weights)
    if is_converted(path):
        return Provenance(str(weights), None, None, {}, {}, [], {})
    state = find_state_item(path)
    workdir = Path(str(state.parent.parent.parent))  # WORKDIR/checkpoints/<step>/state
    step = int(state.parent.name) if state.parent.name.isdigit() else None
    return Provenance(
        str(weights),
        workdir,
        step,
        read_json(workdir / "model.json"),
        read_json(workdir / "config.json"),
        read_metrics(str(workdir)),
        read_json(workdir / "evaluation.json"),
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@dataclasses.dataclass(frozen=True)
class Export:
    """What was written: the layout, the weights file, the architecture (models.architecture_of's JSON), the
    parameter count, the timm model name (None where timm has no such model) and whether the EMA copy."""

    layout: str
    weights_file: str
    architecture: dict[str, Any]
    num_params: int
    timm_model: str | None
    use_ema: bool


def model_card(source: Provenance, export: Export) -> str:
    """The card as markdown."""
    sections = [
        title(source, export),
        architecture_section(source, export),
        data_section(source),
        recipe_section(source),
        accuracy_section(source, export),
        loading_section(export),
    ]
    return "\n\n".join(sections) + "\n"


def title(source: Provenance, export: Export) -> str:
    name = source.summary.get("model_name") or export.timm_model or "XCiT"
    origin = (
        f"the run `{source.workdir}` at step {source.step}"
        if source.workdir
        else f"converted weights `{source.weights}` (no qkv_vit training run: data, recipe and accuracy unknown)"
    )
    ema = " (its EMA parameters)" if export.use_ema else ""
    return (
        f"# {name}, {qkv_label(export.architecture)} QKV embedding\n\n"
        f"Exported by `python -m qkv_vit.export` from {origin}{ema}, in {export.layout}'s key layout: "
        f"`{export.weights_file}`, with `config.json` (the architecture and the PyTorch constructor arguments)."
    )


def architecture_section(source: Provenance, export: Export) -> str:
    arch = export.architecture
    summary = {"model_name": source.summary.get("model_name") or "XCiT", "architecture": arch}
    rows = [
        ("model", model_label(summary)),
        ("timm model", timm_description(export)),
        ("QKV embedding", qkv_label(arch) + f", activation {arch.get('qkv_activation', 'relu')}"),
        (
            "patch size, width, depth, heads",
            f"{arch['patch_size']}, {arch['embed_dim']}, {arch['depth']}, {arch['num_heads']}",
        ),
        ("class-attention blocks", str(arch.get("cls_attn_layers"))),
        ("tokens_norm, global_pool", f"{arch.get('tokens_norm')}, {arch.get('global_pool')}"),
        ("classes", classes(source, arch)),
        ("parameters", f"{export.num_params:,} (BatchNorm running statistics not counted)"),
        ("trained in", f"{arch.get('dtype', UNKNOWN)} compute; exported as float32"),
    ]
    return "## Architecture\n\n" + table(rows)


def timm_description(export: Export) -> str:
    if export.timm_model:
        return f"`{export.timm_model}`"
    if export.architecture.get("qkv_embed", "linear") != "linear":
        return "none: timm has no non-linear QKV embedding (qkv_vit/torch_xcit.py runs it)"
    return "none by name: config.json's architecture with its model_args builds it (timm's local-dir: loader)"


def classes(source: Provenance, arch: dict[str, Any]) -> str:
    names = source.summary.get("data", {}).get("class_names")
    if not names:
        return f"{arch.get('num_classes')} (names unknown)"
    shown = ", ".join(map(str, names[:SHOWN_CLASSES])) + (", ..." if len(names) > SHOWN_CLASSES else "")
    return f"{len(names)}: {shown} (config.json's label_names)"


def data_section(source: Provenance) -> str:
    data = source.summary.get("data")
    if not data:
        return "## Data\n\nUnknown: no run recorded what these weights were trained on."
    image = source.config.get("data", {})
    rows = [
        ("source", str(data.get("source", UNKNOWN))),
        ("train", f"split `{data.get('train_split')}`, {data.get('train_examples', UNKNOWN)} examples"),
        ("evaluation", f"split `{data.get('eval_split')}`, {data.get('eval_examples', UNKNOWN)} examples"),
        ("input", input_description(image)),
    ]
    fine_tuned = source.config.get("init_from")
    if fine_tuned:
        rows.append(("initialized from", f"`{fine_tuned}`"))
    return "## Data\n\n" + table(rows)


def input_description(data: dict[str, Any]) -> str:
    if not data.get("image_size"):
        return UNKNOWN
    size = data["image_size"]
    return f"RGB {size}x{size}, (x / 255 - mean) / std with mean {data.get('mean')} and std {data.get('std')}"


def recipe_section(source: Provenance) -> str:
    config = source.config
    if not config:
        return "## Recipe\n\nUnknown: no run recorded how these weights were trained."
    augment = config.get("data", {}).get("augment", {})
    steps = source.summary.get("total_steps", config.get("total_steps", UNKNOWN))
    rows = [
        ("steps", f"{steps} of {config.get('global_batch_size', UNKNOWN)} images"),
        ("optimizer", optimizer_description(config.get("optimizer", {}))),
        ("augmentation", ", ".join(f"{key} {augment[key]}" for key in AUGMENT_KEYS if key in augment) or UNKNOWN),
        ("EMA decay", str(config.get("ema_decay"))),
        ("seed", str(config.get("seed", UNKNOWN))),
    ]
    layer_decay = config.get("optimizer", {}).get("layer_decay", 1.0)
    if layer_decay != 1.0:
        rows.append(("layer-wise lr decay", str(layer_decay)))
    distillation = config.get("distillation", {})
    if distillation.get("type", "none") != "none":
        teacher = distillation.get("teacher_model") or distillation.get("teacher_path")
        rows.append(
            (
                "distillation",
                f"{distillation['type']} (DeiT's), alpha {distillation.get('alpha')}, tau {distillation.get('tau')}, "
                f"teacher `{teacher}`",
            )
        )
    return f"## Recipe\n\nFrom the run's `{source.workdir}/config.json`:\n\n" + table(rows)


AUGMENT_KEYS = ("randaugment_layers", "mixup_alpha", "cutmix_alpha", "label_smoothing", "erasing_prob", "flip_prob")


def optimizer_description(optimizer: dict[str, Any]) -> str:
    scaled = " at 512 images per update, scaled by the batch" if optimizer.get("scale_lr_by_batch") else ""
    warmup = optimizer.get("warmup_steps")
    warmup = f"{warmup} steps" if warmup is not None else f"{optimizer.get('warmup_epochs')} epochs"
    return (
        f"{optimizer.get('name', UNKNOWN)}, lr {optimizer.get('lr')}{scaled}, weight decay "
        f"{optimizer.get('weight_decay')}, warmup {warmup}, cosine to {optimizer.get('min_lr')}"
    )


def accuracy_section(source: Provenance, export: Export) -> str:
    if source.workdir is None:
        return "## Measured accuracy\n\nUnknown: qkv_vit measured none for these weights (no run records)."
    name = ("ema_" if export.use_ema else "") + source.config.get("eval_name", "val")
    evaluations = [r for r in source.metrics if f"{name}/top1" in r and r["step"] <= (source.step or r["step"])]
    if not evaluations:
        measured = f"None: the run's metrics.jsonl holds no `{name}/top1` up to step {source.step}."
    else:
        last = evaluations[-1]
        at = "at" if last["step"] == source.step else f"at step {last['step']}, the last evaluation before"
        measured = (
            f"{name}/top1 **{last[f'{name}/top1']:.4f}** {at} step {source.step} (the run's metrics.jsonl: top-5 "
            f"{last.get(f'{name}/top5', NAN):.4f}, loss {last.get(f'{name}/loss', NAN):.4f}, "
            f"{int(last.get(f'{name}/count', 0))} examples)."
        )
    splits = source.evaluation.get("splits", {})
    if splits:
        scores = "; ".join(
            f"split `{split}` top-1 {record.get('top1', NAN):.4f} ({record.get('count')} examples)"
            for split, record in splits.items()
        )
        ema = ", EMA" if source.evaluation.get("ema") else ""
        command = f"python -m qkv_vit.evaluate {source.evaluation.get('weights')}"
        measured += f"\n\nThe run's evaluation.json (`{command}`{ema}): {scores}."
    return "## Measured accuracy\n\n" + measured


def loading_section(export: Export) -> str:
    if export.layout == "official":
        return (
            "## Loading\n\n"
            'In facebookresearch/xcit\'s code: `model.load_state_dict(torch.load("pytorch_model.pth")["model"])` '
            "into its `XCiT` built with `config.json`'s `model_args`; timm's xcit and "
            "`python -m qkv_vit.convert` read this layout too."
        )
    if export.weights_file.endswith(".safetensors"):
        read = f'from safetensors.torch import load_file\n\nstate_dict = load_file("{export.weights_file}")'
    else:
        read = f'state_dict = torch.load("{export.weights_file}")'
    timm = (
        f'\nOr with timm: `timm.create_model("{export.timm_model}", num_classes={export.architecture["num_classes"]})'
        '.load_state_dict(state_dict, strict=True)`, or `timm.create_model("local-dir:<this directory>", '
        "pretrained=True)`.\n"
        if export.timm_model
        else ""
    )
    return (
        "## Loading\n\n"
        "With qkv_vit's single-file PyTorch XCiT, `qkv_vit/torch_xcit.py` (it needs torch and nothing else):\n\n"
        "```python\n"
        "import json\n\nimport torch\n\n"
        "from qkv_vit import torch_xcit  # or a copy of the file\n\n"
        f"{read}\n"
        'model = torch_xcit.Xcit(**json.load(open("config.json"))["qkv_vit"]["torch_xcit"]).eval()\n'
        "model.load_state_dict(state_dict, strict=True)\n"
        "logits = model(images)  # (B, 3, H, W) float32, normalized as above\n"
        "```\n"
        f"{timm}\n"
        "It computes qkv_vit's float32 logits to within 1e-4 (tests/test_export.py checks every QKV embedding)."
    )


def table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)
