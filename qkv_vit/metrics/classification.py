"""Classification metrics of a split's logits, exact over every example (NumPy, float64): top-1 / top-5, mean
cross-entropy, per-class accuracy and expected calibration error; and the logits of a class-subset data set
(ImageNet-A / -R's 200 of ImageNet's 1,000 classes) restricted to its classes.

Sources followed: timm's `validate.py` (top-k accuracy, the class-subset mask of ImageNet-A / -R as
`timm.data.ImageNetInfo` builds it from the classes' WordNet ids), Guo et al. 2017 "On Calibration of Modern
Neural Networks" (ECE over 15 equal-width confidence bins).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15  # Guo et al.'s equal-width bins of the top-1 confidence


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, K) float64 log-probabilities."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over bins b of |B_b| / N x |accuracy(B_b) - mean confidence(B_b)|, bins (i/bins, (i+1)/bins]."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return total / len(confidence)


@dataclasses.dataclass(frozen=True)
class Outcomes:
    """What the metrics need of each example, a few numbers each, so a split of any size fits in memory."""

    labels: np.ndarray  # (N,) int64
    correct: np.ndarray  # (N,) bool: top-1
    in_top5: np.ndarray  # (N,) bool: top-k with k = min(5, classes)
    confidence: np.ndarray  # (N,) float64: the top-1 softmax probability
    loss: np.ndarray  # (N,) float64: cross-entropy, nats
    relabelled: np.ndarray  # (N,) bool: the example has a set of correct labels (ImageNet ReaL), not empty
    in_label_set: np.ndarray  # (N,) bool: its top-1 is one of them

    @classmethod
    def concatenate(cls, parts: Sequence[Outcomes]) -> Outcomes:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))


def outcomes(logits: np.ndarray, labels: np.ndarray, label_sets: np.ndarray | None = None) -> Outcomes:
    """Each example's outcome from (N, K) logits and (N,) int labels in [0, K), and where given (N, L) sets of
    correct labels padded with -1 (ImageNet ReaL: an empty set leaves the example out of ReaL accuracy, as Beyer
    et al. 2020 do); ValueError for other shapes or labels outside [0, K)."""
    logits, labels = np.asarray(logits), np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"Need (N, K) logits and (N,) labels, got {logits.shape} and {labels.shape}.")
    classes = logits.shape[1]
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"Labels must lie in [0, {classes}) for {classes} logits, got {labels.min()}..{labels.max()}.")
    log_probs = log_softmax(logits)
    order = np.argsort(-logits, axis=1, kind="stable")  # ties: the lower class index first, as jax.lax.top_k
    sets = np.full((len(labels), 1), -1) if label_sets is None else np.asarray(label_sets)
    return Outcomes(
        labels=labels,
        correct=order[:, 0] == labels,
        in_top5=(order[:, : min(5, classes)] == labels[:, None]).any(axis=1),
        confidence=np.exp(log_probs.max(axis=1)),
        loss=-log_probs[np.arange(len(labels)), labels],
        relabelled=(sets >= 0).any(axis=1),
        in_label_set=(sets == order[:, :1]).any(axis=1),
    )


def classification_metrics(found: Outcomes, class_names: Sequence[str]) -> dict[str, Any]:
    """count, top1, top5, loss (mean cross-entropy, nats), ece, per_class {name: {"count", "top1"}} (classes
    with examples only), and where examples carry label sets real_top1 and real_count (ReaL accuracy over the
    examples whose set is not empty); ValueError for no examples."""
    if not len(found.labels):
        raise ValueError("No examples to evaluate.")
    per_class = {}
    for c in np.unique(found.labels):
        members = found.labels == c
        per_class[class_names[c]] = {"count": int(members.sum()), "top1": float(found.correct[members].mean())}
    metrics = {
        "count": len(found.labels),
        "top1": float(found.correct.mean()),
        "top5": float(found.in_top5.mean()),
        "loss": float(found.loss.mean()),
        "ece": expected_calibration_error(found.confidence, found.correct),
        "per_class": per_class,
    }
    if found.relabelled.any():
        metrics["real_top1"] = float(found.in_label_set[found.relabelled].mean())
        metrics["real_count"] = int(found.relabelled.sum())
    return metrics


def class_subset(data_classes: Sequence[str], model_classes: Sequence[str]) -> np.ndarray | None:
    """The model's logit index of each of the data's classes, where the data hold fewer classes than the model and
    every one of them is a model class (ImageNet-A / -R: 200 WordNet ids of ImageNet's 1,000); None where the data
    have the model's classes in its order. ValueError where a data class is not one of the model's."""
    data_classes, model_classes = list(data_classes), list(model_classes)
    if data_classes == model_classes:
        return None
    position = {name: index for index, name in enumerate(model_classes)}
    missing = [name for name in data_classes if name not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} of the data's {len(data_classes)} classes are not classes of the model "
            f"(e.g. {missing[:3]}); the model knows {len(model_classes)} classes (e.g. {model_classes[:3]})."
        )
    return np.asarray([position[name] for name in data_classes], np.int64)


def restrict(logits: np.ndarray, subset: np.ndarray | None) -> np.ndarray:
    """(N, K) logits -> (N, len(subset)): the columns of the data's classes, so argmax and softmax range over them."""
    return logits if subset is None else np.asarray(logits)[:, subset]


def summary_line(split: str, metrics: dict[str, Any]) -> str:
    """One line per evaluated split, as the trainer's evaluation line."""
    real = (
        f", real_top1 {metrics['real_top1']:.4f} ({metrics['real_count']} relabelled)" if "real_top1" in metrics else ""
    )
    return (
        f"{split}: top1 {metrics['top1']:.4f}, top5 {metrics['top5']:.4f}, loss {metrics['loss']:.4f}, "
        f"ece {metrics['ece']:.4f}, count {metrics['count']}{real}"
    )
