"""Reading PyTorch XCiT weights into a flat {timm key: float32 numpy array} state dict.

Both layouts in the wild are accepted: timm's (`pos_embed.*`, class attention with separate q/k/v) and the
official facebookresearch/xcit one (`{'model': state_dict}`, `pos_embeder.*`, class attention with one fused
`qkv`), which is rewritten to timm's keys here. Weights saved from a wrapped model are unwrapped: the key
prefixes of DistributedDataParallel / DataParallel / DeepSpeed (`module.`) and torch.compile (`_orig_mod.`),
in any combination, and one prefix that every key shares in front of XCiT's own names (`model.` of a
Lightning module, `backbone.`, ...); checkpoint dicts keep the weights under `model`, `state_dict`,
`model_state_dict` or `module`.
"""

import argparse
import pathlib
import re
from pathlib import Path

import numpy as np

from qkv_vit.errors import describe_cause

StateDict = dict[str, np.ndarray]

WRAPPER_COMPONENTS = ("module", "_orig_mod")  # nn.parallel / DeepSpeed wrappers, torch.compile's OptimizedModule
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "module")  # where training checkpoints keep weights
XCIT_KEYS = ("cls_token", "blocks.0.attn.temperature")  # keys every XCiT state dict has (timm and official)
SHOWN_KEYS = 6

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TORCH_MISSING_MESSAGE = (
    "Reading {path} needs PyTorch, which is not installed. Install the extra with "
    '`pip install -e ".[torch]"` (or `pip install torch`; on a CPU-only machine '
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu`). "
    ".safetensors files are read without PyTorch."
)


def read_state_dict(path: str | Path) -> StateDict:
    """Read a .safetensors or .pth/.pt file and return its weights in timm's key layout, as float32 numpy."""
    path = Path(path)
    raw, top_level_keys = read_weights_file(path)
    state_dict = to_timm_layout(raw)
    if not all(key in state_dict for key in XCIT_KEYS):
        raise ValueError(not_xcit_message(path.name, top_level_keys, list(raw)))
    return state_dict


def read_weights_file(path: str | Path) -> tuple[StateDict, list[str]]:
    """(the weights of a .safetensors or .pth/.pt file, the file's top-level keys), whatever model they are of:
    a checkpoint dict unwrapped (CHECKPOINT_KEYS), the keys as stored (wrapper prefixes kept: strip_wrappers),
    of a .pth file only the floating-point tensors. FileNotFoundError, ValueError for an unsupported, damaged or
    unsafe file, ImportError for a .pth file without PyTorch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        raw = read_safetensors(path)
        top_level_keys = list(raw)
    elif path.suffix in TORCH_SUFFIXES:
        raw, top_level_keys = read_torch_file(path)
    else:
        raise ValueError(
            f"Unsupported weights file {path.name}: expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}."
        )
    return raw, top_level_keys


def not_xcit_message(name: str, top_level_keys: list[str], weight_keys: list[str]) -> str:
    """What a file that holds no XCiT weights holds instead, and what was expected."""
    found = f"its top-level keys are {shown(top_level_keys)}"
    if weight_keys and weight_keys != top_level_keys:
        found += f"; the weights found inside are {shown(weight_keys)}"
    return (
        f"{name} is not an XCiT checkpoint: expected the timm or official XCiT keys {' and '.join(XCIT_KEYS)} "
        f"(after removing the wrapper prefixes {', '.join(c + '.' for c in WRAPPER_COMPONENTS)}, and weights "
        f"kept under {', '.join(CHECKPOINT_KEYS)}), but {found}."
    )


def shown(keys: list[str]) -> str:
    listed = ", ".join(str(key) for key in keys[:SHOWN_KEYS])
    return f"[{listed}{', ...' if len(keys) > SHOWN_KEYS else ''}] ({len(keys)} in all)" if keys else "none"


# What training checkpoints pickle beside their weights that loading without running code may accept: XCiT's
# argparse arguments, and the paths in a Lightning checkpoint's hyper-parameters.
SAFE_GLOBALS = (
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
)


def read_safetensors(path: Path) -> StateDict:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as error:  # safetensors raises its own SafetensorError for a bad header or a cut file
        raise ValueError(
            f"{path} cannot be read as a .safetensors file ({describe_cause(error)}): it is damaged or "
            "cut short; download or save it again."
        ) from None


def read_torch_file(path: Path) -> tuple[StateDict, list[str]]:
    """(the floating-point tensors of the state dict inside, the file's own top-level keys)."""
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_MISSING_MESSAGE.format(path=path)) from None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):  # weights_only: no pickled code is run
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickled module or other object, a cut or damaged file: many types
        raise ValueError(
            f"{path} cannot be read as PyTorch weights without running code it holds ({describe_cause(error)}). If "
            "it is a whole model or a checkpoint with other Python objects, and you trust it, load it with "
            "torch.load(path, weights_only=False) and save only the weights: torch.save(model.state_dict(), "
            "'weights.pth'). If it is cut short or damaged, download or save it again."
        ) from None
    state_dict = unwrap_checkpoint(checkpoint, path)
    tensors = {
        key: value.detach().to(torch.float32).numpy()
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    }
    return tensors, [str(key) for key in checkpoint]


def unwrap_checkpoint(checkpoint: object, path: Path) -> dict:
    """The state dict inside a checkpoint: the official `{'model': ...}`, `{'state_dict': ...}` (Lightning),
    `{'model_state_dict': ...}`, `{'module': ...}` (DeepSpeed) or a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict.")
    for wrapper_key in CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(wrapper_key), dict):
            return checkpoint[wrapper_key]
    return checkpoint


def strip_wrappers(state_dict: StateDict, anchor: str = XCIT_KEYS[0]) -> StateDict:
    """Keys as the bare model names them: without `module.` / `_orig_mod.` components, nor a prefix all keys share.

    `_orig_mod` (torch.compile) is never a real module name and goes wherever it is; `module` goes where it
    leads a key. A model inside another (`model.`, `backbone.`) leaves a prefix in front of `anchor` (a key the
    bare model has: XCiT's `cls_token` unless told); it is removed when every key has it, so nothing of the
    outer model is loaded by mistake.
    """

    def bare(key: str) -> str:
        parts = [part for part in key.split(".") if part != "_orig_mod"]
        while len(parts) > 1 and parts[0] in WRAPPER_COMPONENTS:
            parts = parts[1:]
        return ".".join(parts)

    stripped = {bare(key): value for key, value in state_dict.items()}
    if anchor not in stripped:
        prefixes = {key[: -len(anchor)] for key in stripped if key.endswith("." + anchor)}
        if len(prefixes) == 1 and all(key.startswith(next(iter(prefixes))) for key in stripped):
            prefix = prefixes.pop()
            stripped = {key.removeprefix(prefix): value for key, value in stripped.items()}
    return stripped


def to_timm_layout(state_dict: StateDict) -> StateDict:
    """Strip wrapper prefixes, drop integer buffers, rename `pos_embeder`, split fused class-attention qkv."""
    out: StateDict = {}
    for key, value in strip_wrappers(state_dict).items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("pos_embeder.", "pos_embed.", 1)
        fused = re.fullmatch(r"(cls_attn_blocks\.\d+\.attn)\.qkv\.(weight|bias)", key)
        if fused:
            prefix, leaf = fused.groups()
            for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
                out[f"{prefix}.{name}.{leaf}"] = part
            continue
        out[key] = np.asarray(value, dtype=np.float32)
    return out
