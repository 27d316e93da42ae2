"""Loading timm RegNet weights (e.g. DeiT's regnety_160-a5fe301d.pth, the distillation teacher) as Flax variables
of qkv_vit.models.regnet.RegNet, checked key by key and shape by shape, all or nothing.

timm's keys name our modules (`s1.b1.conv2.conv.weight` -> params/s1/b1/conv2/conv/kernel): conv weights
(out, in / groups, kh, kw) become (kh, kw, in / groups, out) kernels, the head's Linear (out, in) an (in, out)
kernel, BatchNorm weight/bias its scale/bias and running_mean/running_var batch_stats mean/var. Files are read
as for XCiT (state_dict.read_weights_file: .safetensors, .pth/.pt, checkpoint dicts such as DeiT's
{'model': state_dict}, `module.` / `_orig_mod.` prefixes, one prefix every key shares).
"""

import re
from pathlib import Path
from typing import Any

import numpy as np

from qkv_vit.convert import mapping
from qkv_vit.convert.loading import WeightMismatchError, check_match
from qkv_vit.convert.mapping import FlaxPath
from qkv_vit.convert.state_dict import (
    CHECKPOINT_KEYS,
    WRAPPER_COMPONENTS,
    StateDict,
    read_weights_file,
    shown,
    strip_wrappers,
)
from qkv_vit.models import regnet
from qkv_vit.tree import flatten, unflatten

REGNET_KEYS = ("stem.conv.weight", "s1.b1.conv1.conv.weight")  # keys every timm RegNet state dict has


def regnet_layout(raw: StateDict) -> StateDict:
    """A state dict as the bare timm RegNet names it (wrapper prefixes stripped), without integer buffers
    (num_batches_tracked), float32 numpy."""
    return {
        key: np.asarray(value, dtype=np.float32)
        for key, value in strip_wrappers(raw, anchor=REGNET_KEYS[0]).items()
        if not key.endswith("num_batches_tracked")
    }


def is_regnet_state_dict(state_dict: StateDict) -> bool:
    """Whether a state dict (regnet_layout's keys) holds timm RegNet weights."""
    return all(key in state_dict for key in REGNET_KEYS)


def not_regnet_message(name: str, top_level_keys: list[str], weight_keys: list[str]) -> str:
    """What a file that holds no RegNet weights holds instead, and what was expected."""
    found = f"its top-level keys are {shown(top_level_keys)}"
    if weight_keys and weight_keys != top_level_keys:
        found += f"; the weights found inside are {shown(weight_keys)}"
    return (
        f"{name} is not a timm RegNet checkpoint: expected the keys {' and '.join(REGNET_KEYS)} (after removing "
        f"the wrapper prefixes {', '.join(c + '.' for c in WRAPPER_COMPONENTS)}, and weights kept under "
        f"{', '.join(CHECKPOINT_KEYS)}), but {found}."
    )


def read_regnet_state_dict(path: str | Path) -> StateDict:
    """The timm RegNet weights of a .safetensors or .pth/.pt file as {timm key: float32 array}.

    FileNotFoundError for a missing file; ValueError for one that holds no RegNet weights (naming what it holds),
    an unsupported, damaged or unsafe one; ImportError for a .pth file without PyTorch installed."""
    raw, top_level_keys = read_weights_file(path)
    state_dict = regnet_layout(raw)
    if not is_regnet_state_dict(state_dict):
        raise ValueError(not_regnet_message(Path(path).name, top_level_keys, list(raw)))
    return state_dict


def read_if_regnet(path: str | Path) -> StateDict | None:
    """The timm RegNet weights of a file as read_regnet_state_dict gives them, or None if it holds other weights
    (XCiT's); raises as read_weights_file for a file that cannot be read."""
    state_dict = regnet_layout(read_weights_file(path)[0])
    return state_dict if is_regnet_state_dict(state_dict) else None


def flax_path(key: str) -> FlaxPath:
    """Where a timm RegNet key lives in our variables, e.g. s1.b1.conv2.bn.running_var -> batch_stats/s1/b1/conv2/
    bn/var, head.fc.weight -> params/head/fc/kernel."""
    *modules, leaf = key.split(".")
    if leaf in ("running_mean", "running_var"):
        return ("batch_stats", *modules, leaf.removeprefix("running_"))
    if leaf == "weight":
        leaf = "scale" if modules and modules[-1] == "bn" else "kernel"
    return ("params", *modules, leaf)


def flax_array(key: str, value: np.ndarray) -> np.ndarray:
    """PyTorch conv (out, in / groups, kh, kw) -> Flax (kh, kw, in / groups, out); Linear (out, in) -> (in, out)."""
    if not key.endswith(".weight") or value.ndim == 1:
        return value
    return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def structure(state_dict: StateDict) -> tuple:
    """What a state dict's shapes say of its configuration: (stem width, SE or not, per stage (width, blocks,
    group width)); the same as config_structure of its RegNetCfg when they match."""
    stages = []
    for stage in range(1, regnet.NUM_STAGES + 1):
        blocks = sum(bool(re.fullmatch(rf"s{stage}\.b\d+\.conv3\.conv\.weight", key)) for key in state_dict)
        first = f"s{stage}.b1."
        if not blocks or first + "conv2.conv.weight" not in state_dict:
            return ()
        width = int(state_dict[first + "conv3.conv.weight"].shape[0])
        stages.append((width, blocks, int(state_dict[first + "conv2.conv.weight"].shape[1])))
    return (int(state_dict["stem.conv.weight"].shape[0]), "s1.b1.se.fc1.weight" in state_dict, tuple(stages))


def config_structure(cfg: regnet.RegNetCfg) -> tuple:
    """structure()'s tuple for a RegNetCfg."""
    stages = []
    for spec in regnet.stage_specs(cfg):
        bottleneck = int(round(spec.width * spec.bottle_ratio))
        stages.append((spec.width, spec.depth, bottleneck // (bottleneck // spec.group_size)))
    return (cfg.stem_width, bool(cfg.se_ratio), tuple(stages))


def infer_regnet_architecture(state_dict: StateDict) -> dict[str, Any]:
    """The architecture ({"family": "regnet", "name", "num_classes"}) of the named RegNet whose stage widths,
    depths and group widths the weights have; num_classes from head.fc.weight (0 without a head). ValueError if
    they are no RegNet's, or no named RegNet (REGNET_CONFIGS) has that structure."""
    if not is_regnet_state_dict(state_dict):
        raise ValueError(not_regnet_message("The state dict", list(state_dict), []))
    found = structure(state_dict)
    head = state_dict.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    for name, cfg in regnet.REGNET_CONFIGS.items():
        if config_structure(cfg) == found:
            return {"family": regnet.FAMILY, "name": name, "num_classes": num_classes}
    raise ValueError(
        f"The RegNet weights (stem width, SE, per stage (width, blocks, group width): {found}) match no named RegNet "
        f"({', '.join(regnet.REGNET_CONFIGS)}); pass --model to name the one they should be."
    )


def regnet_variables(
    state_dict: StateDict, model: regnet.RegNet | None = None, source_name: str = "The state dict"
) -> dict[str, Any]:
    """Flax variables {'params', 'batch_stats'} (float32 numpy) of `model` from a timm RegNet state dict
    (regnet_layout's keys); without `model`, the named RegNet the shapes match (infer_regnet_architecture).

    All or nothing: missing, unexpected or wrongly shaped keys raise WeightMismatchError naming each of them."""
    model = model or regnet.from_architecture(infer_regnet_architecture(state_dict))
    arrays, sources = mapping.to_flax_variables(state_dict, flax_path, flax_array)
    expected = flatten(regnet.init_shapes(model, image_size=32))  # shapes do not depend on the image size
    try:
        check_match(arrays, sources, expected, source_name, model)
    except WeightMismatchError as error:
        try:
            holds = f"the weights are those of {infer_regnet_architecture(state_dict)['name']}"
        except ValueError:
            holds = "the weights match no named RegNet"
        raise WeightMismatchError(
            f"{error}\n  The model is {model.config_name} with {model.num_classes} classes; {holds}."
        ) from None
    return unflatten(arrays)


def load_regnet_weights(path: str | Path, model: regnet.RegNet | None = None) -> dict[str, Any]:
    """Read timm RegNet weights (.safetensors, .pth/.pt; DeiT's {'model': state_dict} included) as Flax variables
    of `model` (default: the named RegNet they match), for `model.apply(variables, images)`.

    Raises as read_regnet_state_dict (FileNotFoundError, ValueError, ImportError) and as regnet_variables
    (WeightMismatchError naming every missing, unexpected or wrongly shaped key)."""
    return regnet_variables(read_regnet_state_dict(path), model, Path(path).name)
