"""Where metrics go: TensorBoard and the console (clu), and WORKDIR/metrics.jsonl, one JSON object per step."""

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Appends {"step": s, "name": value, ...} lines; flushed per write so a killed run keeps its history."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

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


def create_writer(workdir: str | Path) -> metric_writers.MetricWriter:
    """Process 0 writes TensorBoard events and metrics.jsonl; every process logs to its console."""
    lead = jax.process_index() == 0
    default = metric_writers.create_default_writer(str(workdir), just_logging=not lead, asynchronous=False)
    if not lead:
        return default
    return metric_writers.MultiWriter([default, JsonlWriter(Path(workdir) / "metrics.jsonl")])


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
