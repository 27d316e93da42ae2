"""A training job survives kill -9, damaged checkpoints, a full disk, NaN losses and bad data files without losing
work, and bad input fails with one `error:` line (no traceback) before anything compiles.

One tiny run (24 steps, a checkpoint every 4, the last 3 kept) is the reference: interrupted or damaged runs must
end with exactly its parameters. The kill tests use real processes on CPU.
"""

import dataclasses
import errno
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, fake_devices, load_config
from qkv_vit import data
from qkv_vit.data.testing import write_image_folder
from qkv_vit.errors import CheckpointError, ConfigError, StorageError
from qkv_vit.train import logging_utils, run_record, sharding, train_and_evaluate, trainer
from qkv_vit.train.checkpointing import RunCheckpoints
from qkv_vit.train.config import RENAMED_KEYS
from qkv_vit.train.logging_utils import read_metrics
from qkv_vit.train.reporting import Reporter
from qkv_vit.train.target import Target
from qkv_vit.weights import read_weights

# Orbax leaves the coroutines of a restore that failed on a damaged file unawaited; Python reports them when collected.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

TOTAL_STEPS, EVERY = 24, 4
RUN_FLAGS = [
    f"--config.total_steps={TOTAL_STEPS}",
    f"--config.checkpoint_every_steps={EVERY}",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
    "--config.eval_batch_size=120",
]
CLI_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
DEADLINE_S = 300  # only to end a test that hangs; nothing asserts a duration

# Runs the CLI with Orbax's final rename of step $BLOCK_STEP held back (training goes on meanwhile, as with any async
# save): the step's files are written but the step is not finished, the window a kill -9 can hit during a save.
HOLD_SAVE = textwrap.dedent("""
    import asyncio, os, runpy, sys
    import orbax.checkpoint as ocp
    rename = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
        if self.get_final().name == os.environ["BLOCK_STEP"]:
            print("writing", self.get(), flush=True)
            await asyncio.sleep(3600)
        return await rename(self)
    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = finalize
    sys.argv = ["qkv_vit.main", *sys.argv[1:]]
    runpy.run_module("qkv_vit.main", run_name="__main__")
""")


def small_config(data_cache, **changes):
    config = load_config("quickstart", "runlocal")
    config.model.update(embed_dim=32, depth=1)
    config.data.cache_dir = str(data_cache)
    config.update(
        total_steps=TOTAL_STEPS,
        checkpoint_every_steps=EVERY,
        log_every_steps=1,
        eval_every_steps=0,
        eval_batch_size=120,
    )
    config.update(changes)
    return config


MAIN = [sys.executable, "-m", "qkv_vit.main"]


def cli_command(workdir, *flags, data_cache):
    return [
        *MAIN,
        "--config=configs/quickstart.py:runlocal",
        f"--workdir={workdir}",
        "--config.model.embed_dim=32",
        "--config.model.depth=1",
        f"--config.data.cache_dir={data_cache}",
        *RUN_FLAGS,
        *flags,
    ]


def steps_on_disk(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def copy_run(reference, tmp_path):
    return shutil.copytree(reference["workdir"], tmp_path / "run")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """The uninterrupted run: its workdir (checkpoints 16, 20, 24) and final variables."""
    workdir = tmp_path_factory.mktemp("reference")
    state = train_and_evaluate(small_config(data_cache), workdir)
    assert steps_on_disk(workdir) == [16, 20, 24]
    return dict(workdir=workdir, params=jax.device_get(state.params), batch_stats=jax.device_get(state.batch_stats))


# --- kill -9 -----------------------------------------------------------------------------------------------------


def test_kill_9_during_a_step_and_an_async_checkpoint_write_resumes_exactly(tmp_path, reference, data_cache):
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"

    # Killed while training past step 8 with the checkpoint of step 8 still being written: only step 4 is complete.
    flags, output = cli_command(workdir, data_cache=data_cache)[len(MAIN) :], tmp_path / "held.out"
    with output.open("w") as stdout:
        held = subprocess.Popen(
            [sys.executable, "-c", HOLD_SAVE, *flags],
            cwd=REPO,
            env={**CLI_ENV, "BLOCK_STEP": "8"},
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
    deadline = time.time() + DEADLINE_S
    # Wait until the step-8 save is held and a later step is done (so the next one is running), then kill.
    while "writing" not in output.read_text() or not any(m["step"] >= 9 for m in read_metrics(workdir)):
        assert held.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    held.kill()
    assert held.wait() == -9
    assert steps_on_disk(workdir) == [4] and (checkpoints / "8.orbax-checkpoint-tmp").is_dir()

    # The same command resumes from step 4, never from the half-written 8, and ends with the uninterrupted parameters.
    rerun = subprocess.run(
        cli_command(workdir, data_cache=data_cache),
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "8.orbax-checkpoint-tmp: an unfinished checkpoint write" in rerun.stderr
    assert f"Resuming from {checkpoints}/4." in rerun.stderr
    final = read_weights(workdir).variables
    assert_same(final["params"], reference["params"])
    assert_same(final["batch_stats"], reference["batch_stats"])
    assert steps_on_disk(workdir) == [16, 20, 24] and not list(checkpoints.glob("*tmp*"))


# --- damaged checkpoints -----------------------------------------------------------------------------------------


def largest_array_file(step_dir):
    return max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )


def test_truncated_latest_checkpoint_falls_back_to_the_previous_and_is_kept_aside(
    tmp_path, reference, data_cache, caplog
):
    workdir = copy_run(reference, tmp_path)
    bad = largest_array_file(workdir / "checkpoints" / "24")
    os.truncate(bad, bad.stat().st_size // 2)
    with caplog.at_level(logging.INFO):
        state = train_and_evaluate(small_config(data_cache), workdir)
    assert f"Checkpoint {workdir}/checkpoints/24 cannot be read" in caplog.text
    assert f"Resuming from {workdir}/checkpoints/20." in caplog.text
    assert_same(state.params, reference["params"])  # steps 21-24 redone exactly
    aside = list((workdir / "checkpoints").glob("24.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "state").is_dir()  # moved out of the way, not deleted
    assert steps_on_disk(workdir) == [16, 20, 24]


def abstract_state(config, workdir):
    run = trainer.build_run(config, workdir, data.open_source(config.data), target=Target.present())
    return sharding.placed(run.steps.abstract_state, run.steps.state_sharding)


DAMAGE = {
    "an array file deleted": lambda step: largest_array_file(step).unlink(),
    "garbage metadata": lambda step: (step / "meta" / "metadata").write_text("{not json"),
    "the array index deleted": lambda step: (step / "state" / "_METADATA").unlink(),
}


def test_each_kind_of_damage_is_detected_and_set_aside(tmp_path, reference, data_cache):
    config = small_config(data_cache)
    abstract = abstract_state(config, tmp_path / "setup")
    for name, damage in DAMAGE.items():
        workdir = shutil.copytree(reference["workdir"] / "checkpoints", tmp_path / name / "checkpoints").parent
        damage(workdir / "checkpoints" / "24")
        checkpoints = RunCheckpoints(workdir, config)
        state, meta = checkpoints.restore_latest(abstract)
        checkpoints.close()
        assert int(state.step) == 20 and meta["step"] == 20, name
        assert steps_on_disk(workdir) == [16, 20] and list((workdir / "checkpoints").glob("24.corrupt-*")), name


def test_no_readable_checkpoint_is_a_clear_error_and_nothing_moves(tmp_path, reference, data_cache):
    config = small_config(data_cache)
    workdir = copy_run(reference, tmp_path)
    for step in (16, 20, 24):
        (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("")
    checkpoints = RunCheckpoints(workdir, config)
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be read \(step 24: .*step 16: .*Nothing was "):
        checkpoints.restore_latest(abstract_state(config, tmp_path / "setup"))
    checkpoints.close()
    assert steps_on_disk(workdir) == [16, 20, 24] and not list((workdir / "checkpoints").glob("*corrupt*"))


def test_checkpoints_of_another_model_are_a_config_error_not_damage(tmp_path, reference, data_cache, monkeypatch):
    workdir = copy_run(reference, tmp_path)
    monkeypatch.setattr(trainer, "fresh_state", lambda run: pytest.fail("compiled an initialization"))
    with pytest.raises(ConfigError, match="do not fit this config's model.*Use a new --workdir"):
        train_and_evaluate(small_config(data_cache, ema_decay=0.9), workdir)  # EMA adds arrays to the state
    assert steps_on_disk(workdir) == [16, 20, 24] and not list((workdir / "checkpoints").glob("*corrupt*"))
    assert json.loads((workdir / "config.json").read_text())["ema_decay"] is None  # the run's own, not overwritten


# --- what a checkpoint means, whether it restores, what comes after the last step -----------------------------------


def saved_meta(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def back_to_step(workdir, step):
    """The workdir as a run preempted right after `step` left it: later checkpoints and metrics gone."""
    for later in steps_on_disk(workdir):
        if later > step:
            shutil.rmtree(workdir / "checkpoints" / str(later))
    metrics = workdir / "metrics.jsonl"
    metrics.write_text(
        "".join(line + "\n" for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step)
    )


def test_a_checkpoint_records_what_its_step_means(reference):
    workdir = reference["workdir"]
    meta = saved_meta(workdir, 20)
    assert meta == {
        "step": 20,
        "images_seen": 20 * 16,
        "config": json.loads((workdir / "config.json").read_text()),
        **json.loads((workdir / "model.json").read_text()),  # the same record as the workdir's files
    }
    assert (meta["config"]["global_batch_size"], meta["config"]["optimizer"]["accumulation_steps"]) == (16, 1)
    assert meta["total_steps"] == TOTAL_STEPS and meta["data"]["train_examples"] == 1437
    assert meta["data"]["class_names"] == [str(digit) for digit in range(10)]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(global_batch_size=32),
            r"made with global_batch_size=16 \(step 20: 320 images seen\), but this config gives "
            r"global_batch_size=32, under which their step would mean other images and updates\. "
            r"Rerun with --config.global_batch_size=16 to resume, or start a new --workdir",
        ),
        (
            dict(total_steps=12),
            r"made with total_steps=24 \(step 20: 320 images seen\), but this config gives "
            r"total_steps=12, which would end the run at step 12, before or at the checkpoint\. Rerun "
            r"with --config.total_steps=24",
        ),
    ],
)
def test_a_rerun_that_changes_what_a_step_means_is_refused_and_keeps_the_config(
    tmp_path, reference, data_cache, monkeypatch, change, message
):
    workdir = copy_run(reference, tmp_path)
    back_to_step(workdir, 20)
    config = small_config(data_cache)
    for key, value in change.items():
        config[key].update(value) if isinstance(value, dict) else config.update({key: value})
    monkeypatch.setattr(trainer, "train_loop", lambda *args: pytest.fail("trained on"))
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, workdir)
    assert json.loads((workdir / "config.json").read_text()) == json.loads(
        (reference["workdir"] / "config.json").read_text()
    )  # still describes the checkpoints


def test_a_checkpoint_that_records_no_run_is_one_clear_error(tmp_path, reference, data_cache):
    workdir = copy_run(reference, tmp_path)
    back_to_step(workdir, 20)
    for step in (16, 20):  # as an earlier version of qkv_vit saved them: no config, no data
        meta_file = workdir / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({key: meta[key] for key in ("step", "architecture")}))
    with pytest.raises(ConfigError, match=r"The checkpoint of step 20 in .* records no 'config' of its run"):
        train_and_evaluate(small_config(data_cache), workdir)


def test_another_accumulation_is_refused_like_another_batch(tmp_path, data_cache):
    config = small_config(data_cache, optimizer={"accumulation_steps": 4})
    now = trainer.build_run(config, tmp_path, data.open_source(config.data), target=Target.present()).record
    then = dataclasses.replace(
        now, config={**now.config, "optimizer": {**now.config["optimizer"], "accumulation_steps": 2}}
    )
    with pytest.raises(
        ConfigError,
        match=r"made with accumulation_steps=2 \(step 8: 128 images seen\), but this "
        r"config gives accumulation_steps=4, .* --config.optimizer.accumulation_steps=2 ",
    ):
        run_record.check_step_meaning(now, then, 8, str(tmp_path / "checkpoints"), str(tmp_path))


def test_a_longer_run_continues_from_the_checkpoint_with_a_warning(tmp_path, reference, data_cache, caplog):
    workdir = copy_run(reference, tmp_path)
    with caplog.at_level(logging.INFO):
        state = train_and_evaluate(small_config(data_cache, total_steps=TOTAL_STEPS + 2), workdir)
    assert int(state.step) == TOTAL_STEPS + 2
    assert (
        f"This run is now {TOTAL_STEPS + 2} steps long, but {TOTAL_STEPS} when step {TOTAL_STEPS} was saved: it "
        f"continues to step {TOTAL_STEPS + 2}"
    ) in caplog.text


def test_the_final_state_is_saved_before_the_final_evaluation_and_a_rerun_only_evaluates(
    tmp_path, reference, data_cache, monkeypatch
):
    workdir = copy_run(reference, tmp_path)
    back_to_step(workdir, 16)
    real_evaluate = trainer.evaluate_state

    def crashes_at_the_end(run, state, batches):
        if int(state.step) == TOTAL_STEPS:
            raise RuntimeError("the evaluation crashed")
        return real_evaluate(run, state, batches)

    monkeypatch.setattr(trainer, "evaluate_state", crashes_at_the_end)
    with pytest.raises(RuntimeError, match="the evaluation crashed"):
        train_and_evaluate(small_config(data_cache), workdir)
    assert steps_on_disk(workdir) == [16, 20, 24]  # the last step's checkpoint was written first
    assert not [m for m in read_metrics(workdir) if "val/top1" in m]

    monkeypatch.setattr(trainer, "evaluate_state", real_evaluate)
    monkeypatch.setattr(trainer, "train_batch_stream", lambda *args, **kwargs: pytest.fail("trained again"))
    state = train_and_evaluate(small_config(data_cache), workdir)
    assert_same(state.params, reference["params"])
    assert [m["step"] for m in read_metrics(workdir) if "val/top1" in m] == [TOTAL_STEPS]
    train_and_evaluate(small_config(data_cache), workdir)  # now finished: evaluates nothing more
    assert [m["step"] for m in read_metrics(workdir) if "val/top1" in m] == [TOTAL_STEPS]


@pytest.mark.parametrize("name", ["exp [v1]", "run*", "what?", "back\\slash"])
def test_a_workdir_path_orbax_would_read_as_a_glob_is_refused_before_any_work(tmp_path, data_cache, monkeypatch, name):
    monkeypatch.setattr(data, "open_source", lambda *args: pytest.fail("read data"))
    with pytest.raises(ConfigError, match=r"has .* in its path .* choose a --workdir whose full path has none of "):
        train_and_evaluate(small_config(data_cache), tmp_path / "runs" / name)
    assert not (tmp_path / "runs").exists()


def test_a_first_checkpoint_that_does_not_read_back_stops_the_run_at_once(tmp_path, data_cache, monkeypatch):
    """Whatever the cause: here Orbax merges no per-process files, as it does under a path it globs wrongly."""

    async def merges_nothing(*args, **kwargs):
        return None

    monkeypatch.setattr(ocp._src.serialization.ocdbt_utils, "merge_ocdbt_per_process_files", merges_nothing)
    monkeypatch.setattr(Reporter, "train", lambda *args: pytest.fail("trained past the first checkpoint"))
    with pytest.raises(
        CheckpointError,
        match=r"The checkpoint of step 4 was written to .* but cannot be read back "
        r"\(.*\), so the run stops rather than train on",
    ):
        train_and_evaluate(small_config(data_cache, log_every_steps=5), tmp_path / "run")


# --- full disk, unwritable workdir ------------------------------------------------------------------------------


def files_of(step_dir):
    return {p.relative_to(step_dir): p.read_bytes() for p in sorted(step_dir.rglob("*")) if p.is_file()}


def test_full_disk_while_saving_is_a_clear_error_and_the_previous_checkpoint_stays(
    tmp_path, reference, data_cache, monkeypatch
):
    workdir = copy_run(reference, tmp_path)
    for step in (20, 24):
        shutil.rmtree(workdir / "checkpoints" / str(step))  # a run that has reached step 16
    before = files_of(workdir / "checkpoints" / "16")
    write_json = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_20(self, item, directory):
        if item["step"] == 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await write_json(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_20)
    # The save of step 20 runs in the background; its failure surfaces at the next save and is named as step 20's.
    with pytest.raises(CheckpointError, match=r"checkpoint of step 20 .*No space left on device.*step 16, is intact"):
        train_and_evaluate(small_config(data_cache), workdir)
    assert steps_on_disk(workdir) == [16] and files_of(workdir / "checkpoints" / "16") == before
    assert not list((workdir / "checkpoints").glob("*tmp*"))  # the partial write is gone


def test_a_failed_background_save_logs_one_line_not_orbax_traceback():
    """On the console Orbax's error record keeps its message and drops its traceback (our `error:` line follows
    with the cause); other records keep theirs."""
    from qkv_vit.train.logging_utils import QuietLibraries

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        exc_info = sys.exc_info()
    orbax_path = os.path.join(os.path.dirname(ocp.__file__), "_src", "checkpointers", "async_checkpointer.py")
    orbax = logging.LogRecord("absl", logging.ERROR, orbax_path, 1, "Failed to run 1 Handler Commit", None, exc_info)
    ours = logging.LogRecord("root", logging.ERROR, trainer.__file__, 1, "a bug", None, exc_info)
    chatter = logging.LogRecord(
        "tensorflow", logging.INFO, "/elsewhere/tf.py", 1, "Creating a tf.data.Dataset", None, None
    )
    progress = logging.LogRecord("root", logging.INFO, trainer.__file__, 1, "step 4/8", None, None)
    assert QuietLibraries().filter(orbax) and QuietLibraries().filter(ours) and QuietLibraries().filter(progress)
    assert not QuietLibraries().filter(chatter)  # by logger name, wherever the library's file lies
    benign = logging.LogRecord(
        "absl", logging.WARNING, "/tfds/file_utils.py", 394, "Variant folder %s has no dataset_info.json", ("/c",), None
    )
    warning = logging.LogRecord("absl", logging.WARNING, "/tfds/x.py", 1, "Something is off", None, None)
    assert not QuietLibraries().filter(benign) and QuietLibraries().filter(warning)  # normal work, off the console
    assert logging.Formatter().format(orbax) == "Failed to run 1 Handler Commit"
    assert "Traceback" in logging.Formatter().format(ours)


def test_full_disk_while_writing_metrics_is_the_same_clear_error(tmp_path, reference, data_cache, monkeypatch):
    workdir = copy_run(reference, tmp_path)
    for step in (20, 24):
        shutil.rmtree(workdir / "checkpoints" / str(step))

    def disk_full(self, step, scalars):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(logging_utils.JsonlWriter, "write_scalars", disk_full)
    with pytest.raises(StorageError, match=r"metrics.jsonl.*The last complete checkpoint is step 16; free disk"):
        train_and_evaluate(small_config(data_cache), workdir)
    assert steps_on_disk(workdir) == [16]


def test_full_disk_under_tensorboards_writer_is_the_same_clear_error_naming_the_last_checkpoint(
    tmp_path, reference, data_cache, monkeypatch
):
    """TensorFlow's event writer words the OSError in its own exception type: still one StorageError."""
    import tensorflow as tf
    from clu import metric_writers

    workdir = copy_run(reference, tmp_path)
    for step in (20, 24):
        shutil.rmtree(workdir / "checkpoints" / str(step))

    def disk_full(self, step, scalars):
        if step > 18:  # after the checkpoint of step 18
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{workdir}/events.out.tfevents; No space left on device"
            )

    monkeypatch.setattr(metric_writers.SummaryWriter, "write_scalars", disk_full)
    with pytest.raises(StorageError) as raised:
        train_and_evaluate(small_config(data_cache, checkpoint_every_steps=2), workdir)
    message = str(raised.value)
    assert message.startswith(f"Writing to the workdir {workdir} failed (No space left on device; ResourceExhausted")
    assert "The last complete checkpoint is step 18; free disk space or fix permissions" in message
    assert 18 in steps_on_disk(workdir) and 20 not in steps_on_disk(workdir)


def test_a_log_file_that_cannot_be_written_is_dropped_with_one_warning(tmp_path, capsys, caplog):
    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    with caplog.at_level(logging.INFO), logging_utils.workdir_log(tmp_path):
        (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, logging_utils.WorkdirLogHandler)]
        handler.stream = FullDisk()
        for n in range(3):
            logging.info("record %d", n)
        assert handler not in logging.getLogger().handlers
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stopped writing")]
    assert stopped == [
        f"Stopped writing {tmp_path / 'log.txt'}: [Errno 28] No space left on device. The console keeps every message."
    ]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("record")] == [
        "record 0",
        "record 1",
        "record 2",
    ]  # the records still reach the other handlers
    assert "Logging error" not in capsys.readouterr().err


def test_unwritable_workdir_fails_before_any_work(tmp_path, data_cache, monkeypatch):
    monkeypatch.setattr(data, "open_source", lambda *args: pytest.fail("read data after a bad workdir"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="Cannot write to the workdir .*: Not a directory"):
        train_and_evaluate(small_config(data_cache), tmp_path / "file" / "run")
    if os.geteuid() != 0:  # root writes through permissions
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="Permission denied"):
            train_and_evaluate(small_config(data_cache), tmp_path / "locked")


# --- NaN / inf ------------------------------------------------------------------------------------------------------


def test_nonfinite_loss_on_the_command_line_stops_with_exit_code_3_and_one_line(tmp_path, reference, data_cache):
    workdir = copy_run(reference, tmp_path)
    result = subprocess.run(
        cli_command(
            workdir,
            "--config.total_steps=28",
            "--config.optimizer.lr=1e30",
            "--allow_config_change",
            data_cache=data_cache,
        ),
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Loss or gradients became NaN/inf at step 25") and "Traceback" not in result.stderr
    assert f"Last good checkpoint: step 24 in {workdir}/checkpoints" in last
    assert steps_on_disk(workdir) == [16, 20, 24]


# --- data ----------------------------------------------------------------------------------------------------------


def test_unreadable_and_non_image_files_are_skipped_and_counted_in_the_log(tmp_path, data_cache, monkeypatch, caplog):
    root = tmp_path / "images"
    write_image_folder(root, {"train": {"a": 8, "b": 8}, "test": {"a": 2, "b": 2}}, size=(32, 32))
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    config = small_config(data_cache)
    config.data.update(source="image_folder", path=str(root))

    class SetUp(Exception):
        pass

    monkeypatch.setattr(trainer, "initial_state", lambda *args: (_ for _ in ()).throw(SetUp()))
    with caplog.at_level(logging.INFO), pytest.raises(SetUp):
        train_and_evaluate(config, tmp_path / "run")
    assert (
        "Data: image_folder, 16 train examples (split 'train'); evaluation on split 'test' (4 examples)." in caplog.text
    )
    assert f"Skipped 2 unreadable or non-image files of {root}" in caplog.text and "label_map.json" in caplog.text


def test_train_data_that_changed_since_the_checkpoint_is_reported_on_resume(tmp_path, reference, data_cache, caplog):
    workdir = copy_run(reference, tmp_path)
    config = small_config(data_cache)
    config.data.train_split = "train[:50%]"  # as if files were removed from the folder between runs
    with caplog.at_level(logging.INFO):
        train_and_evaluate(config, workdir, allow_config_change=True)  # a changed key, allowed: the data is checked
    assert "The train split has 718 examples now but had 1437 when step 24 was saved" in caplog.text


# --- bad input ------------------------------------------------------------------------------------------------------

BEFORE_ANY_DATA = [
    (dict(model_name="xcit_nano_13_p16"), "Unknown model 'xcit_nano_13_p16'"),
    (dict(qkv="fsne_m3"), "Unknown QKV preset 'fsne_m3'"),
    (dict(model={"qkv_embed": "snee"}), "Unknown qkv_embed 'snee'"),
    (dict(model={"code_mode": "mul"}), "Unknown code_mode 'mul'"),
    (dict(model={"patch_size": 12}), "patch_size must be 16 or 8"),
    (dict(model={"code_size": 0}), "code_size must be positive"),
    (dict(model={"num_heads": 5}), "num_heads must divide embed_dim"),
    (dict(data={"image_size": 36}), "image_size=36 is not divisible by the patch size 8"),
    (dict(global_batch_size=0), "config.global_batch_size must be an integer >= 1, got 0"),
    (dict(log_every_steps=0), "config.log_every_steps must be an integer >= 1"),
    (dict(checkpoint_every_steps=-1), "config.checkpoint_every_steps must be an integer >= 0"),
    (dict(data={"source": "image_folder", "path": None}), 'source="image_folder" needs a path: set config.data.path'),
]


@pytest.mark.parametrize("change, message", BEFORE_ANY_DATA)
def test_bad_config_fails_before_any_data_is_read(tmp_path, data_cache, monkeypatch, change, message):
    config = small_config(data_cache)
    for key, value in change.items():
        config[key].update(value) if isinstance(value, dict) else config.update({key: value})
    monkeypatch.setattr(data, "open_source", lambda *args: pytest.fail("read data after a bad config"))
    with pytest.raises((ConfigError, data.DataConfigError), match=message):
        train_and_evaluate(config, tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        ("pretrain", r"init_from=.*pretrain does not fit the configured model \(\d+ variables differ\): .*blocks_1/"),
        ("missing", r"config.init_from: .*missing is neither converted weights"),
    ],
)
def test_bad_init_from_fails_before_anything_compiles(tmp_path, reference, data_cache, monkeypatch, source, message):
    (tmp_path / "pretrain").symlink_to(reference["workdir"])
    config = small_config(data_cache, init_from=str(tmp_path / source))
    config.model.depth = 2  # the pretrained run has one block
    monkeypatch.setattr(trainer, "fresh_state", lambda run: pytest.fail("compiled an initialization"))
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, tmp_path / "run")


def test_missing_data_set_fails_before_anything_compiles(tmp_path, data_cache, monkeypatch):
    config = small_config(data_cache)
    config.data.update(source="tfds", name="cifar10", data_dir=str(tmp_path / "no_data"))
    monkeypatch.setattr(trainer, "fresh_state", lambda run: pytest.fail("compiled an initialization"))
    with pytest.raises(data.DataConfigError, match=r"(?s)'cifar10' is not prepared .*qkv_vit.data.prepare cifar10"):
        train_and_evaluate(config, tmp_path / "run")


def test_every_input_mistake_is_a_config_error():
    """A caller (a sweep, a notebook) catches every fixable input mistake as ConfigError, still a ValueError."""
    from qkv_vit.convert import WeightMismatchError

    for kind in (data.DataConfigError, WeightMismatchError):
        assert issubclass(kind, ConfigError) and issubclass(kind, ValueError)
    assert not issubclass(CheckpointError, ConfigError)


def test_command_line_mistakes_are_one_line_with_their_exit_code(tmp_path, data_cache):
    """Real processes, started together: each prints one `error:` line, no traceback, and leaves no checkpoint."""
    torch = pytest.importorskip("torch", reason="the PyTorch case needs the torch extra")
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    (tmp_path / "file").write_text("")
    eight_devices = {**CLI_ENV, **fake_devices(8)}
    cases = {  # name: (command, environment, exit code, words the error line must hold)
        "unknown key": (
            cli_command(tmp_path / "key", "--config.optimzer.lr=1", data_cache=data_cache),
            CLI_ENV,
            2,
            ["--config.optimzer.lr=1", "no key 'optimzer.lr'", "did you mean 'optimizer.lr'"],
        ),
        "batch vs devices": (
            cli_command(tmp_path / "batch", "--config.global_batch_size=12", data_cache=data_cache),
            eight_devices,
            2,
            ["global_batch_size=12 is not divisible by the 8 devices"],
        ),
        "missing data": (
            cli_command(
                tmp_path / "data",
                "--config.data.source=image_folder",
                f"--config.data.path={tmp_path}/nowhere",
                data_cache=data_cache,
            ),
            CLI_ENV,
            2,
            ["nowhere does not exist"],
        ),
        "missing config file": (
            [*MAIN, "--config=configs/nowhere.py", f"--workdir={tmp_path}/config"],
            CLI_ENV,
            2,
            ["--config=configs/nowhere.py: cannot read configs/nowhere.py (No such file or directory)"],
        ),
        "bad config argument": (
            [*MAIN, "--config=configs/quickstart.py:qkv_preset=sne", f"--workdir={tmp_path}/arg"],
            CLI_ENV,
            2,
            ["Unknown config argument(s) ['qkv_preset']", "accepts, qkv, runlocal"],
        ),
        "unwritable workdir": (
            cli_command(tmp_path / "file" / "run", data_cache=data_cache),
            CLI_ENV,
            4,
            ["Cannot write to the workdir", "Not a directory"],
        ),
        "tuple of one number": (
            cli_command(tmp_path / "tuple", "--config.data.augment.crop_scale=(0.5,)", data_cache=data_cache),
            CLI_ENV,
            2,
            ["config.data.augment.crop_scale must be 2 numbers", "got (0.5,)"],
        ),
        "workdir read as a glob": (
            cli_command(tmp_path / "exp [v1]", data_cache=data_cache),
            CLI_ENV,
            2,
            ["exp [v1] has [ ] in its path"],
        ),
        "torch file of another architecture": (
            [sys.executable, "-m", "qkv_vit.convert", str(tmp_path / "resnet.pth"), str(tmp_path / "out")],
            CLI_ENV,
            2,
            ["not an XCiT checkpoint"],
        ),
    }
    running = {
        name: subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, (command, env, _, _) in cases.items()
    }
    for name, process in running.items():
        _, stderr = process.communicate(timeout=DEADLINE_S)
        _, _, code, words = cases[name]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert process.returncode == code and len(errors) == 1 and "Traceback" not in stderr, (name, stderr[-3000:])
        assert all(word in errors[0] for word in words), (name, errors[0])
    assert not list(tmp_path.glob("*/checkpoints")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure, gone", [(errno.ENOTEMPTY, True), (errno.EACCES, False)])
def test_an_unfinished_save_is_removed_after_a_write_in_flight_and_left_with_a_warning_when_it_cannot_be(
    tmp_path, monkeypatch, caplog, failure, gone
):
    from etils import epath

    from qkv_vit.train import checkpointing

    unfinished = tmp_path / "5.orbax-checkpoint-tmp-1234"
    (unfinished / "params").mkdir(parents=True)
    path_class = type(epath.Path(tmp_path))  # epath's concrete class (rmtree is defined there)
    remove, calls = path_class.rmtree, []

    def rmtree_failing_once(self, **kwargs):
        calls.append(self)
        if len(calls) == 1:  # a write in flight adding a file, or a permission missing
            raise OSError(failure, os.strerror(failure), str(self))
        if failure == errno.EACCES:
            raise AssertionError("a permission error is not retried")
        remove(self, **kwargs)

    monkeypatch.setattr(path_class, "rmtree", rmtree_failing_once)
    monkeypatch.setattr(checkpointing, "REMOVAL_QUIET_S", 0.01)
    with caplog.at_level(logging.WARNING):
        checkpointing.remove_unfinished_saves(epath.Path(tmp_path))
    assert unfinished.exists() is not gone
    assert ("remove it by hand" in caplog.text) is not gone
    assert len(calls) == (2 if gone else 1)


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.optimzer.lr=1", ["no key 'optimzer.lr'", "did you mean 'optimizer.lr'"]),
        ("--noconfig.async_checkpointin", ["no key 'async_checkpointin'", "did you mean 'async_checkpointing'"]),
        # Each renamed key (the table's entries), with the key to set instead.
        *((f"--{old}=1", [old, new.split()[0]]) for old, new in RENAMED_KEYS.items()),
    ],
)
def test_an_override_key_the_config_lacks_is_one_error_before_absl_parses(override, words):
    from qkv_vit import config_file

    argument, argv = config_file.split_argv(["main", "--config", f"{REPO}/configs/quickstart.py:runlocal", override])
    assert argument == f"{REPO}/configs/quickstart.py:runlocal" and argv == ["main", override]
    with pytest.raises(ConfigError) as raised:
        config_file.check_override_keys(argv, config_file.load(argument))
    assert str(raised.value).startswith(override) and all(word in str(raised.value) for word in words)
    argv = ["main", "--config.mesh.fsdp=1", "--noconfig.init_from_ema"]
    config_file.check_override_keys(argv, config_file.load(f"{REPO}/configs/quickstart.py"))


def test_the_config_argument_is_found_in_either_form_and_help_needs_none():
    from qkv_vit import config_file

    assert config_file.split_argv(["main", "--config=a.py", "--config", "b.py:x", "--workdir=w"]) == (
        "b.py:x",
        ["main", "--workdir=w"],
    )  # the last one, as absl takes it
    assert config_file.split_argv(["main", "--config=a.py", "--", "--config=b.py"])[0] == "a.py"
    assert config_file.split_argv(["main", "--helpfull"]) == (None, ["main", "--helpfull"])
    with pytest.raises(ConfigError, match="--config=FILE is required"):
        config_file.split_argv(["main", "--workdir=w"])
    shown = subprocess.run(
        [sys.executable, "-m", "qkv_vit.main", "--helpfull"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "--workdir" in shown.stdout + shown.stderr and "error:" not in shown.stderr  # absl's help exits 1


def test_a_run_that_logs_nothing_leaves_no_empty_log_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO), logging_utils.workdir_log(tmp_path):
        pass  # e.g. stopped by a config error before its first record
    assert not (tmp_path / "log.txt").exists()
    with caplog.at_level(logging.INFO), logging_utils.workdir_log(tmp_path):
        logging.info("the first record")
    assert "the first record" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("module", ["qkv_vit.sweep", "qkv_vit.results"])
def test_a_listing_piped_into_a_reader_that_stops_ends_without_a_traceback(module, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"seed": 0}))
    model = {"model_name": "xcit_nano_12_p8", "architecture": {}, "num_params": 1, "total_steps": 1}
    (run / "model.json").write_text(json.dumps(model))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val/top1": 0.5}) + "\n")
    argument = "configs/cifar10.py" if module == "qkv_vit.sweep" else str(tmp_path)
    # `true` has closed the pipe before Python writes its first line (as `head` has after the lines it wanted)
    command = f"{shlex.quote(sys.executable)} -m {module} {argument} | true"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # buffered, as usual
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr[-2000:]


def test_a_log_file_that_cannot_be_opened_stops_only_the_file_not_the_run(tmp_path, caplog):
    (tmp_path / "log.txt").mkdir()  # opening it for writing fails (as a read-only file would for a user)
    with caplog.at_level(logging.INFO), logging_utils.workdir_log(tmp_path):
        logging.info("the first record")  # opens the file: fails, and says so once
        logging.info("the second record")
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stopped writing")]
    assert len(stopped) == 1 and "The console keeps every message." in stopped[0]
