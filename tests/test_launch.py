"""Launchers: what each prints with --dry-run, and that without it they really run those steps (gcloud, sbatch
and the trainer replaced by stubs that record how they were called: none of them exists here)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launch import local, parallel, slurm, sweep, tpu_pod  # noqa: E402

CONFIG = "configs/imagenet.py:model=nano_12_p16,qkv=fsne_m8_wide"


def dry_run(capsys, module, *argv):
    assert module.main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def test_tpu_pod_runs_the_same_command_on_every_worker(capsys):
    lines = dry_run(
        capsys,
        tpu_pod,
        "--tpu=pod",
        "--zone=us-central2-b",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/in1k/n12",
        "--env=TFDS_DATA_DIR=gs://bucket/tfds",
        "--config.seed=1",
    )
    assert len(lines) == 2  # the plan, here, then the run on every worker
    planned = shlex.split(lines[0])
    assert planned[1:3] == ["-m", "qkv_vit.plan"] and f"--config={CONFIG}" in planned and "--config.seed=1" in planned
    assert "--topology=v4:2x2x4" in planned and "--chip-config=megacore" in planned  # v4-32, the default type
    argv = shlex.split(lines[1])
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all"]
    assert "--zone=us-central2-b" in argv
    remote = shlex.split(next(a for a in argv if a.startswith("--command=")).removeprefix("--command="))
    assert remote[:3] == ["cd", "qkv_vit", "&&"]
    assert remote[3:] == [
        "TFDS_DATA_DIR=gs://bucket/tfds",
        "python3",
        "-m",
        "qkv_vit.main",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/in1k/n12",
        "--distributed",
        "--config.seed=1",
    ]


def test_tpu_pod_create_and_setup_copy_this_checkout_to_all_workers(capsys):
    lines = dry_run(
        capsys,
        tpu_pod,
        "--tpu=pod",
        "--zone=z",
        "--project=p",
        "--create",
        "--accelerator-type=v5litepod-16",
        "--setup",
        "--detach",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/run",
    )
    planned, create, pack, copy, install, train = lines
    assert "-m qkv_vit.plan" in planned and "--topology=v5e:4x4" in planned and "--chip-config" not in planned
    assert create.startswith("gcloud compute tpus tpu-vm create pod --accelerator-type=v5litepod-16")
    assert "--project=p" in create and "--zone=z" in create
    assert pack.startswith(f"git -C {REPO} ls-files -co --exclude-standard -z | tar -czf")
    assert "scp /tmp/qkv_vit-src.tar.gz pod:qkv_vit-src.tar.gz --worker=all" in copy
    assert "--worker=all" in install and 'pip install -q -e ./qkv_vit "jax[tpu]"' in install
    assert "nohup python3 -m qkv_vit.main" in train and "> ~/qkv_vit-train.log 2>&1 < /dev/null &" in train


def test_tpu_pod_refuses_a_config_the_plan_finds_too_big_before_anything_starts(stub_bin, tmp_path, monkeypatch):
    """The plan step's exit code (5: does not fit) stops the launch: gcloud is never called."""
    calls = stub_bin("gcloud")
    planner = tmp_path / "python-that-plans-too-big"
    planner.write_text("#!/bin/sh\nexit 5\n")
    planner.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(planner))
    assert tpu_pod.main(["--tpu=pod", "--zone=z", f"--config={CONFIG}", "--workdir=gs://b/run", "--create"]) == 5
    assert calls() == []


def test_tpu_pod_warns_when_the_workdir_is_not_a_bucket(capsys):
    assert tpu_pod.main(["--tpu=pod", "--zone=z", f"--config={CONFIG}", "--workdir=/home/me/run", "--dry-run"]) == 0
    assert "not a gs:// bucket" in capsys.readouterr().err


def test_slurm_script_runs_one_process_per_gpu_with_srun(capsys):
    lines = dry_run(
        capsys,
        slurm,
        "--nodes=4",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--account=proj",
        "--setup=source .venv/bin/activate",
        f"--config={CONFIG}",
        "--workdir=/shared/runs/n12",
        "--config.ema_decay=0.99996",
    )
    assert (
        lines[0] == "# write /shared/runs/n12/launch.sbatch:" and lines[-1] == "sbatch /shared/runs/n12/launch.sbatch"
    )
    script = [line.removeprefix("#   ") if line != "#" else "" for line in lines[1:-1]]  # the file, as printed
    for option in (
        "--job-name=n12",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-task=1",
        "--partition=gpu",
        "--account=proj",
        "--signal=TERM@120",
        "--requeue",
    ):
        assert f"#SBATCH {option}" in script
    srun = next(line for line in script if line.startswith("srun "))
    assert shlex.split(srun)[2:] == [
        "python",
        "-m",
        "qkv_vit.main",
        f"--config={CONFIG}",
        "--workdir=/shared/runs/n12",
        "--distributed",
        "--config.ema_decay=0.99996",
    ]
    assert script.index("source .venv/bin/activate") < script.index(srun)
    assert 'if [ "$status" -eq 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in script


@pytest.fixture
def stub_bin(tmp_path, monkeypatch):
    """A directory first on PATH where `stub(name)` makes a command that appends its argv to name.calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def stub(name):
        path = bin_dir / name
        path.write_text(
            f"#!{sys.executable}\nimport json, sys\n"
            f"open({str(bin_dir / (name + '.calls'))!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        )
        path.chmod(0o755)
        calls = bin_dir / f"{name}.calls"
        return lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return stub


def test_slurm_writes_the_script_and_submits_it(tmp_path, stub_bin):
    calls = stub_bin("sbatch")
    workdir = tmp_path / "run"
    assert slurm.main(["--nodes=2", f"--config={CONFIG}", f"--workdir={workdir}"]) == 0
    assert calls() == [[str(workdir / "launch.sbatch")]]
    script = (workdir / "launch.sbatch").read_text()
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=run\n#SBATCH --nodes=2\n")


def test_tpu_pod_calls_gcloud_for_real(stub_bin):
    calls = stub_bin("gcloud")
    assert tpu_pod.main(["--tpu=pod", "--zone=z", f"--config={CONFIG}", "--workdir=gs://b/run", "--no-plan"]) == 0
    (call,) = calls()
    assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all"]
    assert "--distributed" in call[6]


def test_local_processes_get_coordinator_flags_and_fake_devices(capsys):
    lines = dry_run(
        capsys,
        local,
        "--processes=2",
        "--cpu-devices=4",
        "--port=23456",
        "--python=python",
        "--config=configs/quickstart.py:runlocal",
        "--workdir=/tmp/q",
        "--config.total_steps=2",
    )
    assert len(lines) == 2
    for index, line in enumerate(lines):
        assert shlex.split(line) == [
            "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "python",
            "-m",
            "qkv_vit.main",
            "--config=configs/quickstart.py:runlocal",
            "--workdir=/tmp/q",
            "--coordinator_address=127.0.0.1:23456",
            "--num_processes=2",
            f"--process_id={index}",
            "--config.total_steps=2",
        ]
    single = dry_run(capsys, local, "--python=python", "--config=configs/quickstart.py", "--workdir=w")
    assert single == ["python -m qkv_vit.main --config=configs/quickstart.py --workdir=w"]


def fake_trainer(tmp_path):
    """A stand-in for `python` that records its arguments and environment; process 1 fails if told to."""
    path = tmp_path / "fake_python"
    path.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(f"""
        import json, os, sys, time
        index = next(a for a in sys.argv if a.startswith("--process_id=")).split("=")[1]
        record = {{"argv": sys.argv[1:], "xla": os.environ.get("XLA_FLAGS"), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}}
        open({str(tmp_path)!r} + f"/started{{index}}", "w").write(json.dumps(record))
        if os.environ.get("FAIL_PROCESS_1"):
            if index == "1":
                sys.exit(3)
            time.sleep(600)  # stopped by the launcher long before
        open({str(tmp_path)!r} + f"/finished{{index}}", "w").write("")
    """)
    )
    path.chmod(0o755)
    return path


def test_local_starts_every_process_and_waits_for_them(tmp_path):
    python = fake_trainer(tmp_path)
    argv = ["--processes=2", "--gpu-per-process", f"--python={python}", "--config=configs/quickstart.py", "--workdir=w"]
    assert local.main(argv) == 0
    for index in (0, 1):
        record = json.loads((tmp_path / f"started{index}").read_text())
        assert record["gpu"] == str(index) and f"--process_id={index}" in record["argv"]
        assert (tmp_path / f"finished{index}").exists()


def test_local_stops_the_other_processes_when_one_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIL_PROCESS_1", "1")
    python = fake_trainer(tmp_path)
    argv = ["--processes=2", f"--python={python}", "--config=configs/quickstart.py", "--workdir=w"]
    assert local.main(argv) == 3
    assert (tmp_path / "started0").exists() and not (tmp_path / "finished0").exists()


def test_sweep_gives_each_point_its_own_workdir(capsys):
    lines = dry_run(
        capsys,
        sweep,
        "local",
        "--config=configs/cifar10.py",
        "--sweep=depth=4,epochs=2",
        "--workdir=workdirs/c10/",
        "--python=python",
        "--config.log_every_steps=10",
    )
    assert len(lines) == 15
    assert lines[0] == (
        "python -m qkv_vit.main --config=configs/cifar10.py:qkv=linear,seed=0,depth=4,epochs=2 "
        "--workdir=workdirs/c10/qkv-linear_seed-0_depth-4_epochs-2 --config.log_every_steps=10"
    )
    only = dry_run(capsys, sweep, "local", "--config=configs/cifar10.py", "--workdir=w", "--only=qkv-sne_seed-2")
    assert len(only) == 1 and "--workdir=w/qkv-sne_seed-2" in only[0]


def test_sweep_on_a_tpu_pod_sets_up_once_then_runs_each_point(capsys):
    lines = dry_run(
        capsys,
        sweep,
        "tpu_pod",
        "--config=configs/imagenet.py",
        "--sweep=code_size,ema",
        "--tpu=pod",
        "--zone=z",
        "--setup",
        "--workdir=gs://b/codes",
    )
    plans = [line for line in lines if "-m qkv_vit.plan" in line]
    setup, runs = lines[1:4], [line for line in lines[4:] if line not in plans]
    assert len(plans) == 8 and lines[0] == plans[0] and "code_size=4" in plans[0]  # each point planned before it runs
    assert setup[0].startswith("git ") and "scp" in setup[1] and "pip install" in setup[2]
    assert len(runs) == 8 and all("--distributed" in run for run in runs)
    assert "--workdir=gs://b/codes/model-tiny_12_p16_qkv-fsne_code_size-32_ema" in runs[-1]


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (local, ["--config=c.py", "--workdir=w", "--lr=3"], "unrecognized arguments ['--lr=3']"),
        (sweep, ["local", "--config=configs/cifar10.py:qkv=sne", "--workdir=w"], "--config takes the file only"),
        (
            sweep,
            ["local", "--config=configs/cifar10.py", "--workdir=w", "--only=nope"],
            "--only ['nope'] not in the sweep",
        ),
        (
            sweep,
            ["local", "--config=configs/quickstart.py", "--workdir=w"],
            "error: configs/quickstart.py has no get_sweep",
        ),
        (sweep, ["local", "--config=configs/cifar10.py", "--sweep=seeds=0", "--workdir=w"], "error: seeds=0: give the"),
        (sweep, ["local", "--config=configs/nope.py", "--workdir=w"], "error: Config file configs/nope.py not found"),
        (slurm, ["--nodes=0", "--config=c.py", "--workdir=w"], "--nodes and --gpus-per-node must be >= 1"),
    ],
)
def test_bad_launch_arguments_are_one_line_errors(module, argv, message, capsys):
    with pytest.raises(SystemExit) as error:  # one `error:` line, never a traceback
        module.main([*argv, "--dry-run"])
    assert message in str(error.value) + capsys.readouterr().err


def fake_sweep_trainer(tmp_path):
    """A stand-in for `python`: answers the launcher's device probe as an NVIDIA GPU; as a sweep point's trainer
    records its memory share and cores, waits until every point in WAIT_FOR has started (so it only finishes when
    points run at once), sleeps DELAY_<point> seconds, then writes a finished run record with top-1 50%. The point
    named FAIL_POINT exits 3 instead, KILL_POINT kills itself with SIGKILL; on SIGTERM a point writes
    stopped-<point> half a second later and exits 143, as the trainer saves a checkpoint first."""
    path = tmp_path / "fake_python"
    path.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(f"""
        import json, os, pathlib, signal, sys, time
        if sys.argv[1] == "-c":
            print("gpu"); print("NVIDIA fake GPU"); sys.exit(0)
        workdir = pathlib.Path(next(a for a in sys.argv if a.startswith("--workdir=")).split("=", 1)[1])
        marks = pathlib.Path({str(tmp_path)!r})
        def stopped(signum, frame):
            time.sleep(0.5)
            (marks / f"stopped-{{workdir.name}}").write_text("")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stopped)
        record = {{"mem": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), "cores": sorted(os.sched_getaffinity(0))}}
        (marks / f"started-{{workdir.name}}").write_text(json.dumps(record))
        deadline = time.time() + 30
        while not all((marks / f"started-{{name}}").exists() for name in os.environ.get("WAIT_FOR", "").split()):
            if time.time() > deadline:
                sys.exit(5)
            time.sleep(0.05)
        if workdir.name == os.environ.get("FAIL_POINT"):
            print("error: this point fails")
            sys.exit(3)
        if workdir.name == os.environ.get("KILL_POINT"):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("DELAY_" + workdir.name.replace("-", "_"), "0")))
        qkv = workdir.name.split("_")[0].removeprefix("qkv-")
        seed = int(workdir.name.split("_")[1].removeprefix("seed-"))
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps({{"qkv": qkv, "seed": seed}}))
        model = {{"model_name": "xcit_nano_12_p8", "architecture": {{"qkv_embed": qkv, "embed_dim": 128}}, "num_params": 1000, "total_steps": 10}}
        (workdir / "model.json").write_text(json.dumps(model))
        (workdir / "metrics.jsonl").write_text(json.dumps({{"step": 10, "val/top1": 0.5}}) + "\\n")
        print("trained", workdir.name)
    """)
    )
    path.chmod(0o755)
    return path


def sweep_argv(tmp_path, python, *only, parallel=2):
    names = [f"--only={name}" for name in only]
    workdir = f"--workdir={tmp_path}/sweep"
    return ["local", f"--parallel={parallel}", "--config=configs/cifar10.py", workdir, f"--python={python}", *names]


def started(tmp_path, name):
    return json.loads((tmp_path / f"started-{name}").read_text())


TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give two points their own")


def test_parallel_sweep_is_refused_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # what JAX finds on a machine without an accelerator
    with pytest.raises(SystemExit) as error:
        sweep.main(["local", "--parallel=2", "--config=configs/cifar10.py", f"--workdir={tmp_path}"])
    assert str(error.value).startswith("error: --parallel 2 on a CPU: the CPU's cores are what every run computes")
    with pytest.raises(SystemExit, match="on a CPU"):  # fake CPU devices are the CPU too, whatever the machine has
        sweep.main(["local", "--parallel=2", "--cpu-devices=2", "--config=configs/cifar10.py", f"--workdir={tmp_path}"])


def test_a_parallel_dry_run_on_the_cpu_prints_the_commands_and_says_they_would_be_refused(capsys, monkeypatch):
    monkeypatch.setattr(parallel, "probe", lambda python: parallel.Devices("cpu", "cpu"))
    argv = ["local", "--parallel=2", "--config=configs/cifar10.py", "--workdir=w", "--only=qkv-sne_seed-0"]
    assert sweep.main([*argv, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.900 ")  # one point: all of it
    assert "note: printed only; run here, --parallel 2 on a CPU" in captured.err


@pytest.mark.parametrize("taskset", ["/usr/bin/taskset", None])
def test_parallel_sweep_gives_each_point_its_share_of_device_memory_and_cores(capsys, monkeypatch, taskset):
    monkeypatch.setattr(parallel, "probe", lambda python: parallel.Devices("gpu", "NVIDIA H100"))
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(parallel.shutil, "which", lambda name: taskset)
    argv = ["local", "--parallel=4", "--config=configs/cifar10.py", "--workdir=w", "--python=python", "--dry-run"]
    assert sweep.main([*argv, "--gpu-per-process", "--evaluate="]) == 0
    words = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(words) == 15 and {line[0] for line in words} == {"XLA_PYTHON_CLIENT_MEM_FRACTION=0.225"}
    if taskset:
        assert [line[1:3] for line in words[:5]] == [["taskset", "-c"]] * 5
        assert [line[3] for line in words[:5]] == ["0,1,2,3", "4,5,6,7", "8,9,10,11", "12,13,14,15", "0,1,2,3"]
    assert words[0][-3:-1] == ["bash", "-c"]  # the point's steps, environment assignments and all, inside bash
    train, evaluate = words[0][-1].split(" && ")
    assert train.startswith("CUDA_VISIBLE_DEVICES=0 python -m qkv_vit.main --config=configs/cifar10.py:qkv=linear")
    assert evaluate.startswith("CUDA_VISIBLE_DEVICES=0 python -m qkv_vit.evaluate w/qkv-linear_seed-0 ")
    few = ["--only=qkv-linear_seed-0", "--only=qkv-sne_seed-0"]  # fewer points than --parallel: shares for two
    assert sweep.main([*argv, *few]) == 0
    assert all(
        line.startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.450 ") for line in capsys.readouterr().out.split("\n")[:2]
    )


@pytest.mark.parametrize(
    "parallel_count, cores, shares",
    [(3, range(8), [[0, 1, 2], [3, 4, 5], [6, 7]]), (2, [5], [[5], [5]]), (1, [0, 1], [[0, 1]])],
)
def test_core_shares_split_the_cores_near_equally(parallel_count, cores, shares):
    assert parallel.core_shares(parallel_count, cores) == shares


@TWO_CORES
def test_parallel_sweep_runs_points_at_once_then_prints_a_line_each_and_the_table(tmp_path, monkeypatch, capsys):
    python = fake_sweep_trainer(tmp_path)
    names = ["qkv-linear_seed-0", "qkv-sne_seed-0"]
    monkeypatch.setenv("WAIT_FOR", " ".join(names))  # each point finishes only once both have started
    assert sweep.main(sweep_argv(tmp_path, python, *names)) == 0
    out = capsys.readouterr().out
    for name in names:
        assert f"done {name}: top-1 50.00% (step 10), 0m" in out
        assert f"log {tmp_path}/sweep/logs/{name}.log" in out
        assert f"trained {name}" in (tmp_path / "sweep" / "logs" / f"{name}.log").read_text()
        assert started(tmp_path, name)["mem"] == "0.450"
    assert not set(started(tmp_path, names[0])["cores"]) & set(started(tmp_path, names[1])["cores"])
    assert "| sne (h=128) | 1,000 | 50.00 | 1 |" in out and out.index("done ") < out.index("| data |")


@TWO_CORES
def test_a_point_takes_the_slot_of_the_point_that_ended(tmp_path, monkeypatch, capsys):
    python = fake_sweep_trainer(tmp_path)
    names = ["qkv-linear_seed-0", "qkv-sne_seed-0", "qkv-psne_seed-0"]
    monkeypatch.setenv("DELAY_qkv_linear_seed_0", "3")  # the first point runs on while the second ends
    assert sweep.main(sweep_argv(tmp_path, python, *names)) == 0
    assert started(tmp_path, names[2])["cores"] == started(tmp_path, names[1])["cores"]
    assert not set(started(tmp_path, names[2])["cores"]) & set(started(tmp_path, names[0])["cores"])


def test_a_failed_point_starts_no_other_but_lets_the_running_one_finish(tmp_path, monkeypatch, capsys):
    python = fake_sweep_trainer(tmp_path)
    names = ["qkv-linear_seed-0", "qkv-sne_seed-0", "qkv-psne_seed-0"]
    monkeypatch.setenv("WAIT_FOR", " ".join(names[:2]))
    monkeypatch.setenv("FAIL_POINT", names[0])
    monkeypatch.setenv("DELAY_qkv_sne_seed_0", "1")  # still running when the first fails
    assert sweep.main(sweep_argv(tmp_path, python, *names)) == 3
    out = capsys.readouterr().out
    assert f"FAILED {names[0]}: exit code 3 after 0m" in out and f"done {names[1]}: top-1 50.00%" in out
    assert f"not started after the failure: {names[2]}" in out
    assert not (tmp_path / f"started-{names[2]}").exists()
    assert "error: this point fails" in (tmp_path / "sweep" / "logs" / f"{names[0]}.log").read_text()


def test_a_killed_point_says_so_and_exits_as_a_shell_would(tmp_path, monkeypatch, capsys):
    python = fake_sweep_trainer(tmp_path)
    monkeypatch.setenv("KILL_POINT", "qkv-linear_seed-0")
    assert sweep.main(sweep_argv(tmp_path, python, "qkv-linear_seed-0")) == 128 + 9
    assert "FAILED qkv-linear_seed-0: killed by SIGKILL" in capsys.readouterr().out


def test_sigterm_to_a_parallel_sweep_stops_its_points_and_waits_for_their_checkpoints(tmp_path):
    python = fake_sweep_trainer(tmp_path)
    names = ["qkv-linear_seed-0", "qkv-sne_seed-0"]
    env = {**os.environ, "DELAY_qkv_linear_seed_0": "60", "DELAY_qkv_sne_seed_0": "60", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "launch.sweep", *sweep_argv(tmp_path, python, *names)]
    sweep_process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((tmp_path / f"started-{name}").exists() for name in names) and time.time() < deadline:
        time.sleep(0.1)
    sweep_process.send_signal(signal.SIGTERM)
    out, _ = sweep_process.communicate(timeout=60)
    assert sweep_process.returncode == 128 + signal.SIGTERM and "stopping qkv-linear_seed-0, qkv-sne_seed-0" in out
    for name in names:  # each had saved (0.5 s after its SIGTERM) before the sweep returned
        assert (tmp_path / f"stopped-{name}").exists()


def test_sweep_evaluates_each_trained_point_unless_it_has_an_evaluation(tmp_path, capsys, monkeypatch):
    done = tmp_path / "qkv-sne_seed-0"
    done.mkdir()
    (done / "evaluation.json").write_text("{}")
    argv = [
        "local",
        "--config=configs/cifar10.py",
        f"--workdir={tmp_path}",
        "--python=python",
        "--evaluate=--ood=digits",
    ]
    only = ["--only=qkv-linear_seed-0", "--only=qkv-sne_seed-0", "--config.data.path=/data/c10.tar"]
    lines = dry_run(capsys, sweep, *argv, *only)
    assert len(lines) == 3 and "qkv_vit.main" in lines[0] and "qkv_vit.main" in lines[2]
    assert shlex.split(lines[1]) == [
        "python",
        "-m",
        "qkv_vit.evaluate",
        f"{tmp_path}/qkv-linear_seed-0",
        "--config=configs/cifar10.py:qkv=linear,seed=0",
        "--ood=digits",
        "--config.data.path=/data/c10.tar",  # the data the point trained on
    ]
    on_fake_devices = dry_run(capsys, sweep, *argv, *only, "--cpu-devices=4")  # evaluated where it trained
    assert on_fake_devices[1].startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parallel=0"], "--parallel 0: give 1 or more"),
        (["--log-dir=logs"], "--log-dir is where --parallel points write"),
        (["--evaluate=--output=e.json"], "leave --output out of it"),
        (["--parallel=2", "--processes=2"], "one process per point; leave --processes out"),
    ],
)
def test_sweep_options_that_do_not_go_together_are_one_line_errors(argv, message, monkeypatch):
    monkeypatch.setattr(parallel, "probe", lambda python: parallel.Devices("gpu", "NVIDIA H100"))
    with pytest.raises(SystemExit, match=message):
        sweep.main(["local", "--config=configs/cifar10.py", "--workdir=w", *argv, "--dry-run"])
    with pytest.raises(SystemExit, match="--evaluate are for local sweeps"):
        sweep.main(["slurm", "--config=configs/cifar10.py", "--workdir=w", "--evaluate=", "--dry-run"])


@pytest.mark.parametrize("kind, noted", [("NVIDIA H100 80GB HBM3", True), ("AMD Instinct MI300X", False)])
def test_parallel_sweep_on_an_nvidia_gpu_says_when_mps_is_not_running(tmp_path, capsys, monkeypatch, kind, noted):
    monkeypatch.setattr(parallel, "probe", lambda python: parallel.Devices("gpu", kind))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    argv = ["local", "--parallel=2", "--config=configs/cifar10.py", "--workdir=w", "--only=qkv-sne_seed-0", "--dry-run"]
    assert sweep.main(argv) == 0
    assert ("note: NVIDIA MPS is not running" in capsys.readouterr().err) == noted
    (tmp_path / "control").touch()  # the pipe MPS's control daemon makes
    assert sweep.main(argv) == 0
    assert "MPS" not in capsys.readouterr().err
