"""Evaluations beyond the run's own eval split: passes over a split that keep a few numbers per example
(`SplitEvaluator`), out-of-distribution data sets (`DataSpec`), and the periodic evaluators a config names
(`config.evaluators`, as big_vision's evaluators: each with its type and interval), which the trainer runs beside
its evaluation. `python -m qkv_vit.evaluate` runs the same passes on saved weights.

    config.evaluators.ood_digits = dict(type="ood", every_steps=0, data="digits:test", mahalanobis=False)
    config.evaluators.train_split = dict(type="classification", every_steps=1000, split="train")

Types: "classification" (top1, top5, loss, ece, count of another split of the run's data) and "ood" (AUROC, FPR95,
AUPR-in/out of each score of the run's eval split against `data`, qkv_vit.metrics.ood). `every_steps`: 0 = at the
end only. Metrics are written as <name>/<metric> (ood: <name>/<score>_<metric>).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from qkv_vit import config_rules as rules
from qkv_vit import data
from qkv_vit.data.errors import DataConfigError
from qkv_vit.errors import ConfigError
from qkv_vit.metrics import classification, ood
from qkv_vit.train.predict import Predictions, forward, predicted_batches

SOURCES = ("digits", "tfds", "image_folder")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Another data set to evaluate on (an out-of-distribution set, a corrupted copy), written
    SOURCE[:NAME_OR_PATH[:SPLIT]]: digits, tfds:svhn_cropped:test, image_folder:/data/textures:test (split
    default: the source's eval split). It is read with the run's eval preprocessing."""

    source: str
    location: str
    split: str | None

    @classmethod
    def parse(cls, spec: str) -> DataSpec:
        source, location, split = ([*spec.split(":", 2), "", ""])[:3]
        if source not in SOURCES:
            raise ConfigError(
                f"Data {spec!r}: start it with one of the sources {', '.join(SOURCES)} (SOURCE[:NAME_OR_PATH[:SPLIT]], "
                "e.g. tfds:svhn_cropped:test or image_folder:/data/ood:test)."
            )
        if source != "digits" and not location:
            form = (
                "NAME[:SPLIT], e.g. tfds:svhn_cropped:test"
                if source == "tfds"
                else "PATH[:SPLIT], e.g. image_folder:/data/ood:test"
            )
            raise ConfigError(
                f"Data {spec!r}: {source} needs a {'name' if source == 'tfds' else 'path'}: write it as {source}:{form}."
            )
        return cls(source, location, split or None)

    def data_config(self, data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The run's data config with this source: the same eval preprocessing, another data set."""
        config = copy.deepcopy(data_config)
        config.source, config.num_classes = self.source, None
        # Only the named split is read: a data set of one split (a test set) has no train split to open.
        config.train_split = config.eval_split = self.split
        if self.source == "tfds":
            config.name, config.pipeline = self.location, "tf_data"  # tf.data reads tfds; in_memory does not
        elif self.source == "image_folder":
            config.path = self.location
        return config

    def open(self, data_config: ml_collections.ConfigDict) -> data.DataSource:
        """Its source; DataConfigError naming it and the fix where it cannot be opened."""
        try:
            return data.open_source(self.data_config(data_config))
        except DataConfigError as error:
            hint = "" if self.split else " Name the split to score, SOURCE:NAME_OR_PATH:SPLIT, e.g. ...:test."
            raise DataConfigError(f"Data {self}: {error}{hint}") from error

    def __str__(self) -> str:
        return ":".join(part for part in (self.source, self.location, self.split or "") if part)


@dataclasses.dataclass(frozen=True)
class SplitEvaluator:
    """A model and how batches reach it: passes over a split that keep each example's outcome and OOD scores, never
    its logits, so a split of any size fits in memory."""

    model: Any
    data_config: ml_collections.ConfigDict  # the eval preprocessing: mean and std here, the rest in the sources
    batch_size: int
    mesh: Mesh
    subset: np.ndarray | None = None  # the logit columns of the data's classes (classification.class_subset)
    # The jitted forward pass (predict.forward), built once: every pass of this evaluator, and of a copy made with
    # dataclasses.replace, reuses its compilation.
    step: Callable | None = None

    def __post_init__(self) -> None:
        if self.step is None:
            object.__setattr__(
                self, "step", forward(self.model, self.data_config.mean, self.data_config.std, self.mesh)
            )

    def batches(self, variables: Any, source: data.DataSource, split: str | None) -> Iterator[Predictions]:
        return predicted_batches(self.step, variables, source.eval_batches(self.batch_size, split), self.mesh)

    def class_statistics(self, variables: Any, source: data.DataSource) -> tuple[np.ndarray, np.ndarray]:
        """Class means and the shared precision of the pre-logit features over the train split, batch by batch."""
        statistics = ood.ClassStatistics(len(source.info.class_names), self.model.embed_dim)
        for part in self.batches(variables, source, source.info.train_split):
            statistics.add(part.pre_logits, part.labels)
        return statistics.fitted()

    def split(
        self, variables: Any, source: data.DataSource, split: str | None, fitted: Any = None, with_scores: bool = False
    ) -> tuple[classification.Outcomes, dict[str, np.ndarray]]:
        """Every example's outcome, and with `with_scores` its OOD scores (ood.scores; Mahalanobis with `fitted`)."""
        found, scores = [], []
        for part in self.batches(variables, source, split):
            logits = classification.restrict(part.logits, self.subset)
            found.append(classification.outcomes(logits, part.labels, part.label_sets))
            if with_scores:
                scores.append(ood.scores(logits, part.pre_logits, fitted))
        if not found:
            raise ConfigError(
                f"Split {split!r} of {source.info.description} has no examples to evaluate: choose a split with images."
            )
        joined = {name: np.concatenate([s[name] for s in scores]) for name in scores[0]} if scores else {}
        return classification.Outcomes.concatenate(found), joined

    def scores(self, variables: Any, source: data.DataSource, split: str | None, fitted: Any) -> dict[str, np.ndarray]:
        """Every example's OOD scores (ood.scores) over a split of another data set: its labels are not the
        model's classes, and are not read."""
        scores = [
            ood.scores(classification.restrict(part.logits, self.subset), part.pre_logits, fitted)
            for part in self.batches(variables, source, split)
        ]
        if not scores:
            raise ConfigError(
                f"Split {split!r} of {source.info.description} has no examples to score: choose a split with images."
            )
        return {name: np.concatenate([s[name] for s in scores]) for name in scores[0]}

    def ood_metrics(
        self, variables: Any, source: data.DataSource, outside: data.DataSource, split: str | None, mahalanobis: bool
    ) -> dict[str, Any]:
        """{"count": OOD examples, score: ood.detection_metrics} of `source`'s eval split against `outside`'s
        `split`; Mahalanobis fitted on `source`'s train split."""
        fitted = self.class_statistics(variables, source) if mahalanobis else None
        _, inside = self.split(variables, source, None, fitted, with_scores=True)
        return ood.detection_report(inside, self.scores(variables, outside, split, fitted))


# ---- periodic evaluators (config.evaluators) ----

COMMON_RULES = {"type": rules.text(("classification", "ood")), "every_steps": rules.integer(0)}
EVALUATOR_RULES = {
    "classification": {**COMMON_RULES, "split": rules.text(nonempty=True)},
    "ood": {**COMMON_RULES, "data": rules.text(nonempty=True), "mahalanobis": rules.flag()},
}
NAME_RULE = rules.text(nonempty=True, forbidden="/.", reserved=("train", "ema_"))


def validate_config(evaluators: ml_collections.ConfigDict, eval_name: str, prefix: str = "config.evaluators.") -> None:
    """Each evaluator's name, type and keys; ConfigError naming the first bad one."""
    for name, options in evaluators.items():
        NAME_RULE.check(f"{prefix}{name} (a name)", name, ConfigError)
        if name == eval_name:
            raise ConfigError(f"{prefix}{name}: the run's own evaluation is written under {eval_name}/; rename it.")
        kind = options.get("type") if hasattr(options, "get") else None
        if kind not in EVALUATOR_RULES:
            raise ConfigError(
                f"{prefix}{name}.type must be one of {list(EVALUATOR_RULES)}, got {kind!r}: set it to one of them."
            )
        missing = [key for key in EVALUATOR_RULES[kind] if key not in options]
        if missing:
            raise ConfigError(
                f"{prefix}{name} lacks {', '.join(missing)}: add them; a {kind} evaluator has "
                f"{', '.join(EVALUATOR_RULES[kind])}."
            )
        rules.check_values(options, EVALUATOR_RULES[kind], f"{prefix}{name}.")
        if kind == "ood":
            DataSpec.parse(options.data)


@dataclasses.dataclass(frozen=True)
class Periodic:
    """One of config.evaluators, ready: (variables) -> its scalars, due every `every_steps` (0: never before the
    end; the trainer runs every evaluator at the end)."""

    name: str
    every_steps: int
    evaluate: Callable[[Any], dict[str, float]]

    def due(self, step: int) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0)


def periodic(config: ml_collections.ConfigDict, model: Any, source: data.DataSource, mesh: Mesh) -> list[Periodic]:
    """config.evaluators for a run's model, data source and mesh; their OOD data sets opened now (DataConfigError
    before any training where one cannot be)."""
    evaluator = SplitEvaluator(model, config.data, config.eval_batch_size or config.global_batch_size, mesh)
    found = []
    for name, options in config.evaluators.items():
        if options.type == "classification":
            evaluate = classification_evaluation(evaluator, source, name, options.split)
        else:
            spec = DataSpec.parse(options.data)
            evaluate = ood_evaluation(evaluator, source, name, spec, spec.open(config.data), options.mahalanobis)
        found.append(Periodic(name, options.every_steps, evaluate))
    return found


def classification_evaluation(
    evaluator: SplitEvaluator, source: data.DataSource, name: str, split: str
) -> Callable[[Any], dict[str, float]]:
    """(variables) -> <name>/top1, top5, loss, ece, count of `split`."""

    def evaluate(variables: Any) -> dict[str, float]:
        outcomes, _ = evaluator.split(variables, source, split)
        found = classification.classification_metrics(outcomes, source.info.class_names)
        return {f"{name}/{key}": value for key, value in found.items() if key != "per_class"}

    return evaluate


def ood_evaluation(
    evaluator: SplitEvaluator,
    source: data.DataSource,
    name: str,
    spec: DataSpec,
    outside: data.DataSource,
    mahalanobis: bool,
) -> Callable[[Any], dict[str, float]]:
    """(variables) -> <name>/<score>_<metric> of the eval split against `outside`."""

    def evaluate(variables: Any) -> dict[str, float]:
        found = evaluator.ood_metrics(variables, source, outside, spec.split, mahalanobis)
        return {
            f"{name}/{score}_{key}": value
            for score, metrics in found.items()
            if score != "count"
            for key, value in metrics.items()
        }

    return evaluate
