"""What F-SNE's trainable codes learned: per-layer l2-norms of C_q, C_k, C_v, their pairwise cosine
similarities (the paper finds them nearly orthogonal), and a 2-D map (PCA or t-SNE) of every code."""

import logging
import re
from typing import Any

import jax
import numpy as np

from qkv_vit.progress import announced

LOGGER = logging.getLogger(__name__)  # python -m qkv_vit.analysis shows its records on the console

EMBEDDINGS = ("q", "k", "v")
PAIRS = (("q", "k"), ("q", "v"), ("k", "v"))


def collect_codes(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """{layer: (3, m) codes in q, k, v order}, XCA blocks first, then class-attention blocks, by index."""
    codes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "codes":
            codes[names[0]] = np.asarray(leaf, dtype=np.float64)
    if not codes:
        raise ValueError("No `codes` parameters found: the model does not use F-SNE (qkv_embed='fsne').")
    return dict(sorted(codes.items(), key=lambda item: layer_order(item[0])))


def layer_order(layer: str) -> tuple[int, int]:
    match = re.fullmatch(r"(blocks|cls_attn_blocks)_(\d+)", layer)
    if not match:
        return (2, 0)
    return (0 if match.group(1) == "blocks" else 1, int(match.group(2)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def code_statistics(codes: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per layer: l2-norm of each code and cosine similarity of each pair; plus summaries over layers."""
    layers = {}
    for layer, code in codes.items():
        by_name = dict(zip(EMBEDDINGS, code))
        layers[layer] = {
            "norm": {t: float(np.linalg.norm(by_name[t])) for t in EMBEDDINGS},
            "cosine": {a + b: cosine(by_name[a], by_name[b]) for a, b in PAIRS},
        }
    all_cosines = [abs(c) for stats in layers.values() for c in stats["cosine"].values()]
    return {
        "code_size": int(next(iter(codes.values())).shape[1]),
        "layers": layers,
        "mean_abs_cosine": float(np.mean(all_cosines)),
        "max_abs_cosine": float(np.max(all_cosines)),
    }


def embed_2d(codes: dict[str, np.ndarray], method: str = "pca", seed: int = 0) -> np.ndarray:
    """A 2-D embedding of all 3 x layers codes, rows in (layer, q/k/v) order."""
    points = np.concatenate(list(codes.values()), axis=0)
    if method == "pca":
        centered = points - points.mean(axis=0)
        _, _, components = np.linalg.svd(centered, full_matrices=False)
        return centered @ components[:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(max(1, min(30, (len(points) - 1) // 3)))
        with announced(f"t-SNE of {len(points)} codes", say=LOGGER.info):
            return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    raise ValueError(f"Unknown embedding method {method!r}: choose 'pca' or 'tsne'.")
