"""Reading PyTorch XCiT weights into a flat {timm key: float32 numpy array} state dict.

Both layouts in the wild are accepted: timm's (`pos_embed.*`, class attention with separate q/k/v) and the
official facebookresearch/xcit one (`{'model': state_dict}`, `pos_embeder.*`, class attention with one fused
`qkv`), which is rewritten to timm's keys here.
"""

import argparse
import re
from pathlib import Path

import numpy as np

StateDict = dict[str, np.ndarray]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TORCH_MISSING_MESSAGE = (
    "Reading {path} needs PyTorch, which is not installed. Install the extra with "
    "`pip install -e \".[torch]\"` (or `pip install torch`; on a CPU-only machine "
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu`). "
    ".safetensors files are read without PyTorch."
)


def read_state_dict(path: str | Path) -> StateDict:
    """Read a .safetensors or .pth/.pt file and return its weights in timm's key layout, as float32 numpy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        raw = read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        raw = read_torch_file(path)
    else:
        raise ValueError(
            f"Unsupported weights file {path.name}: expected one of {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}."
        )
    return to_timm_layout(raw)


def read_safetensors(path: Path) -> StateDict:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def read_torch_file(path: Path) -> StateDict:
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_MISSING_MESSAGE.format(path=path)) from None
    # weights_only refuses arbitrary pickled code; official training checkpoints also pickle their argparse args.
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = unwrap_checkpoint(checkpoint, path)
    return {
        key: value.detach().to(torch.float32).numpy()
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    }


def unwrap_checkpoint(checkpoint: object, path: Path) -> dict:
    """The state dict inside a checkpoint: the official `{'model': ...}`, a `{'state_dict': ...}` or bare."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict.")
    for wrapper_key in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper_key), dict):
            return checkpoint[wrapper_key]
    return checkpoint


def to_timm_layout(state_dict: StateDict) -> StateDict:
    """Strip DDP prefixes, drop integer buffers, rename `pos_embeder`, split fused class-attention qkv."""
    out: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
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
