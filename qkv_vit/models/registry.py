"""The named XCiT models of the reference (timm / facebookresearch/xcit) and `create(name, **overrides)`."""

import dataclasses
import typing
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.config_rules import closest_key
from qkv_vit.models.xcit import XCiT

# (embed_dim, depth, num_heads, eta, tokens_norm) per size, as in the reference's model functions.
_SIZES = {
    "nano_12": (128, 12, 4, 1.0, False),
    "tiny_12": (192, 12, 4, 1.0, True),
    "tiny_24": (192, 24, 4, 1e-5, True),
    "small_12": (384, 12, 8, 1.0, True),
    "small_24": (384, 24, 8, 1e-5, True),
    "medium_24": (512, 24, 8, 1e-5, True),
    "large_24": (768, 24, 16, 1e-5, True),
}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    f"xcit_{size}_p{patch}": dict(
        patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, eta=eta, tokens_norm=tokens_norm
    )
    for size, (dim, depth, heads, eta, tokens_norm) in _SIZES.items()
    for patch in (16, 8)
}


# The paper's configurations as shortcuts, with the hidden width h relative to the token width d so that
# they carry over between sizes. For XCiT-N12/16 (d=128): sne h=64 and psne h=96 match the baseline's
# 3.05M, fsne_m8 (h=128) is the abstract's 2.9M model, fsne_m8_wide (h=192) its 3.1M one. Code size 16
# is the paper's best for tiny (d=192).
QKV_PRESETS: dict[str, tuple[dict[str, Any], float]] = {
    "linear": (dict(qkv_embed="linear"), 1.0),
    "sne": (dict(qkv_embed="sne"), 0.5),
    "psne": (dict(qkv_embed="psne", shared_layer="first"), 0.75),
    "psne_second": (dict(qkv_embed="psne", shared_layer="second"), 0.75),
    "fsne_m8": (dict(qkv_embed="fsne", code_size=8), 1.0),
    "fsne_m8_wide": (dict(qkv_embed="fsne", code_size=8), 1.5),
    "fsne_m16": (dict(qkv_embed="fsne", code_size=16), 1.0),
}


# Other names a preset goes by: plain "fsne" is F-SNE with m=8 (a code_size option given beside it wins).
QKV_PRESET_ALIASES = {"fsne": "fsne_m8"}


def qkv_preset(preset: str, embed_dim: int) -> dict[str, Any]:
    """The XCiT options of a named QKV configuration (or an alias of one) for a given token width."""
    preset = QKV_PRESET_ALIASES.get(preset, preset)
    if preset not in QKV_PRESETS:
        raise ValueError(
            f"Unknown QKV preset {preset!r}.{closest(preset, QKV_PRESETS)} Known presets: "
            f"{', '.join([*QKV_PRESETS, *QKV_PRESET_ALIASES])}."
        )
    options, hidden_ratio = QKV_PRESETS[preset]
    if options["qkv_embed"] == "linear":
        return dict(options)
    return {**options, "qkv_hidden_dim": int(round(embed_dim * hidden_ratio))}


def list_models() -> list[str]:
    """Named models, smallest first."""
    return list(MODEL_CONFIGS)


def architecture_fields() -> dict[str, Any]:
    """XCiT's constructor arguments and their types (`int | None` for optional ones), in declaration order."""
    hints = typing.get_type_hints(XCiT)
    return {f.name: hints[f.name] for f in dataclasses.fields(XCiT) if f.init and f.name not in ("parent", "name")}


def architecture(name: str, qkv: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The architecture of a named model: XCiT's constructor arguments, with a QKV preset and overrides applied
    in that order (XCiT(**architecture(...)) is the model). ValueError for an unknown name, preset or option."""
    if name not in MODEL_CONFIGS:
        raise ValueError(
            f"Unknown model {name!r}.{closest(name, list_models())} Known models: {', '.join(list_models())}."
        )
    fields = architecture_fields()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown XCiT option(s) {unknown} for {name}.{closest(unknown[0], fields)} "
            f"Valid options: {', '.join(sorted(fields))}."
        )
    config = dict(MODEL_CONFIGS[name])
    if qkv:  # h relative to the width the model will have, an overridden embed_dim included
        config.update(qkv_preset(qkv, overrides.get("embed_dim", config["embed_dim"])))
    return {**config, **overrides}


def architecture_of(model: XCiT) -> dict[str, Any]:
    """A model's constructor arguments as JSON values (the compute dtype by name, e.g. "float32"), as model.json
    and converted weights store them; XCiT(**architecture_from_json(...)) rebuilds the model."""
    fields = {name: getattr(model, name) for name in architecture_fields()}
    return {**fields, "dtype": jnp.dtype(model.dtype).name}


def architecture_from_json(stored: dict[str, Any]) -> dict[str, Any]:
    """XCiT's constructor arguments from stored JSON: the dtype's name back to a dtype; keys XCiT does not know
    (written by another version) dropped; a dtype that is not a name (older model.json files) left out."""
    fields = architecture_fields()
    options = {key: value for key, value in stored.items() if key in fields and key != "dtype"}
    dtype = stored.get("dtype")
    if isinstance(dtype, str) and dtype in ("float32", "bfloat16", "float16"):
        options["dtype"] = jnp.dtype(dtype)
    return options


def closest(name: str, choices: Any) -> str:
    """ " Did you mean 'x'?" for the nearest valid name (config_rules.closest_key, as for config keys), or ""
    when none is close."""
    match = closest_key(name, list(choices))
    return f" Did you mean {match!r}?" if match else ""


def create(name: str, qkv: str | None = None, **overrides: Any) -> XCiT:
    """Build a named model, e.g. create('xcit_nano_12_p16', qkv='fsne_m8', num_classes=10).

    `qkv` names a QKV_PRESETS entry; single options (qkv_embed, code_size, ...) can also be overridden.
    """
    return XCiT(**architecture(name, qkv, **overrides))


def init_shapes(model: nn.Module, image_size: int = 224) -> dict:
    """Abstract variables (shapes and dtypes only, nothing allocated) of a model for one image size."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape, images.dtype)))


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs (e.g. variables['params'])."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def param_count(model: nn.Module, image_size: int = 224) -> int:
    """Trainable parameters of a model (BatchNorm running statistics are not counted, as in the reference)."""
    return count_params(init_shapes(model, image_size)["params"])
