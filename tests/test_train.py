"""The trainer in one process: outputs in the workdir, exact evaluation, resume, fine-tuning init, NaN guard."""

import dataclasses
import json
import logging
import re
import shutil

import jax
import numpy as np
import pytest

from qkv_vit import data, models
from qkv_vit.paths import as_path
from qkv_vit.train import NonFiniteError, train_and_evaluate, trainer
from qkv_vit.train.config import check_fits
from qkv_vit.train.logging_utils import JsonlWriter, read_metrics
from qkv_vit.train.optimizer import decay_mask, learning_rate, make_optimizer
from qkv_vit.train.reporting import log_data_summary
from qkv_vit.train.target import Target
from qkv_vit.train.trainer import build_run, evaluate, fresh_state
from qkv_vit.weights import read_weights

pytestmark = pytest.mark.slow  # trains, starts processes or converts real data: not in `pytest -m "not slow"`


@dataclasses.dataclass(frozen=True)
class StandInDevice:
    """What a Target and a mesh read of a device, for checks that only need a device count."""

    id: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    process_index: int = 0


def four_devices() -> Target:
    return Target(tuple(StandInDevice(i) for i in range(4)), "four stand-ins")


def params_close(a, b, atol=0.0):
    return all(np.allclose(x, y, atol=atol, rtol=0) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_run_writes_config_metrics_events_and_checkpoints(tmp_path, tiny_config, caplog):
    tiny_config.ema_decay = 0.9
    with caplog.at_level(logging.INFO):
        state = train_and_evaluate(tiny_config, tmp_path)
    assert int(state.step) == 4
    # The console's last line says where the results are; log.txt keeps every record, the libraries' INFO
    # records the console leaves out (Orbax's, tfds's) included, and is closed when the run returns.
    ours = [record.getMessage() for record in caplog.records if record.name == "root"]
    assert ours[-1].startswith(
        f"Finished: val/top1 {read_metrics(tmp_path)[-1]['val/top1']:.4f} at step 4; results in {tmp_path}"
    )
    log = (tmp_path / "log.txt").read_text()
    assert "step 4/4: loss" in log and "Finished: val/top1" in log
    assert "checkpoint_manager.py" in log and "INFO absl" in log
    assert not [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", "").startswith(str(tmp_path))]
    assert json.loads((tmp_path / "config.json").read_text())["model_name"] == "xcit_nano_12_p8"
    summary = json.loads((tmp_path / "model.json").read_text())
    assert summary["qkv"] == "fsne_m8" and summary["architecture"]["embed_dim"] == 32
    assert summary["architecture"]["dtype"] == "float32" and summary["architecture"]["num_classes"] == 10
    caplog.clear()  # the training's own records
    with caplog.at_level(logging.WARNING):
        weights = read_weights(tmp_path / "checkpoints" / "4")  # a step directory finds its run's architecture
    assert not caplog.records, caplog.text  # a healthy checkpoint reads without a warning
    assert weights.architecture == summary["architecture"]
    assert models.from_architecture(models.architecture_from_json(weights.architecture)) == trainer.build_model(
        tiny_config, 10
    )
    assert summary["num_params"] == models.count_params(state.params)
    assert summary["data"] == {
        "source": "the offline digits data set",
        "train_split": "train",
        "train_examples": 1437,
        "class_names": [str(digit) for digit in range(10)],
        "eval_split": "test",
        "eval_examples": 360,
    }
    assert list(tmp_path.glob("events.out.tfevents.*"))
    metrics = read_metrics(tmp_path)
    train = [m for m in metrics if "train/loss" in m]
    evals = [m for m in metrics if "val/top1" in m]
    assert [m["step"] for m in train] == [2, 4] and [m["step"] for m in evals] == [2, 4]
    for key in ("train/loss", "train/lr", "train/images_per_sec", "train/grad_norm"):
        assert np.isfinite(train[-1][key])
    assert set(evals[-1]) >= {"val/top1", "val/top5", "val/loss", "val/count", "ema_val/top1", "ema_val/count"}
    assert not params_close(state.ema_params, state.params)  # a real average, not a copy
    assert evals[-1]["val/count"] == 360  # every held-out digit, once
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    # Rerunning the same command on a finished run is a no-op, not an error, and writes no (empty) event file.
    events = sorted(tmp_path.glob("events.out.tfevents.*"))
    again = train_and_evaluate(tiny_config, tmp_path)
    assert sorted(tmp_path.glob("events.out.tfevents.*")) == events
    assert int(again.step) == 4 and params_close(again.params, state.params)
    assert len(read_metrics(tmp_path)) == len(metrics)


@pytest.mark.parametrize("eval_batch_size", [16, 48, 100, 512])
def test_evaluation_counts_every_example_once(tiny_config, eval_batch_size, tmp_path):
    run = build_run(tiny_config, tmp_path, data.open_source(tiny_config.data), target=Target.present())
    state = fresh_state(run)
    batches = data.open_source(tiny_config.data).eval_batches(eval_batch_size)
    result = evaluate(run, state.params, state.batch_stats, batches)
    assert result["count"] == 360
    # A constant model (zeroed head, bias on class 3) gets exactly the share of 3s right, whatever the padding.
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    params["head"] = {"kernel": np.zeros_like(params["head"]["kernel"]), "bias": np.eye(10, dtype=np.float32)[3]}
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    result = evaluate(run, params, state.batch_stats, batches)
    assert result["top1"] == pytest.approx(np.mean(labels == 3))


def test_resume_continues_to_the_same_parameters(tmp_path, tiny_config):
    tiny_config.total_steps = 6
    straight = train_and_evaluate(tiny_config, tmp_path / "straight")
    train_and_evaluate(tiny_config, tmp_path / "resumed")  # 6 steps, checkpoints at 2, 4, 6
    # Drop the later checkpoints so the rerun has to resume from step 2 and redo 4 steps.
    for step in (4, 6):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    resumed = train_and_evaluate(tiny_config, tmp_path / "resumed")
    assert int(resumed.step) == 6
    assert params_close(straight.params, resumed.params)
    assert params_close(straight.opt_state, resumed.opt_state)
    assert params_close(straight.batch_stats, resumed.batch_stats)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    train_and_evaluate(tiny_config, tmp_path)  # steps 1-4, checkpoints 2 and 4
    good = read_weights(tmp_path).variables
    tiny_config.total_steps = 8
    tiny_config.optimizer.lr = 1e30  # the next update overflows the parameters
    with pytest.raises(NonFiniteError, match=r"NaN/inf at step 5.*Last good checkpoint: step 4"):
        train_and_evaluate(tiny_config, tmp_path, allow_config_change=True)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
    assert params_close(read_weights(tmp_path).variables["params"], good["params"])


def test_nonfinite_skip_policy_drops_the_update_and_counts_it(tmp_path, tiny_config):
    tiny_config.optimizer.update(lr=1e30, warmup_init_lr=1e30)  # every update overflows
    tiny_config.nonfinite = "skip"
    run = build_run(tiny_config, tmp_path / "init", data.open_source(tiny_config.data), target=Target.present())
    initial = jax.device_get(fresh_state(run).params)
    state = train_and_evaluate(tiny_config, tmp_path / "run")
    assert int(state.skipped_steps) == 4 and params_close(state.params, initial)
    logged = [m["train/skipped_steps"] for m in read_metrics(tmp_path / "run") if "train/skipped_steps" in m]
    assert logged == [2, 4]


def test_converted_weights_fine_tune_with_their_own_architecture_and_a_mismatch_says_how_to_match(
    tmp_path, tiny_config
):
    from conftest import require_fixtures
    from qkv_vit.convert.__main__ import main as convert_main

    source = require_fixtures() / "xcit_p16_d3_img96_tokensnorm.safetensors"
    assert convert_main([str(source), str(tmp_path / "converted"), "--tokens-norm"]) == 0
    stored = read_weights(tmp_path / "converted")
    tiny_config.init_from = str(tmp_path / "converted")
    with pytest.raises(ValueError, match=r"architecture has .*--config\.model_from_init=true"):
        train_and_evaluate(tiny_config, tmp_path / "typed")  # the quickstart's model: another architecture
    tiny_config.model = {key: None for key in tiny_config.model}  # nothing about the model typed by hand
    tiny_config.model_from_init = True
    tiny_config.optimizer.update(lr=0.0, warmup_init_lr=0.0, min_lr=0.0, weight_decay=0.0)  # weights stay put
    tuned = train_and_evaluate(tiny_config, tmp_path / "tuned")
    architecture = json.loads((tmp_path / "tuned" / "model.json").read_text())["architecture"]
    assert {k: architecture[k] for k in ("patch_size", "embed_dim", "depth", "tokens_norm")} == {
        k: stored.architecture[k] for k in ("patch_size", "embed_dim", "depth", "tokens_norm")
    }
    assert architecture["num_classes"] == 10 != stored.architecture["num_classes"]  # the digits' head
    np.testing.assert_array_equal(tuned.params["cls_token"], stored.variables["params"]["cls_token"])


def test_fine_tuning_init_is_separate_from_resume(tmp_path, tiny_config):
    pretrained = train_and_evaluate(tiny_config, tmp_path / "pretrain")
    tiny_config.init_from = str(tmp_path / "pretrain")
    tiny_config.optimizer.update(lr=0.0, warmup_init_lr=0.0, min_lr=0.0, weight_decay=0.0)  # weights stay put
    tuned = train_and_evaluate(tiny_config, tmp_path / "finetune")
    assert params_close(tuned.params, pretrained.params)
    # Rerunning the fine-tuning workdir resumes its own checkpoint; init_from is not read again.
    tiny_config.init_from = str(tmp_path / "does-not-exist")
    tiny_config.total_steps = 6
    assert int(train_and_evaluate(tiny_config, tmp_path / "finetune", allow_config_change=True).step) == 6


def test_weight_decay_mask():
    params = {
        "blocks_0": {
            "attn": {
                "qkv": {"hidden_kernel": 1, "hidden_bias": 1, "codes": 1},
                "temperature": 1,
                "proj": {"kernel": 1, "bias": 1},
            },
            "norm1": {"scale": 1, "bias": 1},
            "gamma1": 1,
            "mlp": {"fc1": {"kernel": 1}},
        },
        "cls_token": 1,
        "pos_embed": {"token_projection": {"kernel": 1}},
        "head": {"kernel": 1},
    }
    flat = {
        "/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]
    }
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == [
        "blocks_0/attn/proj/kernel",
        "blocks_0/attn/qkv/hidden_kernel",
        "blocks_0/mlp/fc1/kernel",
        "head/kernel",
    ]
    assert decay_mask(params, code_weight_decay=True)["blocks_0"]["attn"]["qkv"]["codes"]
    # A plain script's AdamW(model.parameters()) decays everything; the codes still follow code_weight_decay.
    unfiltered = jax.tree_util.tree_flatten_with_path(decay_mask(params, filter_bias_and_bn=False))[0]
    assert sorted("/".join(str(k.key) for k in path) for path, v in unfiltered if not v) == ["blocks_0/attn/qkv/codes"]


def test_learning_rate_schedule(tiny_config):
    opt = tiny_config.optimizer
    opt.update(lr=5e-4, warmup_init_lr=1e-6, min_lr=1e-5)
    schedule = learning_rate(opt, global_batch_size=1024, total_steps=1000, warmup_steps=100)
    assert schedule(0) == pytest.approx(1e-6, rel=1e-4)
    assert schedule(100) == pytest.approx(1e-3, rel=1e-4)  # 5e-4 x 1024 / 512
    assert schedule(1000) == pytest.approx(1e-5, rel=1e-4)
    assert isinstance(schedule(550), jax.Array) and 1e-5 < schedule(550) < 1e-3


@pytest.mark.parametrize("batch, accumulation", [(1024, 1), (128, 8), (256, 4)])
def test_scaled_lr_follows_the_images_per_update_with_gradient_accumulation(tiny_config, batch, accumulation):
    """timm's rule: lr x batch x accumulation / 512, so 8 x 128 accumulated trains like one batch of 1024."""
    opt = tiny_config.optimizer
    opt.update(lr=5e-4, accumulation_steps=accumulation)
    schedule = learning_rate(opt, batch, total_steps=1000 * accumulation, warmup_steps=100 * accumulation)
    assert schedule(100) == pytest.approx(1e-3, rel=1e-6)  # the schedule counts updates: warmup ends at update 100
    opt.scale_lr_by_batch = False
    assert learning_rate(opt, batch, 1000 * accumulation, 100 * accumulation)(100) == pytest.approx(5e-4, rel=1e-6)


def test_gradient_accumulation_updates_every_k_steps(tiny_config):
    opt = tiny_config.optimizer
    opt.update(accumulation_steps=2, lr=0.1, scale_lr_by_batch=False, warmup_init_lr=0.1, min_lr=0.1, weight_decay=0.0)
    optimizer = make_optimizer(opt, learning_rate(opt, 16, total_steps=10, warmup_steps=0))
    params = {"w": np.ones(3, np.float32)}
    state = optimizer.init(params)
    first, state = optimizer.update({"w": np.full(3, 1.0, np.float32)}, state, params)
    second, state = optimizer.update({"w": np.full(3, 3.0, np.float32)}, state, params)
    assert np.all(first["w"] == 0) and np.all(second["w"] < 0)  # one update per 2 micro-batches
    np.testing.assert_allclose(second["w"], -0.1, rtol=1e-3)  # Adam's first step: -lr x sign(mean gradient)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(nonfinite="ignore"), "config.nonfinite must be one of"),
        (dict(sharding="zero"), "config.sharding must be one of"),
        (dict(qkv="fsne_m3"), "Unknown QKV preset 'fsne_m3'"),
        (dict(model_name="xcit_nano_13_p16"), "Unknown model 'xcit_nano_13_p16'"),
        (dict(compute_dtype="float16"), "compute_dtype must be one of"),
    ],
)
def test_bad_config_is_a_clear_error_before_any_work(tmp_path, tiny_config, override, message):
    tiny_config.update(override)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(tiny_config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "name, arg",
    [
        ("quickstart", None),
        ("quickstart", "qkv=linear"),
        ("quickstart", "runlocal"),
        ("cifar10", None),
        ("cifar10", "qkv=fsne_m8,epochs=5,depth=6"),
        ("cifar10", "runlocal"),
        ("cifar10", "source=tfds"),
    ],
)
def test_config_files_load_and_build_their_model(name, arg):
    from conftest import load_config
    from qkv_vit.train.trainer import build_model

    config = load_config(name, arg)
    model = build_model(config, num_classes=10)
    assert config.data.image_size % model.patch_size == 0
    data.validate_config(config.data)
    if arg and "qkv=fsne_m8" in arg:
        assert model.qkv_embed == "fsne" and model.code_size == 8 and model.depth == 6


def test_the_log_names_the_evaluated_split_and_warns_when_it_holds_training_images(tmp_path, tiny_config, caplog):
    tiny_config.data.update(train_split="train[:90%]", eval_split="train")
    with caplog.at_level(logging.INFO):
        log_data_summary(tiny_config, data.open_source(tiny_config.data).info)
    assert (
        "1293 train examples (split 'train[:90%]'); evaluation on split 'train' (1437 examples); also present: "
        "['test'] (data.eval_split chooses)."
    ) in caplog.text
    assert (
        "The eval split 'train' shares 1293 examples with the train split 'train[:90%]' (data.eval_split): the "
        "val/* metrics include training images"
    ) in caplog.text
    caplog.clear()
    tiny_config.data.eval_split = "train[90%:]"  # a held-out part of the train split: nothing shared, no warning
    with caplog.at_level(logging.INFO):
        log_data_summary(tiny_config, data.open_source(tiny_config.data).info)
    assert "evaluation on split 'train[90%:]' (144 examples)" in caplog.text and "shares" not in caplog.text


def test_checkpoint_every_zero_saves_only_at_the_end(tmp_path, tiny_config, caplog):
    tiny_config.checkpoint_every_steps = 0
    with caplog.at_level(logging.INFO):
        train_and_evaluate(tiny_config, tmp_path)
    assert re.search(r"step 2/4: loss [\d.]+, [\d.]+ images/s, ETA \d+:\d\d:\d\d", caplog.text)  # our own ETA
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["4"]


def test_workdir_urls_are_kept_and_local_paths_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert str(as_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert str(as_path("runs/a")) == str(tmp_path / "runs" / "a")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(as_path("~/runs/a")) == str(tmp_path / "home" / "runs" / "a")


def test_metrics_file_is_rewritten_whole_where_appending_is_impossible(tmp_path):
    path = tmp_path / "metrics.jsonl"
    JsonlWriter(path).write_scalars(1, {"train/loss": 2.0})  # a local file: appended to
    resumed = JsonlWriter(path, appendable=False)  # as on gs://: keeps the earlier lines, rewrites the object
    resumed.write_scalars(2, {"train/loss": 1.5})
    resumed.write_scalars(3, {"val/top1": 0.5})
    assert read_metrics(tmp_path) == [
        {"step": 1, "train/loss": 2.0},
        {"step": 2, "train/loss": 1.5},
        {"step": 3, "val/top1": 0.5},
    ]


def test_metrics_file_is_strict_json_with_non_finite_values_as_null(tmp_path):
    """A blown-up loss must not make metrics.jsonl unreadable to strict JSON parsers (jq, JavaScript)."""
    JsonlWriter(tmp_path / "metrics.jsonl").write_scalars(
        3, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": -float("inf"), "train/top1": 0.5}
    )

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(line, parse_constant=refuse) == {
        "step": 3,
        "train/loss": None,
        "train/grad_norm": None,
        "train/lr": None,
        "train/top1": 0.5,
    }
    (record,) = read_metrics(tmp_path)  # read back as NaN, so arithmetic on a column still works
    assert np.isnan(record["train/loss"]) and np.isnan(record["train/grad_norm"]) and record["train/top1"] == 0.5


@pytest.mark.parametrize(
    "group, batch, mixing, warning",
    [
        (2, 12, 0.0, None),  # groups across shards are normalized exactly (layers.BatchNorm), without a warning
        (4, 12, 0.0, None),
        (6, 12, 0.0, None),
        (3, 12, 0.0, None),
        (4, 16, 0.0, None),
        (8, 16, 0.0, None),
        (None, 4, 0.8, "it holds 1 image: nothing is mixed"),
        (None, 8, 0.8, None),
    ],
)
def test_run_config_warns_where_mixing_does_not_fit_the_device_shards_never_for_batch_norm_groups(
    monkeypatch, caplog, tiny_config, group, batch, mixing, warning
):
    tiny_config.global_batch_size = tiny_config.eval_batch_size = batch
    tiny_config.data.augment.update(mixup_alpha=mixing, mix_prob=1.0)
    tiny_config.model.batch_norm_group_size = group
    with caplog.at_level(logging.WARNING):
        check_fits(tiny_config, trainer.build_model(tiny_config, num_classes=10), four_devices())
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text
