"""Defaults of a training run (each configs/*.py starts from base_config() and overrides a few fields), and the
checks a config passes before any work: its values' rules (check_config), then how they fit the devices, the model
and the mesh (check_fits).
"""

import contextlib
import logging
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from qkv_vit import config_rules as rules
from qkv_vit import data, models
from qkv_vit.errors import ConfigError
from qkv_vit.train import distillation, evaluators, optimizer, run_record, sharding
from qkv_vit.train.optimizer import OPTIMIZERS
from qkv_vit.train.target import Target

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # parameters stay float32 either way
NONFINITE_POLICIES = ("stop", "skip")  # a NaN/inf step: stop the run, or skip the update

# The XCiT options a config may set (config.model.*; None keeps the named model's value): every constructor
# argument of XCiT, read from the dataclass, but the two the run sets itself: num_classes (from the data, or
# config.data.num_classes) and dtype (config.compute_dtype).
MODEL_OPTIONS: dict[str, type] = {
    name: next(t for t in typing.get_args(kind) if t is not type(None)) if typing.get_args(kind) else kind
    for name, kind in models.architecture_fields().items()
    if name not in ("num_classes", "dtype")
}


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """A config file's argument string, big_vision style: "qkv=fsne_m8,epochs=100,runlocal" -> a ConfigDict
    (args.qkv or args["qkv"]).

    Without `spec` every value stays a string and a bare word means "true". With `spec`
    (name=default, or name=type for "no default", e.g. `depth=int`), only those names are accepted,
    values are converted to the default's type, and absent names get their default (None for a type).
    """
    items = [item for item in (arg or "").split(",") if item]
    given = dict(item.split("=", 1) if "=" in item else (item, "true") for item in items)
    if not spec:
        return ml_collections.ConfigDict(given)
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(
            f"Unknown config argument(s) {unknown}: use only the ones this config accepts, {', '.join(spec)}."
        )
    parsed = {}
    for name, default in spec.items():
        kind = default if isinstance(default, type) else type(default)
        if name not in given:
            parsed[name] = None if isinstance(default, type) else default
        elif default is None or kind is str:
            parsed[name] = given[name]
        else:
            parsed[name] = _convert(name, given[name], kind)
    return ml_collections.ConfigDict(parsed)


def _convert(name: str, value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in _BOOLEANS:
            raise ConfigError(
                f"Config argument {name}={value!r} is not a boolean; use {name}, {name}=true or {name}=false."
            )
        return _BOOLEANS[value.lower()]
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(
            f"Config argument {name}={value!r} is not a valid {kind.__name__}: give {name}= a value of type "
            f"{kind.__name__}."
        ) from None


def set_xcit_model(
    config: ml_collections.ConfigDict, model: str, qkv: str, code_size: int | None = None, hidden: int | None = None
) -> None:
    """A named XCiT (`nano_12_p16` or `xcit_nano_12_p16`) with a QKV embedding, as configs/imagenet.py takes it.

    `qkv` is a models.QKV_PRESETS name ("fsne": F-SNE with `code_size`, default 8, and h = d); `code_size`
    only goes with F-SNE; `hidden` sets the QKV hidden width h of a non-linear embedding.
    """
    name = model if model.startswith("xcit_") else f"xcit_{model}"
    if name not in models.MODEL_CONFIGS:
        sizes = ", ".join(n.removeprefix("xcit_") for n in models.MODEL_CONFIGS)
        raise ConfigError(f"Unknown model {model!r}; choose one of: {sizes}.")
    if qkv not in models.QKV_PRESETS and qkv not in models.QKV_PRESET_ALIASES:
        raise ConfigError(
            f"Unknown qkv={qkv!r}; choose fsne (with code_size=M) or one of: {', '.join(models.QKV_PRESETS)}."
        )
    if code_size is not None and not qkv.startswith("fsne"):
        raise ConfigError(
            f"code_size={code_size} only applies to F-SNE (qkv=fsne), not qkv={qkv}: leave code_size out, or set "
            "qkv=fsne."
        )
    if hidden is not None and qkv == "linear":
        raise ConfigError(
            "hidden= sets the hidden width of a non-linear QKV embedding, and qkv=linear has none: leave hidden= "
            "out, or choose a non-linear qkv such as fsne, sne or psne."
        )
    config.model_name = name
    config.qkv = qkv
    if code_size is not None:
        config.model.code_size = code_size
    if hidden is not None:
        config.model.qkv_hidden_dim = hidden


def refuse_with_runlocal(arg: str | None, names: Sequence[str]) -> None:
    """For a config file's `runlocal`: ConfigError where its argument string also gives one of `names`, which
    runlocal would override (its model size, batch or length): an argument the user gave is never silently
    replaced."""
    given = {item.partition("=")[0] for item in (arg or "").split(",") if item}
    clashes = [name for name in names if name in given]
    if clashes:
        raise ConfigError(
            "runlocal sets its own width, depth, batch and length (a 1-block width-32 model, batch 16, a few steps): "
            f"leave out {', '.join(f'{name}=' for name in clashes)} or runlocal."
        )


def shrink_for_local_run(
    config: ml_collections.ConfigDict, steps: int = 2, every: int | None = None, keep_data: bool = False
) -> None:
    """Every config's `runlocal` argument: the same recipe on a 1-block width-32 model, `steps` steps of batch 16,
    logging, evaluating and saving every `every` steps (default: at the end), on the offline digits unless
    `keep_data` (then on the config's own data, at 32x32).

    The augmentation preset, optimizer and model family stay, so a CPU exercises the config's own code
    path in seconds; only data source, sizes and run length change.
    """
    if not keep_data:
        augment, repeats = config.data.augment, config.data.repeated_augmentation
        # The digits through the config's own pipeline, which keeps its code path.
        config.data = data.get_config("small", source="digits", pipeline=config.data.pipeline)
        config.data.update(augment=augment, repeated_augmentation=repeats, shuffle_buffer=256)
    config.data.image_size = 32
    config.model.update(embed_dim=32, depth=1, num_heads=4, cls_attn_layers=1)
    if config.model.batch_norm_group_size:  # keep the grouped BatchNorm, in groups the small batch holds
        config.model.batch_norm_group_size = 8
    config.compute_dtype = "float32"
    config.global_batch_size = 16
    config.eval_batch_size = 128
    config.total_steps = steps
    config.optimizer.warmup_steps = 1
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = every or steps


# The rule of every key of base_config() (config.data has its own: qkv_vit.data.config.DATA_RULES). Model options
# are checked for their type here and for their range by the model itself (XCiT's validation, before any data).
OPTIMIZER_RULES = {
    "name": rules.text(OPTIMIZERS),
    "lr": rules.number(0.0),  # 0: parameters stay (evaluating a checkpoint through the trainer)
    "scale_lr_by_batch": rules.flag(),
    "warmup_epochs": rules.number(0.0),
    "warmup_steps": rules.integer(0, optional=True),
    "warmup_init_lr": rules.number(0.0),
    "min_lr": rules.number(0.0),
    "weight_decay": rules.number(0.0),
    "b1": rules.number(0.0, 1.0, high_open=True),
    "b2": rules.number(0.0, 1.0, high_open=True),
    "eps": rules.number(0.0, low_open=True),  # Adam divides by sqrt(v) + eps: 0 gives NaN where a gradient is 0
    "momentum": rules.number(0.0, 1.0, high_open=True),
    "nesterov": rules.flag(),
    "grad_clip_norm": rules.number(0.0),
    "accumulation_steps": rules.integer(1),
    "code_weight_decay": rules.flag(),
    "filter_bias_and_bn": rules.flag(),
    "layer_decay": rules.number(0.0, 1.0, low_open=True),  # 1.0: no layer-wise decay
}

DISTILLATION_RULES = {
    "type": rules.text(distillation.DISTILLATION_TYPES),
    "alpha": rules.number(0.0, 1.0),
    "tau": rules.number(0.0, low_open=True),
    "teacher_model": rules.text(),
    "teacher_path": rules.text(nonempty=True, optional=True),
}

RUN_RULES = {
    "model_name": rules.text(nonempty=True),
    "qkv": rules.text(),
    "model": {key: rules.of_type(kind, optional=True) for key, kind in MODEL_OPTIONS.items()},
    "compute_dtype": rules.text(tuple(COMPUTE_DTYPES)),
    "gradient_all_reduce_dtype": rules.text(tuple(COMPUTE_DTYPES)),
    "data": None,  # qkv_vit.data.validate_config: DATA_RULES and what each source needs
    "seed": rules.integer(0, 2**32 - 1),  # jax.random.PRNGKey keeps 32 bits: 2**32 would be seed 0 again
    "global_batch_size": rules.integer(1),
    "eval_batch_size": rules.integer(1, optional=True),
    "total_epochs": rules.number(0.0, low_open=True),
    "total_steps": rules.integer(1, optional=True),
    "optimizer": OPTIMIZER_RULES,
    "distillation": DISTILLATION_RULES,
    "ema_decay": rules.number(0.0, 1.0, high_open=True, optional=True),
    "nonfinite": rules.text(NONFINITE_POLICIES),
    "mesh": {"data": rules.integer(1, or_minus_one=True), "fsdp": rules.integer(1, or_minus_one=True)},
    "sharding": rules.text(sharding.SHARDING_STRATEGIES),
    "log_every_steps": rules.integer(1),
    "eval_every_steps": rules.integer(0),  # 0: only at the end
    # Metric names are <eval_name>/top1 and ema_<eval_name>/top1, beside train/*: a name must not collide with them.
    "eval_name": rules.text(nonempty=True, forbidden="/", reserved=("train", "ema_")),
    "evaluators": None,  # evaluators.validate_config: each evaluator's name, type and options
    "checkpoint_every_steps": rules.integer(0),  # 0: only at the end
    "keep_checkpoints": rules.integer(1, optional=True),  # None: keep all
    "async_checkpointing": rules.flag(),
    "init_from": rules.text(nonempty=True, optional=True),
    "init_from_ema": rules.flag(),
    "model_from_init": rules.flag(),
}


# The one table of config keys this project renamed or removed, by full name: {old key: what to set instead}.
# A config file or a --config.KEY override that sets an old key is refused with renamed_key_message (as timm's
# register_model_deprecations does for model names); nothing reads an old key.
RENAMED_KEYS = {
    "config.mesh.model": "config.mesh.fsdp (the axis shards parameters, FSDP, and splits the batch: it is not "
    "tensor parallelism)",
    # crop_ratio named two things: the eval resize fraction and the random-resized-crop's aspect range.
    "config.data.crop_ratio": "config.data.crop_pct (eval: the short side is resized to image_size / crop_pct, "
    "timm's crop_pct)",
    "config.data.augment.crop_ratio": "config.data.augment.crop_aspect ((min, max) of the random-resized-crop's "
    "aspect ratio, timm's ratio)",
    # Never read: the trainer seeds the data's order and augmentation with config.seed.
    "config.data.seed": "config.seed (the run's one seed: parameters, data order and augmentation)",
}


def renamed_key_message(key: str) -> str | None:
    """The error for setting `key` (its full name, "config.<group>.<key>") if RENAMED_KEYS holds it, else None."""
    if key not in RENAMED_KEYS:
        return None
    return f"{key} is no longer a key: set {RENAMED_KEYS[key]} instead, in the config file or on the command line."


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every value of a training config checked for type, length and range before any data is read: one
    ConfigError (DataConfigError for config.data) naming the first bad key, what it must be, and what it got; a
    key that RENAMED_KEYS holds is refused first, with what to set instead."""
    for key in run_record.flatten(config.to_dict()):
        message = renamed_key_message(f"config.{key}")
        if message:
            raise ConfigError(message)
    rules.check_values(config, RUN_RULES, "config.")
    data.validate_config(config.data, prefix="config.data.")
    evaluators.validate_config(config.evaluators, config.eval_name)


@contextlib.contextmanager
def config_mistakes(keys: str) -> Iterator[None]:
    """A ValueError raised while building from the config values `keys` is a mistake in them: a ConfigError."""
    try:
        yield
    except ConfigError:  # DataConfigError and WeightMismatchError included
        raise
    except ValueError as error:
        raise ConfigError(f"{error} Check {keys}.") from error


def check_fits(config: ml_collections.ConfigDict, model: models.XCiT, target: Target) -> None:
    """What the values' own rules (check_config) cannot see: how they fit the target's devices, the model and the
    mesh."""
    devices = target.device_count
    for name in ("global_batch_size", "eval_batch_size"):
        size = config.get(name)
        if size is not None and size % devices:
            raise ConfigError(
                f"config.{name}={size} is not divisible by the {devices} devices; use a multiple of {devices}."
            )
    group, per_device = model.batch_norm_group_size, config.global_batch_size // devices
    if group is not None and config.global_batch_size % group:
        raise ConfigError(
            f"config.model.batch_norm_group_size={group} does not divide config.global_batch_size="
            f"{config.global_batch_size}: BatchNorm normalizes groups of that many images of each batch; set it to "
            "a divisor of the global batch."
        )
    augment = config.data.augment
    if per_device < 2 and augment.mix_prob > 0 and (augment.mixup_alpha > 0 or augment.cutmix_alpha > 0):
        logging.warning(
            "Each device mixes (mixup / cutmix) its own shard of the batch, and it holds %d image: nothing "
            "is mixed. Use a larger global batch, or fewer devices.",
            per_device,
        )
    if config.data.image_size % model.patch_size:
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} is not divisible by the patch size {model.patch_size}: "
            f"use a multiple of {model.patch_size}."
        )
    with config_mistakes(f"config.mesh={config.mesh.to_dict()}"):
        sharding.make_mesh(config.mesh, target.devices)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_name = "xcit_nano_12_p16"
    config.qkv = ""  # a models.QKV_PRESETS name, e.g. "fsne_m8"; "" = the options in config.model
    config.model = ml_collections.ConfigDict({k: config_dict.placeholder(t) for k, t in MODEL_OPTIONS.items()})
    config.compute_dtype = "float32"  # or "bfloat16": bf16 compute, float32 parameters
    # Gradients are averaged over the devices in float32 (as PyTorch AMP + DDP), or "bfloat16" (half the bytes).
    config.gradient_all_reduce_dtype = "float32"

    config.data = data.get_config("small", source="digits")
    config.seed = 0
    config.global_batch_size = 1024
    config.eval_batch_size = config_dict.placeholder(int)  # None: global_batch_size
    config.total_epochs = 400.0
    config.total_steps = config_dict.placeholder(int)  # set: overrides total_epochs

    # Each key explained in optimizer.DEFAULTS; warmup_steps (None there) an int placeholder the command line can set.
    config.optimizer = ml_collections.ConfigDict({**optimizer.DEFAULTS, "warmup_steps": config_dict.placeholder(int)})
    # Knowledge distillation from a teacher (train/distillation.py, DeiT's loss as XCiT used it): off by default.
    config.distillation = ml_collections.ConfigDict(
        {**distillation.DEFAULTS, "teacher_path": config_dict.placeholder(str)}
    )
    config.ema_decay = config_dict.placeholder(float)  # e.g. 0.99996; evaluations then also report ema_*
    config.nonfinite = "stop"  # NaN/inf loss or gradients: "stop" the run, or "skip" the step

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
    config.sharding = "replicate"  # or "fsdp": parameters and optimizer state sharded over mesh.fsdp

    config.log_every_steps = 50
    config.eval_every_steps = 1000  # 0: only at the end
    config.eval_name = "val"  # metrics are written as <eval_name>/top1, /top5, /loss
    # More evaluations beside it, each {type, every_steps, ...} (qkv_vit/train/evaluators.py): none by default.
    config.evaluators = ml_collections.ConfigDict()
    config.checkpoint_every_steps = 1000  # 0: only at the end (and on preemption)
    config.keep_checkpoints = 3
    config.async_checkpointing = True

    config.init_from = config_dict.placeholder(str)  # fine-tuning: our run dir or converted PyTorch weights
    config.init_from_ema = False
    # True: the architecture is the one recorded with init_from (converted weights, a run's model.json), with
    # config.model.* on top (e.g. drop_path_rate); model_name and qkv are then not read.
    config.model_from_init = False
    return config
