"""Where metrics and logs go: TensorBoard and the console (clu), WORKDIR/metrics.jsonl, one JSON object per write
(a step that logs training metrics and evaluates has two: the train record and the evaluation's), and WORKDIR/log.txt,
every log record of the run, the libraries' INFO records the console leaves out included.

metrics.jsonl is strict JSON (RFC 8259) on every line, so `jq`, JavaScript and other strict readers accept it: a NaN
or infinite value (a blown-up loss or gradient norm) is written as `null`. `read_metrics` gives it back as NaN.
"""

import contextlib
import importlib
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

from qkv_vit.paths import PathLike, as_path, is_local


class ScalarWriter:
    """What the trainer writes metrics through (clu's MetricWriter interface, scalars only); writes nothing."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def clu_metric_writers() -> ModuleType | None:
    """clu.metric_writers, imported when a run creates its writer (not with this module: it imports TensorFlow,
    seconds that `python -m qkv_vit.plan` and the benchmarks do not need); None without clu or TensorFlow, and
    metrics.jsonl is then the record (no TensorBoard)."""
    try:
        return importlib.import_module("clu.metric_writers")
    except ImportError:
        return None


class JsonlWriter(ScalarWriter):
    """Adds {"step": s, "name": value, ...} lines, written out per call so a killed run keeps its history.

    Local files are appended to. Cloud objects (gs://...) cannot be appended to, so there the writer keeps
    the file's lines (those of earlier runs of the same workdir included) and rewrites the whole object.
    """

    def __init__(self, path: PathLike, appendable: bool | None = None):
        self.path = as_path(path)
        self.appendable = is_local(path) if appendable is None else appendable
        self.lines = [] if self.appendable or not self.path.exists() else self.path.read_text().splitlines()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: finite_or_none(float(np.asarray(v))) for k, v in scalars.items()}}
        line = json.dumps(record, allow_nan=False)  # never the bare NaN / Infinity tokens only Python accepts
        if self.appendable:
            with self.path.open("a") as f:
                f.write(line + "\n")
            return
        self.lines.append(line)
        self.path.write_text("\n".join(self.lines) + "\n")

    def write_summaries(self, step, values, metadata=None):  # noqa: D102 - scalars only
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def writes_tensorboard() -> bool:
    """Whether runs write TensorBoard events (clu and TensorFlow installed)."""
    return clu_metric_writers() is not None


def create_writer(workdir: PathLike) -> ScalarWriter:
    """Process 0 writes TensorBoard events and metrics.jsonl; every process logs its metrics (to log.txt). Without
    clu (and TensorFlow), process 0 writes metrics.jsonl only."""
    lead = jax.process_index() == 0
    metric_writers = clu_metric_writers()
    if metric_writers is None:
        logging.warning("clu and TensorFlow are not installed: no TensorBoard events; metrics.jsonl has every metric.")
        return JsonlWriter(as_path(workdir) / "metrics.jsonl") if lead else ScalarWriter()
    default = metric_writers.create_default_writer(str(workdir), just_logging=not lead, asynchronous=False)
    if not lead:
        return default
    return metric_writers.MultiWriter([default, JsonlWriter(as_path(workdir) / "metrics.jsonl")])


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


def log_file_name(process_index: int) -> str:
    """log.txt for process 0, log.process<i>.txt for the others (they share the workdir)."""
    return "log.txt" if process_index == 0 else f"log.process{process_index}.txt"


class WorkdirLogHandler(logging.FileHandler):
    """WORKDIR/log.txt. A write that fails (a full disk, a workdir made read-only) removes the handler with one
    warning on the console, instead of logging's "--- Logging error ---" report for every later record: the log
    file is a copy of the console, and the run's own error, if the disk stops it, is the line that matters."""

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # opened with its first record (delay=True): a failed open is a failed write too
            try:
                self.stream = self._open()
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        root = logging.getLogger()
        root.handlers = [handler for handler in root.handlers if handler is not self]  # a new list: the record
        self.close()  # being handled goes on to the handlers after this one (removeHandler would skip the next)
        logging.warning(
            "Stopped writing %s: %s. The console keeps every message.", self.baseFilename, sys.exc_info()[1]
        )

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing the last records onto a full disk: they are on the console already
            pass


@contextlib.contextmanager
def workdir_log(workdir: PathLike) -> Iterator[None]:
    """While the run lasts, every log record at INFO and up (Orbax, tfds, clu and TensorFlow's Python records
    included) is also appended to WORKDIR/log.txt, so the console can stay quiet without losing anything.
    Local workdirs only: a cloud object cannot be appended to (there, the console is the log)."""
    if not is_local(workdir):
        yield
        return
    # delay: the file appears with its first record, so a run that stops before logging leaves no empty log.txt
    handler = WorkdirLogHandler(as_path(workdir) / log_file_name(jax.process_index()), encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: such a value is written as null."""
    return value if math.isfinite(value) else None


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl (none if it is absent), with null values read back as NaN.

    A line cut short by a kill (only ever the last) is skipped.
    """
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.append({key: math.nan if value is None else value for key, value in record.items()})
    return records


# Loggers of this package: the root logger (qkv_vit logs through `logging.info` etc.) and "qkv_vit.*".
OWN_LOGGERS = ("root", "qkv_vit")


# Library warnings that are part of normal work, off the console (log.txt keeps them): tfds looking for a data set
# before it is first prepared.
BENIGN_WARNINGS = ("has no dataset_info.json",)


class QuietLibraries(logging.Filter):
    """On the console, the libraries' records (any logger but OWN_LOGGERS: Orbax, clu and tfds log through
    absl's logger "absl", TensorFlow through "tensorflow", JAX through "jax.*") show from WARNING up, each as its
    one-line message: their per-save INFO chatter stays off, and a failed background save is not followed by
    Orbax's traceback before our own `error:` line, which names the step and the cause. Ours show whole.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        if record.exc_info:
            record.exc_info = record.exc_text = None
        return record.levelno >= logging.WARNING and not any(text in record.getMessage() for text in BENIGN_WARNINGS)


def quiet_libraries() -> None:
    """QuietLibraries on absl's handler, which prints every logger's records once absl's app (or a notebook's
    absl_logging.use_absl_handler()) has installed it on the root logger."""
    absl_logging.get_absl_handler().addFilter(QuietLibraries())
