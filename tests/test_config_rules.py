"""Every config value is checked for type, length and range before any data is read: one clear error per mistake."""

import math
import re

import ml_collections
import pytest

from conftest import load_config
from qkv_vit import data
from qkv_vit.config_rules import check_values, closest_key, integer, number, numbers, text
from qkv_vit.errors import ConfigError
from qkv_vit.train import run_record, trainer
from qkv_vit.train.config import RENAMED_KEYS, RUN_RULES, base_config, check_config, renamed_key_message


@pytest.mark.parametrize("preset", ["xcit", "transfer", "small", "none"])
def test_every_key_of_the_default_configs_has_a_rule_and_passes_it(preset):
    config = base_config()
    config.data = data.get_config(preset, source="image_folder")
    config.data.path = "/data"
    check_config(config)  # a key without a rule is an unknown key: it would raise


@pytest.mark.parametrize(
    "name, arg",
    [
        ("quickstart", None),
        ("cifar10", None),
        ("imagenet", None),
        ("transfer", "init=/runs/in1k"),
        ("imagenet", "runlocal"),
    ],
)
def test_the_shipped_configs_pass(name, arg):
    check_config(load_config(name, arg))


BAD_VALUES = [  # (key path, value, what the one error line must say)
    ("data.augment.crop_scale", (0.5,), "config.data.augment.crop_scale must be 2 numbers (min, max)"),
    ("data.augment.crop_scale", (0.9, 0.5), "the first <= the second, got (0.9, 0.5)"),
    ("data.augment.crop_scale", (0.0, 1.0), "each in (0, 1]"),
    ("data.augment.crop_aspect", (0.75, 1.33, 2.0), "config.data.augment.crop_aspect must be 2 numbers"),
    ("data.augment.erasing_area", (0.02, 1.5), "config.data.augment.erasing_area must be 2 numbers"),
    ("data.augment.erasing_aspect_min", 3.3, "must be a finite number in (0, 1]"),
    ("data.augment.flip_prob", 1.5, "config.data.augment.flip_prob must be a finite number in [0, 1], got 1.5"),
    ("data.augment.label_smoothing", -0.1, "label_smoothing must be a finite number in [0, 1]"),
    ("data.augment.randaugment_magnitude_max", 0.0, "randaugment_magnitude_max must be a finite number > 0"),
    ("data.augment.mixup_alpha", float("nan"), "mixup_alpha must be a finite number >= 0, got nan"),
    ("data.augment.erasing_mode", "noise", "erasing_mode must be one of ['pixel', 'const']"),
    ("data.mean", (0.5, 0.5), "config.data.mean must be 3 numbers (red, green, blue)"),
    ("data.mean", (123.7, 116.3, 103.5), "Images are scaled to [0, 1] before normalizing"),
    ("data.std", (0.25, 0.0, 0.25), "config.data.std must be 3 numbers (red, green, blue) each in (0, 1]"),
    ("data.crop_pct", 0.0, "config.data.crop_pct must be a finite number in [0.1, 1]"),
    ("data.crop_pct", 1e-30, "config.data.crop_pct must be a finite number in [0.1, 1], got 1e-30"),
    ("data.image_size", 0, "config.data.image_size must be an integer >= 1, got 0"),
    ("data.num_parallel_calls", 0, "num_parallel_calls must be an integer >= 1 or -1"),
    ("data.shuffle_buffer", -5, "shuffle_buffer must be an integer >= 0"),
    ("data.num_classes", 0, "config.data.num_classes must be an integer >= 1 (or None to leave it unset), got 0"),
    ("optimizer.eps", 0.0, "config.optimizer.eps must be a finite number > 0"),
    ("optimizer.b2", 1.0, "config.optimizer.b2 must be a finite number in [0, 1)"),
    ("optimizer.lr", float("inf"), "config.optimizer.lr must be a finite number >= 0, got inf"),
    ("optimizer.weight_decay", -0.05, "weight_decay must be a finite number >= 0"),
    ("optimizer.warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("optimizer.accumulation_steps", 0, "accumulation_steps must be an integer >= 1"),
    ("optimizer.name", "lamb", "config.optimizer.name must be one of ['adamw', 'sgd']"),
    ("ema_decay", 1.0, "config.ema_decay must be a finite number in [0, 1)"),
    ("keep_checkpoints", 0, "config.keep_checkpoints must be an integer >= 1"),
    ("mesh.data", 0, "config.mesh.data must be an integer >= 1 or -1"),
    ("eval_name", "val/ema", "config.eval_name must be a non-empty string without /"),
    ("eval_name", "train", "that does not start with 'train' or 'ema_', got 'train'"),  # train/top1 exists already
    ("eval_name", "ema_val", "that does not start with 'train' or 'ema_', got 'ema_val'"),
    ("seed", 2**32, "config.seed must be an integer in [0, 4294967295], got 4294967296"),
    (
        "model.code_init_std",
        1e39,
        "config.model.code_init_std must be a finite number (or None to leave it unset), got 1e+39",
    ),  # inf in float32
    ("total_epochs", 0.0, "config.total_epochs must be a finite number > 0"),
    ("total_steps", 0, "config.total_steps must be an integer >= 1"),
    ("global_batch_size", 0, "config.global_batch_size must be an integer >= 1, got 0"),
    ("eval_every_steps", -1, "config.eval_every_steps must be an integer >= 0"),
    ("seed", -1, "config.seed must be an integer in [0, 4294967295]"),
    ("compute_dtype", "float16", "config.compute_dtype must be one of ['float32', 'bfloat16']"),
    ("model.eta", 0.0, "eta (LayerScale's initial value) must be > 0"),
    ("model.drop_path_rate", 1.0, "drop_path_rate must be in [0, 1)"),
]


def set_value(config, path, value):
    *groups, key = path.split(".")
    for group in groups:
        config = config[group]
    with config.ignore_type():  # as a config file or a dict could set it; the command line parses first
        config[key] = value


@pytest.mark.parametrize("path, value, message", BAD_VALUES, ids=[f"{p}={v!r}" for p, v, _ in BAD_VALUES])
def test_a_bad_value_is_one_error_before_any_data_is_read(tmp_path, tiny_config, monkeypatch, path, value, message):
    set_value(tiny_config, path, value)
    monkeypatch.setattr(data, "open_source", lambda *args: pytest.fail("read data after a bad config value"))
    with pytest.raises(ConfigError) as raised:
        trainer.train_and_evaluate(tiny_config, tmp_path / "run")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()  # not even the workdir was made


def test_a_key_a_config_file_misspelled_is_refused_with_the_closest_one(tiny_config):
    tiny_config.optimizer.unlock()
    tiny_config.optimizer.weight_decy = 0.1  # would otherwise be ignored: the run would decay with 0.05
    with pytest.raises(
        ConfigError,
        match=r"config.optimizer.weight_decy is not a known key \(did you mean "
        r"config.optimizer.weight_decay\?\)",
    ):
        check_config(tiny_config)


@pytest.mark.parametrize("group", ["optimizer", "mesh", "data.augment"])
def test_a_group_a_config_file_replaced_without_all_its_keys_is_one_error(tiny_config, group):
    *parents, name = group.split(".")
    parent = tiny_config
    for key in parents:
        parent = parent[key]
    first_key = next(iter(parent[name].keys()))
    parent[name] = ml_collections.ConfigDict({first_key: parent[name][first_key]})  # the rest left out
    with pytest.raises(ConfigError, match=rf"config\.{group}\.\w+ is missing: a config file replaced its group"):
        check_config(tiny_config)


@pytest.mark.parametrize("old", list(RENAMED_KEYS))
def test_a_config_file_that_sets_a_renamed_key_is_told_the_key_to_set_instead(old):
    known = run_record.flatten(base_config().to_dict())
    replacement = RENAMED_KEYS[old].split()[0]
    assert old.removeprefix("config.") not in known and replacement.removeprefix("config.") in known
    assert renamed_key_message(old).startswith(f"{old} is no longer a key: set {replacement} (")
    config = base_config()
    set_value(config, old.removeprefix("config."), 1)  # as a config file written for the earlier name does
    with pytest.raises(ConfigError, match=rf"^{re.escape(renamed_key_message(old))}$"):
        check_config(config)


def test_a_key_that_was_never_renamed_has_no_rename_message():
    assert renamed_key_message("config.seed") is None


def test_rules_say_what_they_accept():
    check_values(
        {"a": 3, "b": None, "c": (0.1, 0.2), "d": "x"},
        {"a": integer(1), "b": number(optional=True), "c": numbers(2, 0.0, 1.0, ordered=True), "d": text()},
    )
    for value in (True, 1.5, "1", None):
        with pytest.raises(ConfigError, match="config.a must be an integer >= 1"):
            check_values({"a": value}, {"a": integer(1)})
    for value in (math.nan, -math.inf, "0.5", False):
        with pytest.raises(ConfigError, match="must be a finite number"):
            check_values({"a": value}, {"a": number()})
    assert set(RUN_RULES) == set(base_config().keys())


def test_the_closest_key_reads_the_group_and_common_synonyms():
    known = ["optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay", "global_batch_size", "total_epochs", "seed"]
    assert closest_key("optimizer.learning_rate", known) == "optimizer.lr"  # a synonym, in its group
    assert closest_key("optimzer.lr", known) == "optimizer.lr"  # a typo in the group
    assert closest_key("optimizer.weight_decy", known) == "optimizer.weight_decay"
    assert closest_key("batch_size", known) == "global_batch_size" and closest_key("epochs", known) == ("total_epochs")
    assert closest_key("flux_capacitor", known) is None
