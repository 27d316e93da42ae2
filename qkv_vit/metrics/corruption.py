"""Robustness to common corruptions (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations"): top-1 error per corruption and severity, the corruption error of each
corruption against a named baseline model, and their mean (mCE).

CE_c = sum over severities of the model's error on corruption c / the same sum for the baseline; mCE is the mean
of CE_c over the corruptions (both as fractions: 1.0 = the baseline's robustness). The paper's baseline is
AlexNet; here any evaluated run can be it (the QKV comparison's is XCiT with its linear embedding).
"""

from collections.abc import Mapping

# The 15 corruptions of ImageNet-C / CIFAR-10-C that the mCE averages (the 4 "extra" ones are left out, as in the
# paper): tfds's cifar10_corrupted and imagenet2012_corrupted name their configs <corruption>_<severity>.
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)

Errors = Mapping[str, Mapping[str, float]]  # {corruption: {severity (as a string, JSON's keys): top-1 error}}


def summary(errors: Errors, baseline: Errors | None = None) -> dict:
    """{"mean_error": over every corruption and severity, "error": {c: mean over severities}}, and with a baseline
    (the same corruptions and severities) "ce": {c: CE_c} and "mce". ValueError where the baseline lacks one."""
    found: dict = {
        "mean_error": sum(sum(s.values()) for s in errors.values()) / sum(len(s) for s in errors.values()),
        "error": {c: sum(s.values()) / len(s) for c, s in errors.items()},
    }
    if baseline is not None:
        missing = [f"{c} {s}" for c, by in errors.items() for s in by if s not in baseline.get(c, {})]
        if missing:
            raise ValueError(f"The baseline has no error for {', '.join(missing[:3])}: evaluate it on the same set.")
        perfect = [c for c, by in errors.items() if sum(baseline[c][s] for s in by) == 0]
        if perfect:
            raise ValueError(
                f"The baseline makes no error on {', '.join(perfect)}, so no corruption error can be measured "
                "against it: choose another baseline."
            )
        found["ce"] = {c: sum(by.values()) / sum(baseline[c][s] for s in by) for c, by in errors.items()}
        found["mce"] = sum(found["ce"].values()) / len(found["ce"])
    return found
