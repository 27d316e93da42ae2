"""Finished runs as a markdown table, seeds averaged, next to the paper's numbers.

  python -m qkv_vit.results workdirs/cifar10_sweep                 # a sweep's directory: every run below it
  python -m qkv_vit.results gs://BUCKET/in1k gs://BUCKET/transfer --out results.md
  python -m qkv_vit.results --card workdirs/                       # the papers' claims beside ours, per run

A run is a workdir with config.json, model.json and metrics.jsonl (what the trainer writes). It is
finished when metrics.jsonl has its final evaluation, at the run's last step. Runs whose configs are equal
except for the seed form one row: mean ± sample standard deviation of the final top-1 over the n runs.
Below it, each non-linear QKV embedding paired seed by seed with the linear one of the same data, model and
recipe (the same seed: the same data order and initialization stream): the per-seed differences of top-1 in
percentage points, their mean ± sample standard deviation, a 95% Student-t interval of the mean difference, and in
how many seeds the embedding was better; the non-linear rows it could not pair are named below it, with why. Where
finished runs have an evaluation.json (`python -m qkv_vit.evaluate` on their final weights), a table of those
evaluations with the main table's rows: per group, of each run's first split and weights (EMA or not), mean ± std of
ECE and of the worst class's top-1 (and the class worst most often), and the AUROC of every OOD data set and score;
an unreadable evaluation.json is listed there. Unfinished runs are listed separately and never averaged.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
from etils import epath
from scipy import stats

from qkv_vit import models
from qkv_vit.data.config import data_name
from qkv_vit.errors import quiet_on_broken_pipe
from qkv_vit.train import run_record
from qkv_vit.train.config import base_config
from qkv_vit.train.logging_utils import read_metrics

# Keys that do not change what a run learns (bookkeeping, where files live, hardware layout), and seeds.
SEED_KEYS = ("seed",)
IGNORED_KEYS = SEED_KEYS + (
    "init_from",
    "data.cache_dir",
    "data.data_dir",
    "data.path",
    "log_every_steps",
    "eval_every_steps",
    "evaluators",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "async_checkpointing",
    "eval_batch_size",
    "data.num_parallel_calls",
    "data.prefetch",
    "mesh.data",
    "mesh.fsdp",
    "sharding",
    "nonfinite",
    "eval_name",
)
# Shown through the data / model / QKV columns rather than as settings.
LABELLED_KEYS = ("model_name", "qkv", "data.source", "data.name", "data.num_classes")
# The keys that choose the QKV embedding: ignored when looking for a row's linear partner.
QKV_KEYS = (
    "qkv",
    "model.qkv_embed",
    "model.qkv_hidden_dim",
    "model.shared_layer",
    "model.code_size",
    "model.code_mode",
    "model.code_init_std",
    "model.qkv_activation",
    "model.qkv_in_class_attention",
)
# Also ignored when looking for a row's linear partner: settings of the F-SNE codes, which do nothing for a linear QKV
# embedding (it has no codes), so linear runs with either value are the same baseline.
CODE_ONLY_KEYS = ("optimizer.code_weight_decay",)
TRANSFER_SETS = ("cifar10", "cifar100", "cars196", "stl10")

# Top-1 on ImageNet-1k at 224 (docs/models.md, "What the papers report": arXiv 2111.10017 and Mathematics 11(8):1933;
# facebookresearch/xcit's README for the other sizes), by model and QKV embedding.
XCIT_IMAGENET = {
    "xcit_nano_12_p16": 69.9,
    "xcit_tiny_12_p16": 77.1,
    "xcit_tiny_24_p16": 79.4,
    "xcit_small_12_p16": 82.0,
    "xcit_small_24_p16": 82.6,
    "xcit_medium_24_p16": 82.7,
    "xcit_large_24_p16": 82.9,
    "xcit_nano_12_p8": 73.8,
    "xcit_tiny_12_p8": 79.7,
    "xcit_tiny_24_p8": 81.9,
    "xcit_small_12_p8": 83.4,
    "xcit_small_24_p8": 83.9,
    "xcit_medium_24_p8": 83.7,
    "xcit_large_24_p8": 84.4,
}
PROPOSED_IMAGENET = {
    "xcit_nano_12_p16": "71.4 (proposed, 3.1M)",
    "xcit_tiny_12_p16": "77.8 (proposed)",
    "xcit_small_12_p16": "82.1 (proposed)",
}
# Mean top-1 over the four transfer data sets (Mathematics 11(8):1933, as docs/models.md, "What the papers report").
PAPER_TRANSFER = {
    ("xcit_nano_12_p16", "linear"): "92.2 (XCiT)",
    ("xcit_nano_12_p16", "fsne"): "93.3 (F-SNE, 2.9M)",
    ("xcit_small_12_p16", "linear"): "94.5 (XCiT)",
    ("xcit_small_12_p16", "fsne"): "94.8 (proposed)",
}


@dataclasses.dataclass
class RunRecord:
    """One workdir as read back (the trainer's own run is train.trainer.Run): its flattened config, model.json, and
    where it stands."""

    workdir: str
    config: dict[str, Any]
    model: dict[str, Any]
    total_steps: int | None
    last_step: int
    final: dict[str, float] | None  # the metrics record of the final evaluation
    why_unknown: str = ""
    evaluation: dict[str, Any] | None = None  # its evaluation.json (python -m qkv_vit.evaluate), None if none
    evaluation_error: str = ""  # why its evaluation.json could not be read, "" if it could or there is none

    @property
    def finished(self) -> bool:
        return self.final is not None


@dataclasses.dataclass
class Row:
    data: str
    model: str
    qkv: str
    params: int
    settings: str
    top1: list[float]
    ema_top1: list[float]
    paper: str
    key: tuple = ()
    seeds: list[int] = dataclasses.field(default_factory=list)  # each run's seed, aligned with top1


def flatten_dotted(tree: dict[str, Any]) -> dict[str, Any]:
    """A nested JSON config as {"data.source": ..., "optimizer.lr": ...}; lists become tuples (hashable)."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in run_record.flatten(tree).items()}


# Keys added to the config after a run started read as today's default, so old and new runs still group.
DEFAULTS = flatten_dotted(base_config().to_dict())


def find_runs(paths: Iterable[str]) -> list[epath.Path]:
    """Every run directory (one holding model.json) at or up to 3 levels below each path, sorted."""
    found = set()
    for path in map(epath.Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist.")
        if (path / "model.json").exists():
            found.add(path)
            continue
        # Up to 3 levels down ("**" would list whole buckets on GCS): a sweep's runs, or a folder of sweeps.
        runs = [p.parent for depth in range(1, 4) for p in path.glob("*/" * depth + "model.json")]
        if not runs:
            raise FileNotFoundError(f"No runs under {path}: a run directory holds config.json and model.json.")
        found.update(runs)
    return sorted(found, key=str)


def read_run(workdir: epath.Path) -> RunRecord:
    """The run's config, model.json, metrics (its final evaluation, if it has one) and evaluation.json."""
    config = json.loads((workdir / "config.json").read_text())
    model = json.loads((workdir / "model.json").read_text())
    records = read_metrics(workdir)
    total, why = total_steps(config, model)
    key = top1_key(config)
    finals = [r for r in records if r["step"] == total and key in r]
    return RunRecord(
        str(workdir),
        {**DEFAULTS, **flatten_dotted(config)},
        model,
        total,
        max((r["step"] for r in records), default=0),
        finals[-1] if finals else None,
        why,
        *read_evaluation(workdir),
    )


def top1_key(config: dict[str, Any], ema: bool = False) -> str:
    """The metric name of the run's evaluation top-1 (a fraction): <eval_name>/top1, or ema_<eval_name>/top1."""
    return ("ema_" if ema else "") + f"{config.get('eval_name', 'val')}/top1"


def final_top1(run: RunRecord, ema: bool = False) -> float | None:
    """The run's top-1 (%) at its final evaluation, of its EMA weights with `ema`; None if the run is unfinished
    (or, with `ema`, its final evaluation has no EMA top-1)."""
    value = run.final.get(top1_key(run.config, ema)) if run.final is not None else None
    return None if value is None else 100 * value


def read_evaluation(workdir: epath.Path) -> tuple[dict[str, Any] | None, str]:
    """The run's evaluation.json and "", (None, "") where it has none, (None, why) where it cannot be read."""
    path = workdir / "evaluation.json"
    if not path.exists():
        return None, ""
    try:
        evaluation = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: bad JSON, or bytes that are not UTF-8
        return None, f"evaluation.json unreadable: {error}"
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("splits"), dict) or not evaluation["splits"]:
        return None, "evaluation.json unreadable: no splits (not written by `python -m qkv_vit.evaluate`?)"
    return evaluation, ""


def total_steps(config: dict[str, Any], model: dict[str, Any]) -> tuple[int | None, str]:
    """The run's length: written by the trainer, or set in the config, or counted from the data's size."""
    if model.get("total_steps"):
        return int(model["total_steps"]), ""
    if config.get("total_steps"):
        return int(config["total_steps"]), ""
    try:
        from qkv_vit import data  # the data's size: needs the data (or its prepared cache) on this machine

        steps = data.open_source(ml_collections.ConfigDict(config["data"])).steps_per_epoch(
            config["global_batch_size"],
            process_count=1,
            local_device_count=1,
        )
    except Exception as error:  # noqa: BLE001 - any unreadable data only makes the length unknown
        return None, f"run length unknown: its data is not readable here ({type(error).__name__})"
    return round(config["total_epochs"] * steps), ""


def data_label(config: dict[str, Any]) -> str:
    name = data_name(config["data.source"], config["data.name"], config.get("data.path"))
    return f"{name} (fine-tuned)" if config.get("init_from") else name


def model_label(model: dict[str, Any]) -> str:
    name, options = model["model_name"], model["architecture"]
    named = models.MODEL_CONFIGS.get(name, {})
    changed = [f"{key} {options[key]}" for key in named if key in options and options[key] != named[key]]
    return f"{name} ({', '.join(changed)})" if changed else name


def qkv_label(options: dict[str, Any]) -> str:
    kind = options.get("qkv_embed", "linear")
    hidden = options.get("qkv_hidden_dim") or options.get("embed_dim")
    details = {
        "linear": [],
        "sne": [f"h={hidden}"],
        "psne": [f"h={hidden}", f"shared {options.get('shared_layer')}"],
        "fsne": [f"m={options.get('code_size')}", f"h={hidden}"],
    }.get(kind, [])
    if kind == "fsne" and options.get("code_mode", "concat") != "concat":
        details.append(f"codes {options['code_mode']}")
    if kind != "linear" and options.get("qkv_in_class_attention"):
        details.append("+ class attention")
    return f"{kind} ({', '.join(details)})" if details else kind


def group_key(run: RunRecord) -> tuple:
    items = {k: v for k, v in run.config.items() if k not in IGNORED_KEYS}
    return (data_label(run.config),) + tuple(sorted(items.items(), key=lambda item: item[0]))


def paper_number(run: RunRecord) -> str:
    options, name = run.model["architecture"], run.model["model_name"]
    if data_label(run.config) != "imagenet2012" or model_label(run.model) != name:
        return ""
    if options.get("qkv_embed") == "linear":
        return f"{XCIT_IMAGENET[name]} (XCiT)" if name in XCIT_IMAGENET else ""
    return PROPOSED_IMAGENET.get(name, "") if options.get("qkv_embed") == "fsne" else ""


def summarize(runs: Sequence[RunRecord]) -> list[Row]:
    """One row per group of finished runs that differ only by seed."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        if run.finished:
            groups.setdefault(group_key(run), []).append(run)
    rows = []
    for key, members in groups.items():
        first = members[0]
        same_data = [dict(other[1:]) for other in groups if other[0] == key[0]]
        settings = ", ".join(f"{k}={setting_value(first.config.get(k))}" for k in varying_settings(same_data))
        rows.append(
            Row(
                data_label(first.config),
                model_label(first.model),
                qkv_label(first.model["architecture"]),
                first.model["num_params"],
                settings,
                [final_top1(r) for r in members],
                [top1 for top1 in (final_top1(r, ema=True) for r in members) if top1 is not None],
                paper_number(first),
                key,
                [int(r.config["seed"]) for r in members],
            )
        )
    return sorted(rows, key=lambda r: (r.data, r.model, qkv_order(r.qkv), r.qkv, r.settings))


def setting_value(value: Any) -> str:
    """A config value as a settings cell shows it: floats to 6 significant digits (0.3, not 0.30000000000000004)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def qkv_order(label: str) -> int:
    """The baseline first, then the paper's order: SNE, P-SNE, F-SNE."""
    kinds = ("linear", "sne", "psne", "fsne")
    kind = label.split(" ")[0]
    return kinds.index(kind) if kind in kinds else len(kinds)


def varying_settings(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose value differs between groups of one data set and that no column shows already."""
    keys = sorted({k for c in configs for k in c})
    shown = lambda k: k in LABELLED_KEYS or (k.startswith("model.") and k != "model.drop_path_rate")  # noqa: E731
    return [k for k in keys if not shown(k) and len({repr(c.get(k)) for c in configs}) > 1]


def transfer_means(rows: Sequence[Row]) -> list[tuple[Row, float]]:
    """Rows fine-tuned on all four transfer sets with otherwise equal configs -> (row, mean of their top-1 means)."""
    by_recipe: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        dataset = row.data.removesuffix(" (fine-tuned)")
        if row.data.endswith("(fine-tuned)") and dataset in TRANSFER_SETS:
            recipe = tuple(item for item in row.key[1:] if item[0] not in ("data.name", "data.num_classes"))
            by_recipe.setdefault(recipe, {})[dataset] = row
    return [
        (found[TRANSFER_SETS[0]], statistics.fmean(statistics.fmean(found[d].top1) for d in TRANSFER_SETS))
        for found in by_recipe.values()
        if set(found) == set(TRANSFER_SETS)
    ]


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """Mean ± sample standard deviation, 2 decimals (the std only from 2 values on, "" for none); `signed`: the mean
    with its sign (+0.67 ± 2.52), for differences."""
    if not values:
        return ""
    mean = f"{statistics.fmean(values):{'+' if signed else ''}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.2f}"


def markdown(runs: Sequence[RunRecord]) -> str:
    """The results table, the paired comparison with the linear QKV embedding when a row has a linear partner (and
    the non-linear rows without one), the evaluations of final weights where runs have an evaluation.json, the
    transfer means when all four data sets are there, and the unfinished runs."""
    rows = summarize(runs)
    lines = rows_table(rows) if rows else ["No finished runs."]
    pairs = paired_with_linear(rows)
    if pairs:
        lines += ["", PAIRED_TITLE, "", *paired_table(pairs), "", PAIRED_CAVEAT]
        unpaired = unpaired_lines(rows)
        lines += [""] + unpaired if unpaired else []
    lines += evaluation_section(rows, runs)
    means = transfer_means(rows)
    if means:
        lines += [
            "",
            "Transfer, mean top-1 over " + ", ".join(TRANSFER_SETS) + ":",
            "",
            table_line(["model", "QKV embedding", "params (CIFAR-10 head)", "mean top-1 (%)", "paper"]),
            table_line(["---", "---", "---:", "---:", "---"]),
        ]
        for row, mean in means:
            paper = PAPER_TRANSFER.get((row.model, row.qkv.split(" ")[0]), "")
            lines.append(table_line([row.model, row.qkv, f"{row.params:,}", f"{mean:.2f}", paper]))
    unfinished = [run for run in runs if not run.finished]
    if unfinished:
        lines += ["", "Unfinished runs (not in the table above):", ""]
        for run in unfinished:
            of = f" of {run.total_steps}" if run.total_steps else f" ({run.why_unknown})"
            lines.append(f"- {run.workdir}: step {run.last_step}{of}")
    return "\n".join(lines) + "\n"


def rows_table(rows: Sequence[Row]) -> list[str]:
    with_settings, with_ema = any(r.settings for r in rows), any(r.ema_top1 for r in rows)
    header = ["data", "model", "QKV embedding", "params"] + ["settings"] * with_settings + ["top-1 (%)"]
    header += ["EMA top-1 (%)"] * with_ema + ["n", "paper / XCiT top-1"]
    align = ["---"] * 3 + ["---:"] + ["---"] * with_settings + ["---:"] * (1 + with_ema) + ["---:", "---"]
    lines = [table_line(header), table_line(align)]
    for r in rows:
        cells = [r.data, r.model, r.qkv, f"{r.params:,}"] + [r.settings] * with_settings + [mean_std(r.top1)]
        lines.append(table_line(cells + [mean_std(r.ema_top1)] * with_ema + [str(len(r.top1)), r.paper]))
    return lines


PAIRED_TITLE = (
    "Paired with the linear QKV embedding (same data, model and recipe; differences in top-1 percentage points, "
    "same seed):"
)
PAIRED_CAVEAT = (
    "A difference whose 95% interval contains 0 is not shown by these runs. With several embeddings or recipes "
    "compared, about one interval in twenty excludes 0 by chance where there is no difference."
)
NO_LINEAR_RUN = "no linear run of the same data, model and recipe"
NO_COMMON_SEED = "no seed in common with the linear runs"


def is_linear(row: Row) -> bool:
    """Whether the row's QKV embedding is the linear one (XCiT's baseline)."""
    return row.qkv.split(" ")[0] == "linear"


def recipe_key(row: Row) -> tuple:
    """The row's group key without the keys that choose the QKV embedding (and those only F-SNE's codes read): equal
    for the rows that differ only there."""
    return (row.key[0],) + tuple(item for item in row.key[1:] if item[0] not in QKV_KEYS + CODE_ONLY_KEYS)


def top1_by_seed(rows: Iterable[Row]) -> dict[int, float]:
    """Top-1 (%) by seed over these rows' runs; a seed run more than once counts as the mean of its runs."""
    found: dict[int, list[float]] = {}
    for row in rows:
        for seed, top1 in zip(row.seeds, row.top1, strict=True):
            found.setdefault(seed, []).append(top1)
    return {seed: statistics.fmean(values) for seed, values in sorted(found.items())}


def seed_differences(rows: Sequence[Row]) -> list[tuple[Row, dict[int, float] | None]]:
    """Each non-linear row -> (row, {seed: top-1 of the row - top-1 of the linear runs of its recipe, in percentage
    points}) over the seeds both have ({} if none), or (row, None) where no linear run has its recipe."""
    linear: dict[tuple, list[Row]] = {}
    for row in filter(is_linear, rows):
        linear.setdefault(recipe_key(row), []).append(row)
    found = []
    for row in rows:
        if is_linear(row):
            continue
        partner = linear.get(recipe_key(row))
        if not partner:
            found.append((row, None))
            continue
        ours, theirs = top1_by_seed([row]), top1_by_seed(partner)
        found.append((row, {seed: ours[seed] - theirs[seed] for seed in ours if seed in theirs}))
    return found


def paired_with_linear(rows: Sequence[Row]) -> list[tuple[Row, dict[int, float]]]:
    """Each non-linear row with a linear partner of the same recipe and at least one common seed ->
    (row, {seed: top-1 of the row - top-1 of the linear runs, in percentage points}) over the seeds both have."""
    return [(row, differences) for row, differences in seed_differences(rows) if differences]


def unpaired_lines(rows: Sequence[Row]) -> list[str]:
    """A line for each non-linear row that the paired comparison leaves out, with why: no linear run of its recipe,
    or none of its seeds."""
    return [
        f"- {row.data} {row.model} {row.qkv}{f' [{row.settings}]' if row.settings else ''}: not paired "
        f"({NO_LINEAR_RUN if differences is None else NO_COMMON_SEED})"
        for row, differences in seed_differences(rows)
        if not differences
    ]


def signed(value: float) -> str:
    """A number with its sign, 2 decimals: +0.12, -0.63."""
    return f"{value:+.2f}"


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The Student-t confidence interval of the mean (n - 1 degrees of freedom), in the values' units; None for
    n < 2."""
    n = len(values)
    if n < 2:
        return None
    half = stats.t.ppf((1 + level) / 2, n - 1) * statistics.stdev(values) / n**0.5
    mean = statistics.fmean(values)
    return mean - half, mean + half


def paired_table(pairs: Sequence[tuple[Row, dict[int, float]]]) -> list[str]:
    """The paired comparison's markdown lines: per-seed differences, their mean ± std, 95% interval, wins, n."""
    with_settings = any(row.settings for row, _ in pairs)
    header = ["data", "model", "QKV embedding", "params"] + ["settings"] * with_settings
    header += ["per seed", "mean ± std", "95% CI of the mean", "better in", "n pairs"]
    align = ["---"] * 3 + ["---:"] + ["---"] * with_settings + ["---", "---:", "---:", "---:", "---:"]
    lines = [table_line(header), table_line(align)]
    for row, differences in pairs:
        values = list(differences.values())
        interval = mean_interval(values)
        cells = [row.data, row.model, row.qkv, f"{row.params:,}"] + [row.settings] * with_settings
        cells += [
            ", ".join(f"s{seed} {signed(d)}" for seed, d in differences.items()),
            mean_std(values, signed=True),
            f"[{signed(interval[0])}, {signed(interval[1])}]" if interval else "",
            f"{sum(d > 0 for d in values)} of {len(values)}",
            str(len(values)),
        ]
        lines.append(table_line(cells))
    return lines


EVALUATION_TITLE = (
    "Final weights evaluated (`python -m qkv_vit.evaluate`, each run's evaluation.json; ECE and top-1 in %, "
    "AUROC in %):"
)
OOD_SCORES = ("msp", "max_logit", "energy", "mahalanobis")  # the OOD scores' column order; any other after, sorted


@dataclasses.dataclass
class EvaluatedGroup:
    """The evaluation.json of a main-table row's finished runs that have one, of one split (each run's first) and one
    kind of weights (EMA or not)."""

    row: Row
    split: str
    splits: list[dict[str, Any]]  # each run's metrics of `split`
    ood: list[dict[str, Any]]  # each run's "ood": {data set: {score: {"auroc", ...}}}
    ema: bool  # whether these runs were evaluated with their EMA weights (all of them, or none)


def evaluated_groups(rows: Sequence[Row], runs: Iterable[RunRecord]) -> list[EvaluatedGroup]:
    """The finished, evaluated runs by main-table row (in its order), then by their first split and whether they were
    evaluated with EMA weights (a row whose runs name different first splits, or evaluated different weights, gets a
    line per split and weights: never a mean over different data, nor over EMA and raw weights)."""
    by_key: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        if run.finished and run.evaluation:
            by_key.setdefault(group_key(run), []).append(run)
    groups = []
    for row in rows:
        by_split: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        for run in by_key.get(row.key, []):
            split = next(iter(run.evaluation["splits"]))
            by_split.setdefault((split, bool(run.evaluation.get("ema"))), []).append(run.evaluation)
        for (split, ema), evaluations in by_split.items():
            groups.append(
                EvaluatedGroup(
                    row,
                    split,
                    [e["splits"][split] for e in evaluations],
                    [e.get("ood") or {} for e in evaluations],
                    ema,
                )
            )
    return groups


def worst_class(split: dict[str, Any]) -> tuple[str, float] | None:
    """The class with the lowest top-1 in a split's metrics and that top-1 (%); None without per-class metrics."""
    per_class = {name: found["top1"] for name, found in (split.get("per_class") or {}).items() if "top1" in found}
    if not per_class:
        return None
    name = min(per_class, key=per_class.__getitem__)
    return name, 100 * per_class[name]


def worst_class_cell(splits: Sequence[dict[str, Any]]) -> str:
    """Mean ± std over runs of each run's worst class top-1 (%), and the class worst in most runs (ties: all,
    sorted)."""
    found = [w for w in map(worst_class, splits) if w is not None]
    if not found:
        return ""
    counts = Counter(name for name, _ in found)
    most = max(counts.values())
    names = sorted(name for name, count in counts.items() if count == most)
    return f"{mean_std([top1 for _, top1 in found])} ({', '.join(names)})"


def ood_columns(groups: Iterable[EvaluatedGroup]) -> list[tuple[str, str]]:
    """Every (OOD data set, score) with an AUROC in these evaluations: sets sorted, scores in OOD_SCORES' order then
    any other sorted."""
    found = {
        (name, score)
        for g in groups
        for ood in g.ood
        for name, scores in ood.items()
        for score, metrics in scores.items()
        if isinstance(metrics, dict) and "auroc" in metrics  # not "count"
    }
    return sorted(found, key=lambda item: (item[0], score_rank(item[1]), item[1]))


def score_rank(score: str) -> int:
    """An OOD score's place among the columns: OOD_SCORES' order, any other after."""
    return OOD_SCORES.index(score) if score in OOD_SCORES else len(OOD_SCORES)


def auroc_values(ood: Iterable[dict[str, Any]], name: str, score: str) -> list[float]:
    """AUROC (%) of `score` on OOD data set `name`, from each evaluation's "ood" that has it."""
    found = [o.get(name, {}).get(score) for o in ood]
    return [100 * f["auroc"] for f in found if isinstance(f, dict) and "auroc" in f]


def evaluation_table(groups: Sequence[EvaluatedGroup], with_settings: bool) -> list[str]:
    """The evaluations' markdown lines: a line per group, the main table's labels, ECE, worst class, OOD AUROCs."""
    columns = ood_columns(groups)
    header = ["data", "model", "QKV embedding"] + ["settings"] * with_settings
    header += ["split", "n", "ECE", "worst class top-1"] + [f"OOD {name} {score} AUROC" for name, score in columns]
    align = ["---"] * (3 + with_settings) + ["---", "---:", "---:", "---:"] + ["---:"] * len(columns)
    lines = [table_line(header), table_line(align)]
    for g in groups:
        cells = [g.row.data, g.row.model, g.row.qkv] + [g.row.settings] * with_settings
        cells += [g.split + " (EMA)" * g.ema, str(len(g.splits))]
        cells += [mean_std([100 * s["ece"] for s in g.splits if "ece" in s]), worst_class_cell(g.splits)]
        cells += [mean_std(auroc_values(g.ood, name, score)) for name, score in columns]
        lines.append(table_line(cells))
    return lines


def evaluation_section(rows: Sequence[Row], runs: Sequence[RunRecord]) -> list[str]:
    """The evaluations' title, table and unreadable evaluation.json files, after a blank line; [] where no run has
    an evaluation.json (finished and readable, or unreadable)."""
    groups = evaluated_groups(rows, runs)
    unreadable = [f"- {run.workdir}: {run.evaluation_error}" for run in runs if run.evaluation_error]
    if not groups and not unreadable:
        return []
    table = ["", *evaluation_table(groups, any(r.settings for r in rows))] if groups else []
    return ["", EVALUATION_TITLE, *table, *([""] + unreadable if unreadable else [])]


def table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "paths", nargs="+", help="Run directories, or directories holding runs (searched up to 3 levels down)."
    )
    parser.add_argument("--out", help="Also write the table to this file.")
    parser.add_argument(
        "--card", action="store_true", help="The paper card instead: each claim beside ours, every run's measures."
    )
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in find_runs(args.paths)]
    except (FileNotFoundError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.card:
        from qkv_vit import paper_card  # reads checkpoints (F-SNE codes): JAX and Orbax, only for the card

        table = paper_card.card(runs)
    else:
        table = markdown(runs)
    print(table, end="")
    if args.out:
        epath.Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
