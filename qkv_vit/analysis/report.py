"""Writing the code analysis as JSON and PNG plots, from a params tree or a checkpoint directory."""

import json
from pathlib import Path
from typing import Any

import numpy as np

from qkv_vit.analysis.codes import EMBEDDINGS, PAIRS, code_statistics, collect_codes, embed_2d

COLORS = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green"}


def analyze_codes(params: dict[str, Any], out_dir: str | Path, method: str = "pca") -> dict[str, Any]:
    """Write codes.json, code_norms.png, code_cosines.png and code_embedding.png; return the statistics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = collect_codes(params)
    stats = code_statistics(codes)
    points = embed_2d(codes, method)
    stats["embedding"] = {
        "method": method,
        "points": [
            {"layer": layer, "embedding": t, "xy": [float(v) for v in points[3 * i + j]]}
            for i, layer in enumerate(codes)
            for j, t in enumerate(EMBEDDINGS)
        ],
    }
    (out_dir / "codes.json").write_text(json.dumps(stats, indent=2))
    plot_norms(stats, out_dir / "code_norms.png")
    plot_cosines(stats, out_dir / "code_cosines.png")
    plot_embedding(stats, out_dir / "code_embedding.png")
    return stats


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4), dpi=100)


def _save(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_norms(stats: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    layers = list(stats["layers"])
    for t in EMBEDDINGS:
        ax.plot(
            range(len(layers)),
            [stats["layers"][layer]["norm"][t] for layer in layers],
            "o-",
            label=f"C_{t}",
            color=COLORS[t],
        )
    ax.set_xticks(range(len(layers)), [short(layer) for layer in layers], rotation=45)
    _save(plt, fig, ax, path, "l2-norm of the codes per layer", "layer", "l2-norm")


def plot_cosines(stats: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    layers = list(stats["layers"])
    for a, b in PAIRS:
        ax.plot(
            range(len(layers)),
            [stats["layers"][layer]["cosine"][a + b] for layer in layers],
            "o-",
            label=f"cos(C_{a}, C_{b})",
        )
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xticks(range(len(layers)), [short(layer) for layer in layers], rotation=45)
    _save(plt, fig, ax, path, "cosine similarity of code pairs (0 = orthogonal)", "layer", "cosine")


def plot_embedding(stats: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    points = stats["embedding"]["points"]
    for t in EMBEDDINGS:
        xy = np.array([p["xy"] for p in points if p["embedding"] == t])
        ax.scatter(xy[:, 0], xy[:, 1], label=f"C_{t}", color=COLORS[t])
    for p in points:
        ax.annotate(short(p["layer"]), p["xy"], fontsize=7, alpha=0.7)
    method = stats["embedding"]["method"].upper()
    _save(plt, fig, ax, path, f"{method} of all codes across layers", f"{method} 1", f"{method} 2")


def short(layer: str) -> str:
    """blocks_3 -> 3, cls_attn_blocks_0 -> ca0."""
    return layer.replace("cls_attn_blocks_", "ca").replace("blocks_", "")
