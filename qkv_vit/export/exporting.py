"""Writing weights for PyTorch: `export_weights(weights, out)` reads anything qkv_vit.weights.read_weights accepts
and writes OUT/ with the state dict (pytorch_model.pth or model.safetensors, timm's hub file names), config.json
(timm's hub config, with qkv_vit's architecture and qkv_vit/torch_xcit.py's constructor arguments under "qkv_vit")
and README.md (the model card, export/card.py)."""

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qkv_vit import models
from qkv_vit.errors import ConfigError
from qkv_vit.export.card import Export, model_card, provenance
from qkv_vit.export.state_dict import LAYOUTS, OFFICIAL_CHECKPOINT_KEY, to_state_dict
from qkv_vit.paths import PathLike
from qkv_vit.tree import flatten
from qkv_vit.weights import read_weights

TORCH_FILE = "pytorch_model.pth"  # timm's local-dir loader prefers it after model.safetensors and pytorch_model.bin
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
# qkv_vit/torch_xcit.py's TRAINING_ONLY_FIELDS (tests/test_export.py checks they agree; that file imports torch,
# which writing a .safetensors export must not need).
TRAINING_ONLY_FIELDS = ("dtype", "layer_impl", "batch_norm_group_size", "code_init_std")
# timm's Xcit constructor arguments that change the function computed (the drop rates only change training).
TIMM_MODEL_ARGS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "cls_attn_layers",
    "use_pos_embed",
    "eta",
    "tokens_norm",
    "global_pool",
    "num_classes",
)
# The fields that must equal a named model's for timm's model of that name to be the same function.
NAMED_SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "cls_attn_layers", "tokens_norm")
TORCH_MISSING = (
    'Writing {file} needs PyTorch, which is not installed: `pip install -e ".[torch]"`, or pass --safetensors '
    "(written without PyTorch)."
)


def export_weights(
    weights: PathLike, out: PathLike, layout: str = "timm", safetensors: bool = False, use_ema: bool = False
) -> Path:
    """Export the weights at `weights` (converted weights, a run's workdir, checkpoints/ or a step directory; the
    EMA copy with use_ema) to the new directory `out`, in `layout` ("timm" or "official"); returns it.

    Raises FileExistsError if `out` exists; FileNotFoundError if `weights` holds no weights; ConfigError for an
    architecture the layout cannot hold (official with a non-linear QKV embedding or global_pool "avg"), weights
    without a recorded architecture, or weights that do not fit theirs; ImportError for a .pth file without torch.
    Everything is written to a temporary directory renamed to `out` at the end, so a failure leaves no `out`.
    """
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new output directory or remove it first.")
    check_request(layout, safetensors)
    loaded = read_weights(weights, use_ema=use_ema)
    architecture = exportable_architecture(loaded.architecture, layout, weights)
    check_fits(loaded.variables, architecture)
    state_dict = to_state_dict(loaded.variables, layout)
    export = Export(
        layout,
        SAFETENSORS_FILE if safetensors else TORCH_FILE,
        architecture,
        models.count_params(loaded.variables["params"]),
        timm_model_name(architecture),
        use_ema,
    )
    config = hub_config(export, loaded.class_names)
    card = model_card(provenance(weights), export)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_state_dict(staging / export.weights_file, state_dict, layout)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (staging / CARD_FILE).write_text(card)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_request(layout: str, safetensors: bool) -> None:
    """Before anything is read: ConfigError for an unknown layout or the official one as .safetensors (its code
    reads a torch.save({'model': ...}) file), ImportError for a .pth file without torch."""
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown format {layout!r}: choose one of {LAYOUTS}.")
    if safetensors and layout == "official":
        raise ConfigError("The official layout is a torch.save({'model': ...}) file: export it without --safetensors.")
    if not safetensors and importlib.util.find_spec("torch") is None:
        raise ImportError(TORCH_MISSING.format(file=TORCH_FILE))


def exportable_architecture(architecture: dict[str, Any] | None, layout: str, weights: PathLike) -> dict[str, Any]:
    """The stored architecture, checked against what `layout` can hold; ConfigError naming what cannot."""
    if architecture is None:
        raise ConfigError(
            f"{weights} records no architecture (no model.json beside the run's checkpoints), and the PyTorch "
            "model cannot be built without it: export a run directory that has its model.json, or weights written "
            "by python -m qkv_vit.convert."
        )
    models.check_xcit_architecture(architecture, str(weights))
    if layout == "official" and architecture.get("qkv_embed", "linear") != "linear":
        raise ConfigError(
            f"The official XCiT code has no {architecture['qkv_embed']} QKV embedding: export with --format timm "
            "(qkv_vit/torch_xcit.py loads it)."
        )
    if layout == "official" and architecture.get("global_pool", "token") != "token":
        raise ConfigError("The official XCiT code pools the class token only: export with --format timm.")
    return architecture


def check_fits(variables: dict[str, Any], architecture: dict[str, Any]) -> None:
    """ConfigError naming the variables that differ from the architecture's (from shapes: nothing allocated)."""
    model = models.from_architecture(models.architecture_from_json(architecture))
    expected = flatten(models.init_shapes(model, image_size=model.patch_size))
    found = flatten({collection: variables.get(collection, {}) for collection in ("params", "batch_stats")})
    differ = sorted(
        "/".join(path)
        for path in set(expected) | set(found)
        if path not in expected or path not in found or np.shape(found[path]) != tuple(expected[path].shape)
    )
    if differ:
        raise ConfigError(
            f"The weights do not fit their recorded architecture ({len(differ)} variables differ: "
            f"{', '.join(differ[:10])}{' ...' if len(differ) > 10 else ''}); nothing was exported. Check that the "
            "model.json beside the checkpoints is the run's own, or export converted weights instead."
        )


def timm_model_name(architecture: dict[str, Any]) -> str | None:
    """timm's name of the named model (xcit_nano_12_p16_224) whose function this architecture computes, for XCiT's
    linear embedding; None for another shape or a non-linear embedding."""
    if architecture.get("qkv_embed", "linear") != "linear":
        return None
    for name, named in models.MODEL_CONFIGS.items():
        if all(getattr(models.XCiT(**named), field) == architecture.get(field) for field in NAMED_SHAPE_FIELDS):
            return f"{name}_224"
    return None


def torch_xcit_args(architecture: dict[str, Any]) -> dict[str, Any]:
    """qkv_vit/torch_xcit.py's Xcit(**args) for an architecture (its constructor_args, without importing torch)."""
    return {key: value for key, value in architecture.items() if key not in TRAINING_ONLY_FIELDS}


def hub_config(export: Export, class_names: list[str] | None) -> dict[str, Any]:
    """config.json: timm's hub config (its `local-dir:` loader builds "architecture" with "model_args"; present
    for XCiT's linear embedding only, which timm has), and under "qkv_vit" the layout, the weights file, the
    architecture and torch_xcit's constructor arguments. Input size and normalization are left to the card: a
    converted model's are unknown."""
    arch = export.architecture
    config: dict[str, Any] = {}
    if arch.get("qkv_embed", "linear") == "linear":
        config["architecture"] = export.timm_model or f"xcit_nano_12_p{arch['patch_size']}_224"
        config["model_args"] = {key: arch[key] for key in TIMM_MODEL_ARGS if key in arch}
        config["pretrained_cfg"] = {"num_classes": arch["num_classes"], "classifier": "head"}
    config.update(num_classes=arch["num_classes"], num_features=arch["embed_dim"], global_pool=arch["global_pool"])
    if class_names:
        config["label_names"] = list(class_names)
    config["qkv_vit"] = {
        "format": export.layout,
        "weights": export.weights_file,
        "timm_model": export.timm_model,
        "ema": export.use_ema,
        "architecture": arch,
        "torch_xcit": torch_xcit_args(arch),
    }
    return config


def write_state_dict(path: Path, state_dict: dict[str, np.ndarray], layout: str) -> None:
    """A .safetensors file (written with numpy only) or a torch.save file ({'model': ...} for the official layout)."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({key: np.ascontiguousarray(value) for key, value in state_dict.items()}, str(path))
        return
    import torch

    tensors = {key: torch.tensor(value) for key, value in state_dict.items()}  # copies: arrays may be read-only
    torch.save({OFFICIAL_CHECKPOINT_KEY: tensors} if layout == "official" else tensors, path)
