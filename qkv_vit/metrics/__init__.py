"""Metrics of a model's outputs, from NumPy arrays, exact over every example: classification (top-k, loss,
calibration, per class, class subsets) and out-of-distribution detection (scores, AUROC, FPR95, AUPR). Nothing
here needs JAX or a model: the trainer's evaluators and `python -m qkv_vit.evaluate` feed them."""
