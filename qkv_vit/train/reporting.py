"""What a run tells its user: the data it reads, a line per logged step, each evaluation, and where its results are.

Scalars go through the run's writer (metrics.jsonl, TensorBoard: logging_utils) and a short line to the log.
"""

import datetime
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from qkv_vit.data.info import DatasetInfo
from qkv_vit.paths import is_local
from qkv_vit.progress import EVERY_S
from qkv_vit.train.logging_utils import ScalarWriter, log_file_name, read_metrics, writes_tensorboard


def log_data_summary(config: ml_collections.ConfigDict, info: DatasetInfo) -> None:
    """What the run reads and evaluates on, and how many files the data set's conversion skipped as not images."""
    logging.info(
        "Data: %s, %d train examples (split %r); evaluation on split %r (%d examples)%s.",
        config.data.source,
        info.train_examples,
        info.train_split,
        info.eval_split,
        info.eval_examples,
        f"; also present: {info.other_splits} (data.eval_split chooses)" if info.other_splits else "",
    )
    if info.train_eval_overlap:
        logging.warning(
            "The eval split %r shares %d examples with the train split %r (data.eval_split): the %s/* "
            "metrics include training images, so they are not held-out accuracy.",
            info.eval_split,
            info.train_eval_overlap,
            info.train_split,
            config.eval_name,
        )
    skipped = info.skipped_files
    if skipped:
        logging.warning(
            "Skipped %d unreadable or non-image files of %s (bad_files=%r), e.g. %s; all listed in %s.",
            skipped.count,
            config.data.path,
            config.data.bad_files,
            skipped.examples[:3],
            skipped.listed_in,
        )


def progress_report(writer: ScalarWriter, total_steps: int) -> Any:
    """clu's ReportProgress (steps/s and its own ETA in the metrics) where clu and TensorFlow are installed, else
    None (our own log line stays). Imported here, when a run starts, not with the module: clu imports TensorFlow."""
    try:
        from clu import periodic_actions
    except ImportError:
        return None
    return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)


class Reporter:
    """The train loop's reports from step `start` on: averaged train metrics and the pace at each logged step, a
    pace line wherever the console would otherwise stay silent for progress.EVERY_S, evaluations as they come, and
    clu's progress report (where clu is installed)."""

    def __init__(self, writer: ScalarWriter, start: int, total_steps: int, global_batch_size: int, log_every: int):
        self.writer, self.total_steps, self.global_batch_size = writer, total_steps, global_batch_size
        self.log_every = log_every
        self.pending: list[dict[str, jax.Array]] = []  # the step metrics since the last logged step
        self.last_log = (start, time.perf_counter())  # step and time the pace is measured from
        self.last_line = time.perf_counter()  # of the last console line
        self.progress = progress_report(writer, total_steps)

    def restart_clock(self, step: int) -> None:
        """The pace and ETA measured from `step` on: after the first step, whose time is mostly compilation."""
        self.last_log = (step, time.perf_counter())
        self.last_line = self.last_log[1]

    def pace(self, step: int, now: float) -> tuple[float | None, str]:
        """(images/s, "N images/s, ETA h:mm:ss") since the pace's last reset; (None, "") before a step has passed."""
        previous_step, previous_time = self.last_log
        if step <= previous_step:
            return None, ""
        seconds_per_step = (now - previous_time) / (step - previous_step)
        eta = datetime.timedelta(seconds=round((self.total_steps - step) * seconds_per_step))
        images_per_sec = self.global_batch_size / max(seconds_per_step, 1e-9)
        return images_per_sec, f"{images_per_sec:.1f} images/s, ETA {eta}"

    def step(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)
        if self.progress:
            self.progress(step)
        if time.perf_counter() - self.last_line >= EVERY_S and step % self.log_every and step != self.total_steps:
            jax.block_until_ready(metrics)  # the pace of finished steps, not of dispatched ones (once per EVERY_S)
            now = time.perf_counter()
            logging.info("step %d/%d: %s", step, self.total_steps, self.pace(step, now)[1])
            self.last_line = now

    def train(self, step: int, skipped_steps: int) -> None:
        """The train metrics averaged since the last logged step, written and logged with the pace and an ETA."""
        now = time.perf_counter()
        averaged = {k: float(np.mean([m[k] for m in jax.device_get(self.pending)])) for k in self.pending[0]}
        images_per_sec, pace = self.pace(step, now)
        scalars = {f"train/{k}": v for k, v in averaged.items()}
        scalars["train/skipped_steps"] = skipped_steps
        if images_per_sec is not None:
            scalars["train/images_per_sec"] = images_per_sec
        self.writer.write_scalars(step, scalars)
        # clu's ReportProgress logs its own ETA through absl's logger, which the console leaves out with the other
        # libraries' INFO records.
        logging.info("step %d/%d: loss %.4f%s", step, self.total_steps, averaged["loss"], f", {pace}" if pace else "")
        self.pending, self.last_log, self.last_line = [], (step, now), now

    def evaluation(self, step: int, scalars: dict[str, Any]) -> None:
        self.writer.write_scalars(step, scalars)
        logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        self.last_line = time.perf_counter()


def log_results(workdir: Any, eval_name: str) -> None:
    """The last line of a finished run: its final evaluation and where the results are."""
    key = f"{eval_name}/top1"
    final = [record for record in read_metrics(workdir) if key in record]
    top1 = f"{key} {final[-1][key]:.4f} at step {final[-1]['step']}; " if final else ""
    log = f", {log_file_name(jax.process_index())}" if is_local(workdir) else ""
    tensorboard = f"; TensorBoard: tensorboard --logdir {workdir}" if writes_tensorboard() else ""
    logging.info("Finished: %sresults in %s (metrics.jsonl, checkpoints/%s%s).", top1, workdir, log, tensorboard)
