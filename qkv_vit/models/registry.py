"""The named XCiT models of the reference (timm / facebookresearch/xcit), `create(name, **overrides)`, and the
layers each `layer_impl` builds them from."""

import dataclasses
import typing
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkv_vit.config_rules import closest_key
from qkv_vit.errors import ConfigError
from qkv_vit.models import cpu_kernels, layers
from qkv_vit.models.layers import ModuleDef
from qkv_vit.models.xcit import XCiT


@dataclasses.dataclass(frozen=True)
class OnCPUBackend:
    """A layer that is `cpu` on a CPU backend and `other` on any other, chosen each time the model builds the
    layer (in `init`/`apply`), not when the model is built: asking JAX for its backend starts it, and a program
    must be able to build its model before jax.distributed.initialize, which has to come before any backend.

    That is right where a model runs on the default backend (a notebook's model.apply). A program built for
    other devices (a TPU slice compiled on a CPU host) resolves the choice from them first: for_platform."""

    cpu: ModuleDef
    other: ModuleDef

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.cpu if jax.default_backend() == "cpu" else self.other)(*args, **kwargs)


# XCiT's layer fields and what each `layer_impl` fills them with: flax's standard layers (differentiated by JAX:
# what XLA fuses on GPU and TPU, and what forward-mode autodiff goes through), models/cpu_kernels.py's
# (hand-written gradients and 2-d matmuls, faster on XLA's CPU backend), or "auto": cpu_kernels' on a CPU
# backend, flax's elsewhere. The same parameters and statistics either way, so checkpoints and converted
# weights load under each.
_FLAX_AND_CPU_LAYERS: dict[str, tuple[ModuleDef, ModuleDef]] = {
    "dense_layer": (layers.dense, cpu_kernels.dense),
    "norm_layer": (layers.layer_norm, cpu_kernels.LayerNorm),
    "depthwise_conv_layer": (layers.depthwise_conv3x3, cpu_kernels.DepthwiseConv3x3),
    "batch_norm_layer": (layers.BatchNorm, cpu_kernels.BatchNorm),
    "token_layout": (layers.tokens_as_they_are, cpu_kernels.token_matrix),
}
LAYERS: dict[str, dict[str, ModuleDef]] = {
    "auto": {field: OnCPUBackend(cpu, flax) for field, (flax, cpu) in _FLAX_AND_CPU_LAYERS.items()},
    "flax": {field: flax for field, (flax, _) in _FLAX_AND_CPU_LAYERS.items()},
    "cpu": {field: cpu for field, (_, cpu) in _FLAX_AND_CPU_LAYERS.items()},
}
LAYER_IMPLS = tuple(LAYERS)
DEFAULT_LAYER_IMPL = "auto"


def layer_fields(layer_impl: str) -> dict[str, ModuleDef]:
    """XCiT's layer fields (dense_layer, norm_layer, ...) for a `layer_impl`; ValueError for an unknown one."""
    if layer_impl not in LAYERS:
        raise ValueError(f"Unknown layer_impl {layer_impl!r}: choose one of {LAYER_IMPLS}.")
    return dict(LAYERS[layer_impl])


def for_platform(model: XCiT, platform: str) -> XCiT:
    """The model with layer_impl "auto" resolved for devices of `platform` ("cpu", "gpu", "tpu"): the CPU kernels
    on "cpu", flax's layers elsewhere; a model with other layers is returned as it is."""
    if layer_impl_of(model, strict=False) != "auto":
        return model
    return model.clone(**layer_fields("cpu" if platform == "cpu" else "flax"))


def layer_impl_of(model: XCiT, strict: bool = True) -> str | None:
    """The `layer_impl` whose layers a model has; for layers no name stands for, ValueError (None if not `strict`)."""
    for layer_impl, fields in LAYERS.items():
        if all(getattr(model, field) == layer for field, layer in fields.items()):
            return layer_impl
    if not strict:
        return None
    raise ValueError(f"The model's layers are none of layer_impl {LAYER_IMPLS}: they cannot be recorded by name.")


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
    """The options that make an XCiT and their types (`int | None` for optional ones), in XCiT's declaration
    order: its constructor arguments, with `layer_impl` (str) where the layer fields it stands for are."""
    hints = typing.get_type_hints(XCiT)
    fields = {}
    for field in dataclasses.fields(XCiT):
        if field.name in _FLAX_AND_CPU_LAYERS:
            fields["layer_impl"] = str
        elif field.init and field.name not in ("parent", "name"):
            fields[field.name] = hints[field.name]
    return fields


def architecture(name: str, qkv: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The architecture of a named model: the options of architecture_fields, with a QKV preset and overrides
    applied in that order (from_architecture(architecture(...)) is the model). ValueError for an unknown name,
    preset or option."""
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
    """A model's architecture as JSON values (the compute dtype and the layers by name: "float32", "auto"), as
    model.json and converted weights store them; from_architecture(architecture_from_json(...)) rebuilds it (with
    the layers of "auto")."""
    named = {"layer_impl": layer_impl_of(model), "dtype": jnp.dtype(model.dtype).name}
    return {name: named[name] if name in named else getattr(model, name) for name in architecture_fields()}


def architecture_from_json(stored: dict[str, Any]) -> dict[str, Any]:
    """XCiT's constructor arguments from a stored architecture (architecture_of's JSON), so that
    `XCiT(**architecture_from_json(stored))` is the model the weights belong to: the dtype's name back to a dtype;
    `layer_impl` left out (it says how the layers were computed, not what: from_architecture chooses them, "auto"
    unless told); keys XCiT does not know (written by another version) dropped; a dtype that is not a name left
    out. ConfigError for another family's architecture (a RegNet teacher's `{"family": "regnet", ...}`).
    """
    check_xcit_architecture(stored)
    fields = architecture_fields()
    options = {key: value for key, value in stored.items() if key in fields and key not in ("dtype", "layer_impl")}
    dtype = stored.get("dtype")
    if isinstance(dtype, str) and dtype in ("float32", "bfloat16", "float16"):
        options["dtype"] = jnp.dtype(dtype)
    return options


def check_xcit_architecture(stored: dict[str, Any] | None, where: str = "The weights") -> None:
    """ConfigError where a stored architecture is another family's: a converted RegNet is a distillation teacher,
    nothing this project trains, evaluates or exports as XCiT."""
    family = (stored or {}).get("family", "xcit")
    if family != "xcit":
        raise ConfigError(
            f"{where}: a {family} model ({stored.get('name')}), not an XCiT; give XCiT weights here, and use "
            "another family's weights only as a distillation teacher (config.distillation.teacher_path)."
        )


def closest(name: str, choices: Any) -> str:
    """ " Did you mean 'x'?" for the nearest valid name (config_rules.closest_key, as for config keys), or ""
    when none is close."""
    match = closest_key(name, list(choices))
    return f" Did you mean {match!r}?" if match else ""


def create(name: str, qkv: str | None = None, **overrides: Any) -> XCiT:
    """Build a named model, e.g. create('xcit_nano_12_p16', qkv='fsne_m8', num_classes=10).

    `qkv` names a QKV_PRESETS entry; single options (qkv_embed, code_size, ...) can also be overridden;
    `layer_impl` ("auto", "flax" or "cpu") chooses the layers.
    """
    return from_architecture(architecture(name, qkv, **overrides))


def from_architecture(options: dict[str, Any]) -> XCiT:
    """The XCiT of an architecture (the options of architecture_fields): its `layer_impl` (default "auto")
    chooses the layer fields, here and only here."""
    fields = {name: value for name, value in options.items() if name != "layer_impl"}
    return XCiT(**fields, **layer_fields(options.get("layer_impl", DEFAULT_LAYER_IMPL)))


def init_shapes(model: nn.Module, image_size: int = 224) -> dict:
    """Abstract variables (shapes and dtypes only, nothing allocated) of a model for one image size."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape, images.dtype)))


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs. A model's trainable parameters (BatchNorm's
    running statistics not counted, as in the reference): count_params(init_shapes(model)["params"])."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
