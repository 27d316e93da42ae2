"""config.init_from: the weights a fine-tuning run starts from, and the architecture recorded with them.

Fine-tuning is apart from resuming (trainer.initial_state): a run resumes from its own workdir's checkpoints with
their optimizer state and step; only a run with none starts from config.init_from, taking its weights and nothing
else. A head of another class count is initialized afresh (weights.merge_for_fine_tuning); any other variable that
differs is a ConfigError naming it, with the config.model flags that would make the architectures match.
"""

import logging
from typing import Any

import jax
import ml_collections

from qkv_vit import models
from qkv_vit.errors import ConfigError
from qkv_vit.train.run_record import compared_classes
from qkv_vit.train.state import TrainState
from qkv_vit.weights import check_fine_tuning_fit, merge_for_fine_tuning, read_architecture, read_weights

# XCiT options that change no variable's shape: a checkpoint of one setting fits a model of another.
TRAINING_OPTIONS = (
    "num_classes",
    "dtype",
    "layer_impl",
    "batch_norm_group_size",
    "drop_rate",
    "pos_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
)


def architecture_from_init(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """XCiT's arguments recorded with config.init_from (converted weights, a run's model.json), without the
    class count (the data's) and the dtype (config.compute_dtype); ConfigError where none is recorded."""
    if not config.init_from:
        raise ConfigError(
            "config.model_from_init=true takes the architecture from config.init_from, which is unset: "
            "set --config.init_from=<converted weights or a run directory>."
        )
    try:
        stored = read_architecture(config.init_from)
    except FileNotFoundError as error:
        raise ConfigError(f"config.init_from: {error}") from error
    models.check_xcit_architecture(stored, f"config.init_from={config.init_from}")
    if stored is None:
        raise ConfigError(
            f"config.init_from={config.init_from} records no architecture (no model.json with one): "
            "set config.model_name, config.qkv and config.model.* instead of config.model_from_init."
        )
    architecture = models.architecture_from_json(stored)
    logging.info(
        "Architecture from %s: %s.",
        config.init_from,
        {k: v for k, v in architecture.items() if k not in TRAINING_OPTIONS},
    )
    return {key: value for key, value in architecture.items() if key not in ("num_classes", "dtype")}


def architecture_difference(model: models.XCiT, stored: dict[str, Any] | None) -> str:
    """How a checkpoint's recorded architecture (`stored`, JSON) differs from `model`'s, and the flags that make
    them match; "" where nothing is recorded or nothing that shapes a variable differs."""
    configured = models.architecture_of(model)
    differ = {
        k: v for k, v in (stored or {}).items() if k in configured and k not in TRAINING_OPTIONS and v != configured[k]
    }
    if not differ:
        return ""
    return (
        "The checkpoint's architecture has "
        + ", ".join(f"{k}={v!r}" for k, v in differ.items())
        + " where the config has "
        + ", ".join(f"{k}={configured[k]!r}" for k in differ)
        + ": add "
        + " ".join(f"--config.model.{k}={v}" for k, v in differ.items())
        + ", or --config.model_from_init=true to take the whole architecture from it."
    )


def read_init_from(
    config: ml_collections.ConfigDict, model: models.XCiT, abstract_state: TrainState, class_names: list[str]
) -> dict[str, Any]:
    """config.init_from's variables, checked against the shapes of `abstract_state` (ConfigError naming what
    differs); a warning where its head is kept but was trained on other classes than `class_names`."""
    init_from = config.init_from
    try:
        weights = read_weights(init_from, use_ema=config.init_from_ema)
    except FileNotFoundError as error:
        raise ConfigError(f"config.init_from: {error}") from error
    models.check_xcit_architecture(weights.architecture, f"config.init_from={init_from}")
    fresh = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
    try:
        reinitialized = check_fine_tuning_fit(fresh, weights.variables, init_from)
    except ConfigError as error:
        raise ConfigError(f"{error} {architecture_difference(model, weights.architecture)}".rstrip()) from error
    if not reinitialized and weights.class_names is not None and weights.class_names != class_names:
        logging.warning(
            "config.init_from=%s was trained on the classes %s, this data has %s: its head is kept, so its output "
            "i now stands for this data's class i (fine-tuning retrains it).",
            init_from,
            *compared_classes(weights.class_names, class_names),
        )
    return weights.variables


def fine_tuning_state(
    init_from: str, state: TrainState, loaded: dict[str, Any], state_sharding: TrainState
) -> TrainState:
    """A fresh `state` with the weights `loaded` from `init_from` (never its optimizer state or step), laid out as
    `state_sharding`: the start of a fine-tuning run."""
    fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    merged = merge_for_fine_tuning(fresh, loaded, init_from)
    logging.info("Initialized from %s.", init_from)
    params = jax.device_put(merged["params"], state_sharding.params)
    batch_stats = jax.device_put(merged["batch_stats"], state_sharding.batch_stats)
    ema = jax.device_put(merged["params"], state_sharding.ema_params) if state.ema_params is not None else None
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema)
