"""Long work reports itself: a line at its start, one every few seconds while it lasts, its duration at its end;
the train loop's console is never silent for longer than progress.EVERY_S, and its first ETA leaves out the compile."""

import time

import pytest

from qkv_vit import progress
from qkv_vit.train.reporting import Reporter


def test_announced_work_says_when_it_starts_while_it_lasts_and_how_long_it_took():
    lines = []
    with progress.announced("Compiling", say=lines.append, every_s=0.05):
        time.sleep(0.18)
    assert lines[0] == "Compiling ..." and lines[-1].startswith("Compiling took 0.")
    assert 2 <= sum(line.startswith("Compiling: ") and line.endswith(" s so far") for line in lines) <= 4
    lines.clear()
    with progress.announced("Evaluating", say=lines.append, every_s=0.05, brief=True):
        pass  # brief and short: nothing to say
    assert lines == []
    with progress.announced("Evaluating", say=lines.append, every_s=0.05, brief=True):
        time.sleep(0.08)
    assert lines[0] == "Evaluating: 0 s so far" and lines[-1].startswith("Evaluating took 0.")
    lines.clear()
    with pytest.raises(RuntimeError), progress.announced("Failing", say=lines.append, every_s=10):
        raise RuntimeError("the work's own error says enough")
    assert lines == ["Failing ..."]


class Writer:
    def __init__(self):
        self.written = []

    def write_scalars(self, step, scalars):
        self.written.append((step, scalars))


def test_the_train_console_speaks_between_logged_steps_and_its_pace_leaves_out_the_first_step(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr("qkv_vit.train.reporting.progress_report", lambda writer, total: None)
    writer = Writer()
    reporter = Reporter(writer, start=0, total_steps=1000, global_batch_size=10, log_every=100)
    clock[0] = 30.0  # the first step: mostly compilation
    reporter.step(1, {"loss": 1.0})
    reporter.restart_clock(1)
    with caplog.at_level("INFO"):
        for step in range(2, 101):
            clock[0] += 0.5  # 20 images/s
            reporter.step(step, {"loss": 1.0})
        reporter.train(100, skipped_steps=0)
    lines = [record.getMessage() for record in caplog.records]
    paced = [line for line in lines if line.startswith("step ") and "loss" not in line]
    assert len(paced) == 4 and paced[0] == "step 21/1000: 20.0 images/s, ETA 0:08:10"  # one every 10 s
    assert lines[-1] == "step 100/1000: loss 1.0000, 20.0 images/s, ETA 0:07:30"  # the compile left out
    assert writer.written[-1][1]["train/images_per_sec"] == pytest.approx(20.0)
