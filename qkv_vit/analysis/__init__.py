"""Analysis of F-SNE's learned codes: norms, orthogonality and a 2-D map, as JSON and PNG plots."""

from qkv_vit.analysis.codes import code_statistics, collect_codes, embed_2d
from qkv_vit.analysis.report import analyze_codes

__all__ = ["analyze_codes", "code_statistics", "collect_codes", "embed_2d"]
