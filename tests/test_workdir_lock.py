"""One run at a time in a workdir (qkv_vit/train/workdir_lock.py): a second run refuses with one `error:` line
naming the holder, and a lock file left by a killed run never blocks the rerun that resumes it."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from qkv_vit.errors import ConfigError
from qkv_vit.train.workdir_lock import workdir_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with workdir_lock(tmp_path, 0):
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on host .*, started 20"):
            with workdir_lock(tmp_path, 0):
                pytest.fail("two holders")
        with workdir_lock(tmp_path, 1):  # another process of the same run: its own lock file
            assert (tmp_path / ".lock.process1").exists()
    with workdir_lock(tmp_path, 0):  # released when the run ends
        pass


def test_a_lock_left_by_a_killed_run_does_not_block_the_rerun(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qkv_vit.train.workdir_lock import workdir_lock\n"
            f"with workdir_lock({str(tmp_path)!r}, 0):\n    print('held', flush=True); time.sleep(600)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"):
        with workdir_lock(tmp_path, 0):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # the file stays; the lock went
    with workdir_lock(tmp_path, 0):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_object_store_workdirs_are_not_locked(tmp_path):
    with workdir_lock("gs://bucket/run", 0):
        pass


@pytest.mark.slow
def test_a_second_run_in_a_held_workdir_is_one_error_line_before_it_writes(tmp_path, data_cache):
    command = [sys.executable, "-m", "qkv_vit.main", "--config=configs/quickstart.py:runlocal", f"--workdir={tmp_path}"]
    command.append(f"--config.data.cache_dir={data_cache}")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with workdir_lock(tmp_path, 0):
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: The workdir {tmp_path} is in use by another run (pid {os.getpid()} on host" in errors[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock"]  # no log.txt, config.json, checkpoints


def test_when_another_process_of_the_run_finds_its_lock_taken_every_process_stops(tmp_path, monkeypatch):
    from qkv_vit.train import workdir_lock as module

    monkeypatch.setattr(module, "all_processes_agree", lambda ok: False)  # process 1's lock was taken
    with pytest.raises(ConfigError, match=r"in use by another run \(found by another process of this run\)"):
        with workdir_lock(tmp_path, 0):
            pytest.fail("went on alone")
