"""A workdir's records (config.json, model.json, each checkpoint's step record) describe what its checkpoints
were trained with: a rerun under a config that changes the result is refused, one that changes only how the run
is carried out goes on with a warning, --allow_config_change continues and records the change, and data whose
class names differ from the checkpoint's are refused."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from qkv_vit import data
from qkv_vit.data.testing import write_image_folder
from qkv_vit.errors import ConfigError
from qkv_vit.train import run_record, train_and_evaluate, trainer

pytestmark = pytest.mark.slow  # real training runs

TOTAL_STEPS = 4
FLAGS = [  # the command line equal to run_config()
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=0",
    "--config.eval_batch_size=120",
    "--config.model.embed_dim=32",
    "--config.model.depth=1",
    "--noconfig.async_checkpointing",
]


def run_config(data_cache):
    config = load_config("quickstart", "runlocal")
    config.model.update(embed_dim=32, depth=1)
    config.data.cache_dir = str(data_cache)
    config.update(
        total_steps=TOTAL_STEPS,
        checkpoint_every_steps=2,
        log_every_steps=2,
        eval_every_steps=0,
        eval_batch_size=120,
        async_checkpointing=False,
    )
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("finished")
    train_and_evaluate(run_config(data_cache), workdir)
    return workdir


def records(workdir):
    return {name: (workdir / name).read_bytes() for name in ("config.json", "model.json")}


def resumable_copy(finished, tmp_path):
    """The finished run as a preemption after step 2 left it."""
    workdir = shutil.copytree(finished, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / "4")
    return workdir


def test_each_checkpoint_records_its_config_and_class_names(finished, data_cache):
    meta = json.loads((finished / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["data"]["class_names"] == [str(digit) for digit in range(10)]
    assert meta["config"] == json.loads((finished / "config.json").read_text())
    assert meta["config"] == run_record.config_record(run_config(data_cache))
    assert json.loads((finished / "model.json").read_text())["data"] == meta["data"]


def test_a_rerun_of_a_finished_run_with_another_seed_and_lr_is_one_error_line_and_the_records_stay(
    finished, data_cache
):
    before = records(finished)
    command = [sys.executable, "-m", "qkv_vit.main", "--config=configs/quickstart.py:runlocal", f"--workdir={finished}"]
    command += [*FLAGS, f"--config.data.cache_dir={data_cache}", "--config.seed=7", "--config.optimizer.lr=0.01"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    lr = run_config(data_cache).optimizer.lr
    assert f"were trained with seed=0, optimizer.lr={lr}, but this command gives seed=7, optimizer.lr=0.01" in errors[0]
    assert "the run finished at step 4, so nothing would be trained with them" in errors[0]
    assert f"(--config.seed=0 --config.optimizer.lr={lr})" in errors[0] and "--allow_config_change" in errors[0]
    assert records(finished) == before


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(seed=3), "seed"),
        (dict(optimizer=dict(weight_decay=0.5)), "optimizer.weight_decay"),
        (dict(model=dict(drop_path_rate=0.2)), "model.drop_path_rate"),
        (dict(data=dict(augment=dict(mixup_alpha=0.5))), "data.augment.mixup_alpha"),
        (dict(data=dict(shuffle_buffer=77)), "data.shuffle_buffer"),
    ],
)
def test_a_resume_that_changes_what_is_trained_is_refused_before_training(
    finished, tmp_path, data_cache, monkeypatch, change, key
):
    workdir = resumable_copy(finished, tmp_path)
    before = records(workdir)
    config = run_config(data_cache)
    config.update_from_flattened_dict(run_record.flatten(change))
    monkeypatch.setattr(trainer, "train_loop", lambda *args: pytest.fail("trained on"))
    with pytest.raises(ConfigError, match=rf"trained with {key}=.*the run would go on from step 2 under them"):
        train_and_evaluate(config, workdir)
    assert records(workdir) == before and not (workdir / "config_changes.jsonl").exists()


def test_a_resume_that_changes_only_how_the_run_is_carried_out_goes_on_and_says_so(
    finished, tmp_path, data_cache, caplog
):
    workdir = resumable_copy(finished, tmp_path)
    config = run_config(data_cache)
    config.update(log_every_steps=1, keep_checkpoints=5)
    with caplog.at_level(logging.WARNING):
        state = train_and_evaluate(config, workdir)
    assert int(state.step) == TOTAL_STEPS
    assert "Changed since step 2, without changing what is trained: log_every_steps=1, keep_checkpoints=5" in (
        caplog.text
    )
    assert json.loads((workdir / "config.json").read_text())["log_every_steps"] == 1
    assert not (workdir / "config_changes.jsonl").exists()


def test_allow_config_change_continues_under_the_new_config_and_records_the_change(finished, tmp_path, data_cache):
    workdir = resumable_copy(finished, tmp_path)
    config = run_config(data_cache)
    lr = config.optimizer.lr
    config.optimizer.lr = lr / 2
    state = train_and_evaluate(config, workdir, allow_config_change=True)
    assert int(state.step) == TOTAL_STEPS
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == lr / 2
    lines = (workdir / "config_changes.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 2, "changes": {"optimizer.lr": [lr, lr / 2]}}]
    meta = json.loads((workdir / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["config"]["optimizer"]["lr"] == lr / 2  # the next rerun compares with what step 4 was trained with


def test_the_lists_of_result_neutral_keys_name_real_keys_and_everything_else_changes_the_result(data_cache):
    record = run_record.config_record(run_config(data_cache))
    keys = run_record.flatten(record)
    groups = {key for key, value in record.items() if isinstance(value, dict)}  # config.evaluators may be empty
    for neutral in run_record.RESULT_NEUTRAL:
        assert neutral in groups or any(key == neutral or key.startswith(f"{neutral}.") for key in keys), neutral
    for key in ("seed", "optimizer.lr", "model.depth", "data.augment.crop_scale", "data.name", "compute_dtype"):
        assert key in keys and not run_record.is_neutral(key)
    assert run_record.is_neutral("mesh.fsdp") and run_record.is_neutral("data.cache_dir")


FOLDER = {"train": {"ant": 6, "bee": 6, "cat": 4}, "test": {"ant": 2, "bee": 2, "cat": 2}}


def folder_config(data_cache, folder):
    config = run_config(data_cache)
    config.data.update(
        source="image_folder", pipeline="in_memory", path=str(folder), cache_dir=str(data_cache), image_size=32
    )
    config.data.num_classes = 3
    config.update(global_batch_size=8, eval_batch_size=6)
    return config


def test_class_folders_renamed_between_a_preemption_and_the_resume_are_refused(tmp_path, data_cache, caplog):
    write_image_folder(tmp_path / "images", FOLDER)
    config = folder_config(data_cache, tmp_path / "images")
    config.total_steps = 2
    train_and_evaluate(config, tmp_path / "run")
    for split in FOLDER:  # re-cased, as a copy through a case-insensitive file system can leave it
        os.rename(tmp_path / "images" / split / "bee", tmp_path / "images" / split / "Bee")
    config.total_steps = TOTAL_STEPS
    with pytest.raises(ConfigError, match=r"were trained on the classes \['ant', 'bee', 'cat'\].*now has"):
        train_and_evaluate(config, tmp_path / "run")
    assert int(json.loads((tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata").read_text())["step"]) == 2
    assert not (tmp_path / "run" / "checkpoints" / "4").exists()
    config.update(init_from=str(tmp_path / "run"), total_steps=2)  # fine-tuning keeps the head: a warning
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config, tmp_path / "fine_tuned")
    assert "was trained on the classes ['ant', 'bee', 'cat'], this data has" in caplog.text


def test_a_held_out_split_with_a_class_the_train_split_lacks_is_an_error_not_an_extra_class(tmp_path, caplog):
    write_image_folder(tmp_path / "images", {"train": {"ant": 2, "bee": 2}, "val": {"ant": 1, "Bee": 1}})
    config = data.get_config("none", source="image_folder", pipeline="in_memory")
    config.path, config.cache_dir = str(tmp_path / "images"), str(tmp_path / "cache")
    with pytest.raises(data.DataConfigError, match=r"val has class folders \['Bee'\] that the train split 'train'"):
        data.open_source(config)
    shutil.rmtree(tmp_path / "images" / "val" / "Bee")
    with caplog.at_level(logging.WARNING):
        source = data.open_source(config)
    assert source.info.class_names == ["ant", "bee"]
    assert "Split 'val' of" in caplog.text and "no class folder for 1 of the 2 classes (['bee'])" in caplog.text


@pytest.mark.parametrize(
    "key, value, flag",
    [
        ("seed", 0, "--config.seed=0"),
        ("data.augment.crop_scale", [0.35, 1.0], "--config.data.augment.crop_scale='(0.35, 1.0)'"),
        ("data.mean", [0.5], "--config.data.mean='(0.5,)'"),
        ("data.train_split", "train[:90%]", "--config.data.train_split='train[:90%]'"),
        ("data.train_split", None, "no --config.data.train_split"),
        ("async_checkpointing", False, "--config.async_checkpointing=false"),
    ],
)
def test_the_flags_that_restore_a_recorded_value_are_ones_a_shell_and_absl_take(key, value, flag):
    assert run_record.restore_flag(key, value) == flag
