"""Out-of-distribution detection: scores of in- and out-of-distribution examples, and how well a score separates
them (AUROC, FPR at 95% TPR, AUPR), exactly, over every example (NumPy, float64).

Every score is higher for examples that look in-distribution:
- `msp`: the maximum softmax probability (Hendrycks & Gimpel 2017);
- `max_logit`: the maximum logit (Hendrycks et al. 2022, "Scaling OOD detection");
- `energy`: the negative free energy, logsumexp of the logits at temperature 1 (Liu et al. 2020);
- `mahalanobis`: minus the smallest Mahalanobis distance of the pre-logit features to a class mean, with one
  covariance shared by the classes, both from the train split (Lee et al. 2018, without input perturbation).

The in-distribution examples are the positives, and scikit-learn (a dependency already: it ships the digits)
computes the metrics: AUROC is its roc_auc_score, P(score_in > score_out) + P(equal) / 2; FPR95 is the fraction of
OOD examples at or above the highest threshold that keeps 95% of the in-distribution ones (the first point of its
roc_curve with TPR >= 0.95); AUPR-In and AUPR-Out are its average precision with the in- or out-of-distribution
examples as positives.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import special
from sklearn import metrics

SCORES = ("msp", "max_logit", "energy", "mahalanobis")
TPR_LEVEL = 0.95


@dataclasses.dataclass
class ClassStatistics:
    """Class means and the shared (tied) covariance of pre-logit features, accumulated batch by batch in float64."""

    num_classes: int
    dim: int
    count: np.ndarray = dataclasses.field(init=False)  # (classes,)
    sums: np.ndarray = dataclasses.field(init=False)  # (classes, dim)
    outer: np.ndarray = dataclasses.field(init=False)  # (dim, dim): sum of x x^T over every example

    def __post_init__(self) -> None:
        self.count = np.zeros(self.num_classes, np.float64)
        self.sums = np.zeros((self.num_classes, self.dim), np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Features (N, dim) of examples of (N,) int labels."""
        features = np.asarray(features, np.float64)
        np.add.at(self.count, labels, 1.0)
        np.add.at(self.sums, labels, features)
        self.outer += features.T @ features

    def fitted(self) -> tuple[np.ndarray, np.ndarray]:
        """(class means (classes, dim), precision (dim, dim)): the inverse (pseudo-inverse where singular) of
        sum over examples of (x - mean_y)(x - mean_y)^T / N. ValueError for a class without examples."""
        if (self.count == 0).any():
            raise ValueError(
                f"Classes {np.flatnonzero(self.count == 0)[:5].tolist()} have no train examples: the Mahalanobis "
                "score needs a mean for every class."
            )
        means = self.sums / self.count[:, None]
        covariance = (self.outer - (means * self.count[:, None]).T @ means) / self.count.sum()
        return means, np.linalg.pinv(covariance, hermitian=True)


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N,) minus the smallest squared Mahalanobis distance of each feature row to a class mean."""
    features = np.asarray(features, np.float64)
    centered = features[:, None, :] - means[None]  # (N, classes, dim)
    distances = np.einsum("ncd,de,nce->nc", centered, precision, centered)
    return -distances.min(axis=1)


def scores(
    logits: np.ndarray, features: np.ndarray | None = None, fitted: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Every score of SCORES for (N, K) logits: `mahalanobis` only with pre-logit `features` (N, dim) and the train
    split's `fitted` ClassStatistics."""
    logits = np.asarray(logits, np.float64)
    found = {
        "msp": np.exp(logits.max(axis=1) - special.logsumexp(logits, axis=1)),
        "max_logit": logits.max(axis=1),
        "energy": special.logsumexp(logits, axis=1),
    }
    if features is not None and fitted is not None:
        found["mahalanobis"] = mahalanobis_score(features, *fitted)
    return found


def fpr_at_tpr(inside: np.ndarray, outside: np.ndarray, level: float = TPR_LEVEL) -> float:
    """The FPR at the first threshold (highest first) whose TPR reaches `level`: every distinct threshold's point of
    scikit-learn's ROC curve, none dropped."""
    truth = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    fpr, tpr, _ = metrics.roc_curve(truth, np.r_[inside, outside], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, level - 1e-12, side="left")])


def detection_metrics(inside: np.ndarray, outside: np.ndarray) -> dict[str, float]:
    """auroc, fpr95, aupr_in, aupr_out of one score (higher: in-distribution); ValueError for an empty side or a
    non-finite score."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(inside) or not len(outside):
        raise ValueError(f"Need scores of both sides, got {len(inside)} in- and {len(outside)} out-of-distribution.")
    if not (np.isfinite(inside).all() and np.isfinite(outside).all()):
        raise ValueError("Scores must be finite (a NaN or inf logit?).")
    truth, scores = np.r_[np.ones(len(inside)), np.zeros(len(outside))], np.r_[inside, outside]
    return {
        "auroc": float(metrics.roc_auc_score(truth, scores)),
        "fpr95": fpr_at_tpr(inside, outside),
        "aupr_in": float(metrics.average_precision_score(truth, scores)),
        "aupr_out": float(metrics.average_precision_score(1 - truth, -scores)),
    }


def detection_report(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray]) -> dict[str, object]:
    """{"count": OOD examples, score: detection_metrics} for every score of `inside` (ood.scores of the
    in-distribution examples) against the same score of `outside`."""
    return {
        "count": len(next(iter(outside.values()))),
        **{score: detection_metrics(inside[score], outside[score]) for score in inside},
    }


def summary_line(pair: str, score: str, found: dict[str, float]) -> str:
    """One line per data-set pair and score."""
    return (
        f"ood {pair}, {score}: AUROC {found['auroc']:.4f}, FPR95 {found['fpr95']:.4f}, "
        f"AUPR-in {found['aupr_in']:.4f}, AUPR-out {found['aupr_out']:.4f}"
    )
