"""Evaluating weights (a run's checkpoint or converted weights) on splits of the config's data, and scoring
out-of-distribution data sets against the first of them: what `python -m qkv_vit.evaluate` runs.

Every split is evaluated with the config's eval preprocessing (config.data: image_size, crop_pct, mean, std) and
compute dtype, through the trainer's evaluators (train/evaluators.py); a data set whose classes are a subset of
the model's (by name: ImageNet-A / -R's WordNet ids) is evaluated on the logits of its classes only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from qkv_vit import data, models
from qkv_vit.errors import ConfigError
from qkv_vit.metrics import classification, corruption, ood
from qkv_vit.train import sharding
from qkv_vit.train.config import COMPUTE_DTYPES, check_config
from qkv_vit.train.evaluators import DataSpec, SplitEvaluator
from qkv_vit.train.target import Target
from qkv_vit.weights import Weights, read_weights


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
    """The logit columns of the data's classes (classification.class_subset) where the weights name their classes; else
    the data must have the model's class count. ConfigError otherwise."""
    if weights.class_names is not None:
        try:
            return classification.class_subset(class_names, weights.class_names)
        except ValueError as error:
            raise ConfigError(
                f"The data do not fit the model's classes: {error} Evaluate on data of the model's classes."
            ) from error
    if len(class_names) > model.num_classes:
        raise ConfigError(
            f"The data have {len(class_names)} classes and the model {model.num_classes} outputs, and the weights "
            f"do not name their classes to match them by: evaluate on data of at most {model.num_classes} classes, "
            "or give weights that record their classes (a run directory)."
        )
    return None


@dataclasses.dataclass(frozen=True)
class Corruptions:
    """A corrupted copy of the data per corruption and severity: `template` is a DataSpec with {corruption} and
    {severity} in it, e.g. tfds:cifar10_corrupted/{corruption}_{severity}:test (CIFAR10_C)."""

    template: str
    names: Sequence[str] = corruption.CORRUPTIONS
    severities: Sequence[int] = corruption.SEVERITIES
    baseline: dict[str, Any] | None = None  # another evaluation's "corruptions" result: CE and mCE against it

    def spec(self, name: str, severity: int) -> DataSpec:
        if "{corruption}" not in self.template or "{severity}" not in self.template:
            raise ConfigError(
                f"--corruptions={self.template}: put {{corruption}} and {{severity}} in the data set's name, e.g. "
                f"{CIFAR10_C}."
            )
        return DataSpec.parse(self.template.format(corruption=name, severity=severity))


CIFAR10_C = "tfds:cifar10_corrupted/{corruption}_{severity}:test"
IMAGENET_C = "tfds:imagenet2012_corrupted/{corruption}_{severity}:validation"


def evaluate(
    weights_path: str,
    config: ml_collections.ConfigDict,
    splits: Sequence[str] = (),
    *,
    use_ema: bool = False,
    ood_data: Sequence[DataSpec] = (),
    mahalanobis: bool = True,
    corruptions: Corruptions | None = None,
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
    evaluator = SplitEvaluator(
        model,
        config.data,
        config.eval_batch_size or config.global_batch_size,
        sharding.make_mesh({"data": -1}, target.devices),
        class_subset(weights, model, names),
    )
    variables = weights.variables
    fitted = evaluator.class_statistics(variables, source) if ood_data and mahalanobis else None
    result: dict[str, Any] = {"weights": str(weights_path), "ema": use_ema, "splits": {}, "ood": {}}
    splits = list(splits) or [source.info.eval_split]
    inside: dict[str, np.ndarray] = {}  # the first split's OOD scores
    for index, split in enumerate(splits):
        found, scores = evaluator.split(variables, source, split, fitted, with_scores=bool(ood_data) and index == 0)
        inside = inside or scores
        result["splits"][split] = classification.classification_metrics(found, names)
        logging.info("%s", classification.summary_line(split, result["splits"][split]))
    for spec in ood_data:
        outside = evaluator.scores(variables, spec.open(config.data), spec.split, fitted)
        result["ood"][str(spec)] = ood.detection_report(inside, outside)
        for score in inside:
            logging.info("%s", ood.summary_line(f"{splits[0]} vs {spec}", score, result["ood"][str(spec)][score]))
    if corruptions is not None:
        result["corruptions"] = corruption_errors(evaluator, weights, variables, config.data, corruptions)
    return result


def corruption_errors(
    evaluator: SplitEvaluator,
    weights: Weights,
    variables: Any,
    data_config: ml_collections.ConfigDict,
    corruptions: Corruptions,
) -> dict[str, Any]:
    """{"data", "errors": {corruption: {severity: top-1 error}}, **corruption.summary} over every corrupted set."""
    errors: dict[str, dict[str, float]] = {}
    for name in corruptions.names:
        for severity in corruptions.severities:
            source = corruptions.spec(name, severity).open(data_config)
            subset = class_subset(weights, evaluator.model, source.info.class_names)
            found, _ = dataclasses.replace(evaluator, subset=subset).split(variables, source, source.info.eval_split)
            errors.setdefault(name, {})[str(severity)] = 1.0 - float(found.correct.mean())
            logging.info("corruption %s, severity %d: top-1 error %.4f", name, severity, errors[name][str(severity)])
    baseline = corruptions.baseline["errors"] if corruptions.baseline else None
    try:
        summary = corruption.summary(errors, baseline)
    except ValueError as error:
        raise ConfigError(f"--baseline: {error}") from error
    logging.info(
        "corruptions: mean error %.4f%s", summary["mean_error"], f", mCE {summary['mce']:.4f}" if baseline else ""
    )
    return {"data": corruptions.template, "errors": errors, **summary}
