"""Evaluating weights (a run's checkpoint or converted weights) on splits of the config's data, and scoring
out-of-distribution data sets against the first of them: what `python -m qkv_vit.evaluate` runs.

Every split is evaluated with the config's eval preprocessing (config.data: image_size, crop_pct, mean, std) and
compute dtype; a data set whose classes are a subset of the model's (by name: ImageNet-A / -R's WordNet ids) is
evaluated on the logits of its classes only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from qkv_vit import data, models
from qkv_vit.data.errors import DataConfigError
from qkv_vit.errors import ConfigError
from qkv_vit.evaluate import metrics, ood
from qkv_vit.evaluate.predict import Predictions, predicted_batches
from qkv_vit.train import sharding
from qkv_vit.train.config import COMPUTE_DTYPES, check_config
from qkv_vit.train.target import Target
from qkv_vit.weights import Weights, read_weights

OOD_SOURCES = ("digits", "tfds", "image_folder")


@dataclasses.dataclass(frozen=True)
class OODData:
    """An out-of-distribution data set: `--ood=SOURCE[:NAME_OR_PATH[:SPLIT]]`, e.g. digits, tfds:svhn_cropped:test,
    image_folder:/data/textures:val (split default: the source's eval split)."""

    source: str
    location: str
    split: str | None

    @classmethod
    def parse(cls, spec: str) -> OODData:
        source, location, split = ([*spec.split(":", 2), "", ""])[:3]
        if source not in OOD_SOURCES:
            raise ConfigError(
                f"--ood={spec}: the source must be one of {', '.join(OOD_SOURCES)} (SOURCE[:NAME_OR_PATH[:SPLIT]], "
                "e.g. --ood=tfds:svhn_cropped:test or --ood=image_folder:/data/ood:val)."
            )
        if source != "digits" and not location:
            raise ConfigError(f"--ood={spec}: {source} needs a {'name' if source == 'tfds' else 'path'}.")
        return cls(source, location, split or None)

    def data_config(self, data_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """The in-distribution data config with this source: the same eval preprocessing, another data set."""
        config = copy.deepcopy(data_config)
        config.source, config.num_classes = self.source, None
        # Only the named split is read: a data set of one split (an OOD test set) has no train split to open.
        config.train_split = config.eval_split = self.split
        if self.source == "tfds":
            config.name = self.location
        elif self.source == "image_folder":
            config.path = self.location
        return config

    def __str__(self) -> str:
        return ":".join(part for part in (self.source, self.location, self.split or "") if part)


def open_ood(spec: OODData, data_config: ml_collections.ConfigDict) -> data.DataSource:
    """The OOD data set's source; DataConfigError naming the --ood flag and its fix where it cannot be opened."""
    try:
        return data.open_source(spec.data_config(data_config))
    except DataConfigError as error:
        hint = "" if spec.split else " Name the split to score, --ood=SOURCE:NAME_OR_PATH:SPLIT, e.g. :test."
        raise DataConfigError(f"--ood={spec}: {error}{hint}") from error


def build_model(weights: Weights, config: ml_collections.ConfigDict, platform: str) -> models.XCiT:
    """The weights' model in the config's compute dtype, with the layers for `platform`; ConfigError where the
    weights record no architecture."""
    if weights.architecture is None:
        raise ConfigError(
            "The weights record no architecture (a run's model.json, or converted weights' architecture): "
            "evaluate a run directory or weights written by python -m qkv_vit.convert."
        )
    architecture = models.architecture_from_json(weights.architecture)
    architecture["dtype"] = COMPUTE_DTYPES[config.compute_dtype]
    return models.for_platform(models.from_architecture(architecture), platform)


def class_subset(weights: Weights, model: models.XCiT, class_names: list[str]) -> np.ndarray | None:
    """The logit columns of the data's classes (metrics.class_subset) where the weights name their classes; else
    the data must have the model's class count. ConfigError otherwise."""
    if weights.class_names is not None:
        try:
            return metrics.class_subset(class_names, weights.class_names)
        except ValueError as error:
            raise ConfigError(f"The data do not fit the model's classes: {error}") from error
    if len(class_names) > model.num_classes:
        raise ConfigError(
            f"The data have {len(class_names)} classes and the model {model.num_classes} outputs, and the weights "
            "do not name their classes to match them by."
        )
    return None


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """The model, its weights and how batches reach it: what every pass over a split shares."""

    model: models.XCiT
    variables: Any
    data_config: ml_collections.ConfigDict  # the eval preprocessing: mean and std here, the rest in the source
    batch_size: int
    mesh: Any
    subset: np.ndarray | None  # the logit columns of the data's classes (metrics.class_subset)

    def batches(self, source: data.DataSource, split: str | None) -> Iterator[Predictions]:
        eval_batches = source.eval_batches(self.batch_size, split)
        config = self.data_config
        return predicted_batches(self.model, self.variables, eval_batches, config.mean, config.std, self.mesh)

    def class_statistics(self, source: data.DataSource) -> tuple[np.ndarray, np.ndarray]:
        """Class means and the shared precision of the pre-logit features over the train split, batch by batch."""
        statistics = ood.ClassStatistics(len(source.info.class_names), self.model.embed_dim)
        for part in self.batches(source, source.info.train_split):
            statistics.add(part.pre_logits, part.labels)
        return statistics.fitted()

    def split(
        self, source: data.DataSource, split: str | None, fitted: Any, with_scores: bool
    ) -> tuple[metrics.Outcomes, dict[str, np.ndarray]]:
        """Every example's outcome, and with `with_scores` its OOD scores (ood.scores; Mahalanobis with `fitted`)."""
        found, scores = [], []
        for part in self.batches(source, split):
            logits = metrics.restrict(part.logits, self.subset)
            found.append(metrics.outcomes(logits, part.labels))
            if with_scores:
                scores.append(ood.scores(logits, part.pre_logits, fitted))
        if not found:
            raise ConfigError(f"Split {split!r} of {source.info.description} has no examples to evaluate.")
        joined = {name: np.concatenate([s[name] for s in scores]) for name in scores[0]} if scores else {}
        return metrics.Outcomes.concatenate(found), joined


def evaluate(
    weights_path: str,
    config: ml_collections.ConfigDict,
    splits: Sequence[str] = (),
    *,
    use_ema: bool = False,
    ood_data: Sequence[OODData] = (),
    mahalanobis: bool = True,
    target: Target | None = None,
) -> dict[str, Any]:
    """{"weights", "ema", "splits": {split: classification metrics}, "ood": {data set: {"count", score: detection
    metrics}}}.

    `splits` default: the config's eval split. OOD data sets are scored against the first split; `mahalanobis`
    first fits class means and a shared covariance of the pre-logit features on the config's train split (one
    pass over it, eval preprocessing). Holds a few numbers per example, never a split's logits. ConfigError
    (DataConfigError included) for bad input, FileNotFoundError where there are no weights.
    """
    check_config(config)
    target = target or Target.present()
    weights = read_weights(weights_path, use_ema=use_ema)
    model = build_model(weights, config, target.platform)
    source = data.open_source(config.data)
    names = source.info.class_names
    evaluator = Evaluator(
        model,
        weights.variables,
        config.data,
        config.eval_batch_size or config.global_batch_size,
        sharding.make_mesh({"data": -1}, target.devices),
        class_subset(weights, model, names),
    )
    fitted = evaluator.class_statistics(source) if ood_data and mahalanobis else None
    result: dict[str, Any] = {"weights": str(weights_path), "ema": use_ema, "splits": {}, "ood": {}}
    splits = list(splits) or [source.info.eval_split]
    inside: dict[str, np.ndarray] = {}  # the first split's OOD scores
    for index, split in enumerate(splits):
        found, scores = evaluator.split(source, split, fitted, with_scores=bool(ood_data) and index == 0)
        inside = inside or scores
        result["splits"][split] = metrics.classification_metrics(found, names)
        logging.info("%s", metrics.summary_line(split, result["splits"][split]))
    for spec in ood_data:
        found, outside = evaluator.split(open_ood(spec, config.data), spec.split, fitted, True)
        result["ood"][str(spec)] = {"count": len(found.labels)}
        for score in inside:
            result["ood"][str(spec)][score] = ood.detection_metrics(inside[score], outside[score])
            logging.info("%s", ood.summary_line(f"{splits[0]} vs {spec}", score, result["ood"][str(spec)][score]))
    return result
