"""The paper card: each of the papers' claims beside what this project's runs measured of it, and per run
everything measured (`python -m qkv_vit.results --card RUNS...`).

A claim is a number or a statement of Ahn et al., tagged with where it comes from: the arXiv abstract (2111.10017),
the journal abstract (Mathematics 11(8):1933), or a summary of the full paper that neither abstract states (read
as the papers' reported findings, unchecked). Ours is "measured" only where a finished run of the claim's setting
exists (model, embedding, data); everything else reads "not yet measured". Per run: top-1 of its final evaluation
and of every split in its evaluation.json (python -m qkv_vit.evaluate), OOD AUROC per data set and score, the
corruption mCE, F-SNE's code statistics (qkv_vit.analysis), parameters and GFLOPs (multiply-adds at its image
size, XCiT's convention).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from qkv_vit import models
from qkv_vit.analysis.codes import code_statistics, collect_codes
from qkv_vit.models.flops import count_macs
from qkv_vit.results import RunRecord, data_label, summarize, transfer_means
from qkv_vit.weights import read_weights

ARXIV = "arXiv 2111.10017 abstract"
JOURNAL = "Mathematics 11(8):1933 abstract"
SUMMARY = "a summary of the full paper (in neither abstract; unchecked)"
SCORE_ORDER = ("msp", "max_logit", "energy", "mahalanobis")


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What one finished run measured."""

    run: RunRecord
    params: int
    gflops: float
    evaluation: dict[str, Any] | None  # its evaluation.json
    codes: dict[str, Any] | None  # analysis.codes.code_statistics of F-SNE's codes

    @property
    def model(self) -> str:
        return self.run.model["model_name"]

    @property
    def qkv(self) -> str:
        """The QKV preset the architecture is (models.QKV_PRESETS), else its embedding kind."""
        options = dict(self.run.model["architecture"])
        options["qkv_hidden_dim"] = options.get("qkv_hidden_dim") or options["embed_dim"]  # None: h = d
        for preset in models.QKV_PRESETS:
            wanted = models.qkv_preset(preset, options["embed_dim"])
            if all(options.get(key) == value for key, value in wanted.items()):
                return preset
        return options.get("qkv_embed", "linear")

    @property
    def top1(self) -> float:
        return 100 * self.run.final[f"{self.run.config.get('eval_name', 'val')}/top1"]


@dataclasses.dataclass(frozen=True)
class Claim:
    text: str
    paper: str
    source: str
    ours: Callable[[list[RunFacts]], str | None]  # the measured value, None where no run measures it


def run_facts(run: RunRecord) -> RunFacts:
    """Parameters and GFLOPs from model.json's architecture, evaluation.json if present, code statistics of an
    F-SNE run from its checkpoint."""
    options = models.architecture_from_json(run.model["architecture"])
    model = models.from_architecture(options)
    image_size = int(run.config.get("data.image_size", 224))
    evaluation_file = epath.Path(run.workdir) / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.exists() else None
    codes = None
    if options.get("qkv_embed") == "fsne":
        try:
            codes = code_statistics(collect_codes(read_weights(run.workdir).variables["params"]))
        except FileNotFoundError:  # results copied without their checkpoints: no codes to read
            codes = None
    return RunFacts(run, int(run.model["num_params"]), count_macs(model, image_size) / 1e9, evaluation, codes)


PROPOSED = ("sne", "psne", "psne_second", "fsne_m8", "fsne_m8_wide", "fsne_m16")  # any of the papers' embeddings


def runs_of(facts: list[RunFacts], model: str, presets: Sequence[str], fine_tuned: bool) -> list[RunFacts]:
    return [
        f
        for f in facts
        if f.model == model and f.qkv in presets and data_label(f.run.config).endswith("(fine-tuned)") == fine_tuned
    ]


def imagenet_top1(model: str, presets: Sequence[str]) -> Callable[[list[RunFacts]], str | None]:
    """Our ImageNet-1k top-1 of `model` with one of `presets`, from scratch."""

    def ours(facts: list[RunFacts]) -> str | None:
        found = [f for f in runs_of(facts, model, presets, False) if data_label(f.run.config) == "imagenet2012"]
        return ", ".join(f"{f.top1:.1f} ({f.qkv}, {f.params / 1e6:.2f}M)" for f in found) or None

    return ours


def transfer_mean(model: str, presets: Sequence[str]) -> Callable[[list[RunFacts]], str | None]:
    """Our mean top-1 over the four transfer sets (results.transfer_means) of `model` with one of `presets`."""

    def ours(facts: list[RunFacts]) -> str | None:
        means = transfer_means(summarize([f.run for f in runs_of(facts, model, presets, True)]))
        return ", ".join(f"{mean:.1f} ({row.qkv}, {row.params / 1e6:.2f}M)" for row, mean in means) or None

    return ours


def ood_difference(facts: list[RunFacts]) -> str | None:
    """Per data set where both a linear and a proposed run were scored: the proposed run's AUROC minus linear's."""
    scored = [f for f in facts if f.evaluation and f.evaluation.get("ood")]
    lines = []
    for linear in (f for f in scored if f.qkv == "linear"):
        for other in (
            f for f in scored if f.qkv != "linear" and data_label(f.run.config) == data_label(linear.run.config)
        ):
            for name in sorted(set(linear.evaluation["ood"]) & set(other.evaluation["ood"])):
                deltas = [
                    f"{score} {other.evaluation['ood'][name][score]['auroc'] - linear.evaluation['ood'][name][score]['auroc']:+.3f}"
                    for score in SCORE_ORDER
                    if score in linear.evaluation["ood"][name] and score in other.evaluation["ood"][name]
                ]
                lines.append(
                    f"{other.qkv} vs linear on {data_label(linear.run.config)}, OOD {name}: AUROC {', '.join(deltas)}"
                )
    return "; ".join(lines) or None


def code_orthogonality(facts: list[RunFacts]) -> str | None:
    found = [f for f in facts if f.codes]
    return (
        ", ".join(
            f"mean abs cosine {f.codes['mean_abs_cosine']:.3f} (max {f.codes['max_abs_cosine']:.3f}; {data_label(f.run.config)}, "
            f"{f.model} m={f.codes['code_size']})"
            for f in found
        )
        or None
    )


CLAIMS = (
    Claim(
        "XCiT-N12/16 ImageNet-1k top-1, F-SNE at 3.1M parameters (`fsne_m8_wide` here: 3,071,176)",
        "69.9 -> 71.4",
        f"{ARXIV}; {JOURNAL}",
        imagenet_top1("xcit_nano_12_p16", ("fsne_m8_wide",)),
    ),
    Claim(
        "XCiT-N12/16 ImageNet-1k top-1 with XCiT's linear q/k/v: the baseline",
        "69.9",
        "XCiT's README, as both abstracts quote it",
        imagenet_top1("xcit_nano_12_p16", ("linear",)),
    ),
    Claim(
        "XCiT-T12/16 ImageNet-1k top-1, proposed (embedding not stated)",
        "77.1 -> 77.8",
        JOURNAL,
        imagenet_top1("xcit_tiny_12_p16", PROPOSED),
    ),
    Claim(
        "XCiT-S12/16 ImageNet-1k top-1, proposed (embedding not stated)",
        "82.0 -> 82.1",
        JOURNAL,
        imagenet_top1("xcit_small_12_p16", PROPOSED),
    ),
    Claim(
        "N12 fine-tuned: mean top-1 over CIFAR-10/100, Cars, STL-10, F-SNE at 2.9M (`fsne_m8` here: 2,867,656)",
        "92.2 -> 93.3",
        ARXIV,
        transfer_mean("xcit_nano_12_p16", ("fsne_m8",)),
    ),
    Claim(
        "S12 fine-tuned: mean top-1 over the four, proposed",
        "94.5 -> 94.8",
        JOURNAL,
        transfer_mean("xcit_small_12_p16", PROPOSED),
    ),
    Claim(
        "out-of-distribution detection improves over the original XCiT",
        '"considerable improvements" (no protocol given)',
        JOURNAL,
        ood_difference,
    ),
    Claim("F-SNE's learned codes are nearly orthogonal", "nearly orthogonal", SUMMARY, code_orthogonality),
    Claim("code size 8 is best for nano (d=128), 16 for tiny (d=192)", "m=8 / m=16", SUMMARY, lambda facts: None),
    Claim(
        "code norms similar across ImageNet, Cars, STL-10 and different on CIFAR-10/100",
        "as stated",
        SUMMARY,
        lambda facts: None,
    ),
)


def claims_table(facts: list[RunFacts]) -> list[str]:
    lines = ["| claim | the papers | source | ours |", "| --- | --- | --- | --- |"]
    for claim in CLAIMS:
        measured = claim.ours(facts)
        lines.append(
            f"| {claim.text} | {claim.paper} | {claim.source} | {f'measured: {measured}' if measured else 'not yet measured'} |"
        )
    return lines


def run_lines(fact: RunFacts) -> list[str]:
    """A run's section: what it is, and everything measured of it."""
    lines = [
        f"### {fact.run.workdir}",
        "",
        f"{data_label(fact.run.config)}, {fact.model}, {fact.qkv}: {fact.params:,} parameters, {fact.gflops:.3f} GFLOPs "
        f"(multiply-adds at {fact.run.config.get('data.image_size', 224)}x{fact.run.config.get('data.image_size', 224)}); "
        f"final top-1 {fact.top1:.2f}% at step {fact.run.final['step']}.",
        "",
    ]
    evaluation = fact.evaluation or {}
    for split, found in evaluation.get("splits", {}).items():
        lines.append(
            f"- {split}: top-1 {100 * found['top1']:.2f}%, top-5 {100 * found['top5']:.2f}%, ECE {found['ece']:.3f} ({found['count']} examples)"
        )
    for name, found in evaluation.get("ood", {}).items():
        scores = ", ".join(f"{s} {found[s]['auroc']:.3f}" for s in SCORE_ORDER if s in found)
        lines.append(f"- OOD {name} ({found['count']} examples), AUROC: {scores}")
    if "corruptions" in evaluation:
        corrupted = evaluation["corruptions"]
        mce = f", mCE {corrupted['mce']:.3f}" if "mce" in corrupted else ""
        lines.append(f"- corruptions ({corrupted['data']}): mean error {100 * corrupted['mean_error']:.2f}%{mce}")
    if fact.codes:
        norms = [n for layer in fact.codes["layers"].values() for n in layer["norm"].values()]
        lines.append(
            f"- codes (m={fact.codes['code_size']}): mean |cos| {fact.codes['mean_abs_cosine']:.3f}, max "
            f"{fact.codes['max_abs_cosine']:.3f}; l2-norms {np.min(norms):.2f}-{np.max(norms):.2f}"
        )
    if not fact.evaluation:
        lines.append("- no evaluation.json: `python -m qkv_vit.evaluate` adds splits, OOD and corruptions")
    return [*lines, ""]


def card(runs: Sequence[RunRecord]) -> str:
    """The card as markdown: the claims table, then a section per finished run (unfinished runs listed)."""
    finished = [run for run in runs if run.finished]
    facts = [run_facts(run) for run in finished]
    lines = ["# Paper card", "", "## The papers' claims", "", *claims_table(facts), "", "## Runs", ""]
    for fact in facts:
        lines += run_lines(fact)
    unfinished = [run for run in runs if not run.finished]
    if unfinished:
        lines += ["Unfinished (not counted): " + ", ".join(run.workdir for run in unfinished), ""]
    return "\n".join(lines)
