"""The results table: hand-written workdirs with known numbers (means, spreads, paper columns, unfinished runs),
and one real run of the trainer read back."""

import json
import shutil
from pathlib import Path

import jax
import pytest

from conftest import load_config
from qkv_vit import models, results
from qkv_vit.train import train_and_evaluate
from qkv_vit.train.logging_utils import read_metrics


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """XLA without most optimizations: these runs check what a config does, not speed; compiling takes half the CPU."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def fake_run(
    root,
    name,
    *,
    top1,
    seed=0,
    qkv="linear",
    model_name="xcit_nano_12_p8",
    total_steps=4,
    last_step=None,
    ema=None,
    data=None,
    changes=None,
    drop=(),
    num_params=1_234_567,
):
    """A workdir as the trainer writes it, with evaluations at step 2 (top-1 0.99) and at `last_step` (`top1`)."""
    config = load_config("quickstart", None)
    config.update(seed=seed, qkv=qkv, model_name=model_name, total_steps=total_steps)
    config.update(changes or {})
    config.data.update(data or {})
    config_json = json.loads(config.to_json())
    for key in drop:  # a config written before `key` existed
        section, _, leaf = key.rpartition(".")
        del (config_json[section] if section else config_json)[leaf]
    workdir = root / name
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config_json))
    architecture = models.architecture(model_name, qkv)
    model = {"model_name": model_name, "qkv": qkv, "architecture": architecture, "num_params": num_params}
    (workdir / "model.json").write_text(json.dumps(model))
    records = [{"step": 2, "train/loss": 2.0}, {"step": 2, "val/top1": 0.99, "val/count": 360.0}]
    final = {"step": last_step or total_steps, "val/top1": top1, "val/top5": 1.0, "val/count": 360.0}
    if ema is not None:
        final["ema_val/top1"] = ema
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [*records, final]) + "\n")
    return workdir


def row(table, *cells):
    """The table line holding all these cells."""
    lines = [line for line in table.splitlines() if all(f"| {cell} |" in line for cell in cells)]
    assert len(lines) == 1, (cells, table)
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def main_table(table):
    """The results table (seeds averaged), without the paired comparison and the sections below it."""
    return table.split("\n\n")[0]


def paired_table(table):
    """The paired comparison with the linear QKV embedding, from its title to its caveat; "" if there is none."""
    start = table.find(results.PAIRED_TITLE)
    return "" if start < 0 else table[start : table.index(results.PAIRED_CAVEAT) + len(results.PAIRED_CAVEAT)]


def unpaired(table):
    """The lines naming the rows that the paired comparison left out."""
    return [line for line in table.splitlines() if ": not paired (" in line]


def test_seeds_are_averaged_and_unfinished_runs_listed_apart(tmp_path):
    for seed, top1 in enumerate([0.50, 0.52, 0.57]):
        fake_run(tmp_path, f"linear_s{seed}", seed=seed, top1=top1)
    fake_run(tmp_path, "linear_s3", seed=3, top1=0.99, last_step=2)  # stopped at step 2 of 4
    fake_run(tmp_path, "fsne_s0", qkv="fsne_m8", top1=0.60, ema=0.61)
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    main = main_table(table)
    # mean 53.00, sample std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13) = 3.61
    assert row(main, "linear")[-4:] == ["53.00 ± 3.61", "", "3", ""]
    assert row(main, "fsne (m=8, h=128)")[-4:] == ["60.00", "61.00", "1", ""]
    assert row(main, "linear")[:4] == ["digits", "xcit_nano_12_p8", "linear", "1,234,567"]
    header = "| data | model | QKV embedding | params | top-1 (%) | EMA top-1 (%) | n | paper / XCiT top-1 |"
    assert table.splitlines()[0] == header
    # The F-SNE run pairs with the linear run of its seed, 0: one pair, no interval.
    assert row(paired_table(table), "fsne (m=8, h=128)")[-5:] == ["s0 +10.00", "+10.00", "", "1 of 1", "1"]
    assert f"- {tmp_path / 'linear_s3'}: step 2 of 4" in table


def test_runs_that_differ_by_more_than_the_seed_are_separate_rows_that_say_how(tmp_path):
    fake_run(tmp_path, "a", seed=0, top1=0.5, drop=["optimizer.name"])  # an older config: the key reads as its default
    fake_run(tmp_path, "b", seed=1, top1=0.7)
    fake_run(tmp_path, "c", top1=0.9, changes={"optimizer": {"lr": 0.01}})
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    assert row(table, "optimizer.lr=0.002")[-4:] == ["optimizer.lr=0.002", "60.00 ± 14.14", "2", ""]
    assert row(table, "optimizer.lr=0.01")[-3:] == ["90.00", "1", ""]


def test_imagenet_rows_show_xcits_and_the_papers_numbers(tmp_path):
    imagenet = dict(source="tfds", name="imagenet2012")
    fake_run(tmp_path, "n12_linear", model_name="xcit_nano_12_p16", top1=0.70, data=imagenet)
    fake_run(tmp_path, "n12_fsne", model_name="xcit_nano_12_p16", qkv="fsne_m8_wide", top1=0.71, data=imagenet)
    fake_run(tmp_path, "s24_sne", model_name="xcit_small_24_p16", qkv="sne", top1=0.8, data=imagenet)
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    main = main_table(table)
    assert row(main, "linear")[0] == "imagenet2012" and row(main, "linear")[-1] == "69.9 (XCiT)"
    assert row(main, "fsne (m=8, h=192)")[-1] == "71.4 (proposed, 3.1M)"
    assert row(main, "sne (h=192)")[-1] == ""  # the paper has no S24 number
    # Only the nano F-SNE has a linear partner (the S24 has no linear run of its model).
    assert row(paired_table(table), "fsne (m=8, h=192)")[-5:] == ["s0 +1.00", "+1.00", "", "1 of 1", "1"]
    assert "sne (h=192)" not in paired_table(table)
    assert unpaired(table) == [
        "- imagenet2012 xcit_small_24_p16 sne (h=192): not paired (no linear run of the same data, model and recipe)"
    ]


def test_transfer_runs_on_all_four_sets_get_a_mean_next_to_the_papers(tmp_path):
    for name, top1 in zip(results.TRANSFER_SETS, [0.90, 0.80, 0.95, 0.97], strict=True):
        fake_run(
            tmp_path,
            name,
            model_name="xcit_nano_12_p16",
            qkv="fsne_m8",
            top1=top1,
            data=dict(source="tfds", name=name),
            changes={"init_from": "gs://b/in1k/n12_fsne"},
        )
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    assert row(table, "cars196 (fine-tuned)")[-3:] == ["95.00", "1", ""]
    assert row(table, "90.50") == ["xcit_nano_12_p16", "fsne (m=8, h=128)", "1,234,567", "90.50", "93.3 (F-SNE, 2.9M)"]


def paired_runs(root, top1s, *, changes=None, seeds=(0, 1, 2)):
    """Fake runs {qkv preset: top-1 per seed} with these seeds, one workdir each."""
    for qkv, values in top1s.items():
        for seed, top1 in zip(seeds, values, strict=True):
            fake_run(
                root, f"{qkv}_{changes or ''}_s{seed}".replace(" ", ""), qkv=qkv, seed=seed, top1=top1, changes=changes
            )


def ci(cells):
    """The 95% interval cell "[-1.23, +4.56]" as two floats."""
    low, high = cells.strip("[]").split(", ")
    return float(low), float(high)


def test_each_embedding_is_paired_with_the_linear_one_seed_by_seed(tmp_path):
    paired_runs(
        tmp_path,
        {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60], "fsne_m8": [0.55, 0.56, 0.60]},
    )
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    main, paired = main_table(table), paired_table(table)
    assert row(main, "sne (h=64)")[-3:] == ["53.67 ± 5.51", "3", ""]  # the main table is unchanged
    assert paired.splitlines()[0] == results.PAIRED_TITLE
    header = (
        "| data | model | QKV embedding | params | per seed | mean ± std | 95% CI of the mean | better in | n pairs |"
    )
    assert paired.splitlines()[2] == header
    assert paired.splitlines()[-1] == (
        "A difference whose 95% interval contains 0 is not shown by these runs. With several embeddings or recipes "
        "compared, about one interval in twenty excludes 0 by chance where there is no difference."
    )  # the multiple-comparison caveat: 5% of the intervals of differences that are 0 exclude it
    assert unpaired(table) == []  # every non-linear row has its pairs
    # sne - linear: +1, -2, +3; mean 2/3, sd sqrt(((1/3)^2 + (8/3)^2 + (7/3)^2) / 2) = sqrt(19/3) = 2.52
    sne = row(paired, "sne (h=64)")
    assert sne[:4] == ["digits", "xcit_nano_12_p8", "sne (h=64)", "1,234,567"]
    assert sne[4:] == ["s0 +1.00, s1 -2.00, s2 +3.00", "+0.67 ± 2.52", "[-5.58, +6.92]", "2 of 3", "3"]
    # By hand: mean ± t(0.975, 2 degrees of freedom) * sd / sqrt(3), t = 4.303.
    half = 4.303 * (19 / 3) ** 0.5 / 3**0.5
    assert ci(sne[6]) == pytest.approx((2 / 3 - half, 2 / 3 + half), abs=0.01)
    # fsne - linear: +5, +4, +3; mean 4, sd 1, interval 4 ± 4.303 / sqrt(3) = 4 ± 2.48
    fsne = row(paired, "fsne (m=8, h=128)")
    assert fsne[4:] == ["s0 +5.00, s1 +4.00, s2 +3.00", "+4.00 ± 1.00", "[+1.52, +6.48]", "3 of 3", "3"]
    assert "| linear |" not in paired  # the baseline is not paired with itself
    assert table.index(results.PAIRED_TITLE) > table.index(main)


def test_only_seeds_both_sides_have_are_paired(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60]})
    fake_run(tmp_path, "sne_s3", qkv="sne", seed=3, top1=0.10)  # no linear seed 3
    fake_run(tmp_path, "linear_s4", seed=4, top1=0.90)  # no sne seed 4
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    assert row(main_table(table), "sne (h=64)")[-2] == "4"
    assert row(main_table(table), "linear")[-2] == "4"
    assert row(paired_table(table), "sne (h=64)")[-5:] == [
        "s0 +1.00, s1 -2.00, s2 +3.00",
        "+0.67 ± 2.52",
        "[-5.58, +6.92]",
        "2 of 3",
        "3",
    ]


def test_a_different_recipe_pairs_only_with_its_own_linear_runs(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60]})
    lr = {"optimizer": {"lr": 0.01}}
    paired_runs(tmp_path, {"linear": [0.40, 0.40, 0.40], "psne": [0.45, 0.39, 0.40]}, changes=lr)
    paired_runs(tmp_path, {"fsne_m8": [0.70, 0.70]}, changes={"total_epochs": 7.0}, seeds=(0, 1))  # no linear
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    paired = paired_table(table)
    # psne - its linear (lr 0.01): +5, -1, 0 (not against the other linear's 50, 52, 57); a tie is not better
    assert row(paired, "psne (h=96, shared first)")[4:] == [
        "optimizer.lr=0.01, total_epochs=400",
        "s0 +5.00, s1 -1.00, s2 +0.00",
        "+1.33 ± 3.21",
        "[-6.65, +9.32]",
        "1 of 3",
        "3",
    ]
    assert row(paired, "sne (h=64)")[5] == "s0 +1.00, s1 -2.00, s2 +3.00"
    assert "fsne" not in paired and row(main_table(table), "fsne (m=8, h=128)")[-3:] == ["70.00 ± 0.00", "2", ""]
    # ... but named below the comparison, with its settings and why
    assert unpaired(table) == [
        "- digits xcit_nano_12_p8 fsne (m=8, h=128) [optimizer.lr=0.002, total_epochs=7]: not paired "
        "(no linear run of the same data, model and recipe)"
    ]
    assert table.index(results.PAIRED_CAVEAT) < table.index(unpaired(table)[0])


def test_rows_without_a_seed_in_common_with_their_linear_runs_are_named_after_the_paired_comparison(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60]})
    paired_runs(tmp_path, {"fsne_m8": [0.70, 0.71]}, seeds=(5, 6))  # the linear runs' recipe, other seeds
    fake_run(tmp_path, "linear_cut", seed=3, top1=0.99, last_step=2)
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    assert "fsne" not in paired_table(table) and row(main_table(table), "fsne (m=8, h=128)")[-2] == "2"
    line = "- digits xcit_nano_12_p8 fsne (m=8, h=128): not paired (no seed in common with the linear runs)"
    assert unpaired(table) == [line]
    assert f"{results.PAIRED_CAVEAT}\n\n{line}\n\nUnfinished runs" in table


def test_a_setting_only_f_sne_codes_read_does_not_keep_a_row_from_its_linear_partner(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57]})
    paired_runs(tmp_path, {"fsne_m8": [0.55, 0.56, 0.60]}, changes={"optimizer": {"code_weight_decay": True}})
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    assert row(main_table(table), "linear")[4] == "optimizer.code_weight_decay=False"  # still told apart there
    fsne = row(paired_table(table), "fsne (m=8, h=128)")
    assert fsne[4:] == [
        "optimizer.code_weight_decay=True",
        "s0 +5.00, s1 +4.00, s2 +3.00",
        "+4.00 ± 1.00",
        "[+1.52, +6.48]",
        "3 of 3",
        "3",
    ]
    assert unpaired(table) == []


def test_no_linear_runs_no_paired_comparison(tmp_path):
    paired_runs(tmp_path, {"sne": [0.51, 0.50, 0.60], "fsne_m8": [0.55, 0.56, 0.60]})
    fake_run(tmp_path, "linear_other_model", model_name="xcit_tiny_12_p8", top1=0.5)  # linear, but another model
    runs = [results.read_run(p) for p in results.find_runs([tmp_path])]
    table = results.markdown(runs)
    assert "Paired" not in table and results.PAIRED_CAVEAT not in table
    assert table == "\n".join(results.rows_table(results.summarize(runs))) + "\n"  # the results table alone


def fake_evaluation(workdir, *, ece, per_class, ood=None, split="test", ema=False, extra_splits=()):
    """An evaluation.json as `python -m qkv_vit.evaluate` writes it: `split` first, per-class top-1 {class: top-1},
    OOD {data set: {score: AUROC}}."""
    metrics = {
        "count": 100 * len(per_class),
        "top1": sum(per_class.values()) / len(per_class),
        "top5": 1.0,
        "loss": 0.5,
        "ece": ece,
        "per_class": {name: {"count": 100, "top1": top1} for name, top1 in per_class.items()},
    }
    evaluation = {
        "weights": str(workdir),
        "ema": ema,
        "splits": {split: metrics, **{name: {**metrics, "ece": 0.99} for name in extra_splits}},
        "ood": {
            name: {"count": 360, **{score: {"auroc": a, "fpr95": 0.5, "aupr_in": 0.9} for score, a in scores.items()}}
            for name, scores in (ood or {}).items()
        },
        "corruptions": {"data": "x", "errors": {}, "mean_error": 0.5, "mce": 1.0},
    }
    (workdir / "evaluation.json").write_text(json.dumps(evaluation))
    return evaluation


def evaluation_table(table):
    """The evaluations of final weights, from their title to the next blank line after the table; "" if none."""
    start = table.find(results.EVALUATION_TITLE)
    if start < 0:
        return ""
    end = table.find("\n\n", table.index("\n|", start))
    return table[start : end if end >= 0 else len(table)]


CLASSES = ("cat", "dog", "bird")


def test_evaluations_are_averaged_by_row_with_the_worst_class_and_ood_aurocs(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "fsne_m8": [0.55, 0.56, 0.60]})
    linear = [(0.05, (0.64, 0.62, 0.90), 0.70), (0.06, (0.60, 0.70, 0.90), 0.72), (0.07, (0.62, 0.70, 0.90), 0.74)]
    for seed, (ece, per_class, msp) in enumerate(linear):
        fake_evaluation(
            tmp_path / f"linear__s{seed}",
            ece=ece,
            per_class=dict(zip(CLASSES, per_class, strict=True)),
            ood={"digits": {"energy": 0.80, "msp": msp}},  # written energy first: shown msp first
        )
    fsne = [((0.60, 0.70, 0.50), 0.75, False), ((0.60, 0.70, 0.54), 0.75, True), ((0.52, 0.70, 0.60), 0.78, False)]
    for seed, (per_class, msp, ema) in enumerate(fsne):
        fake_evaluation(
            tmp_path / f"fsne_m8__s{seed}",
            ece=0.04,
            per_class=dict(zip(CLASSES, per_class, strict=True)),
            ood={"svhn": {"knn": 0.9, "msp": 0.6}, "digits": {"mahalanobis": 0.5 + seed / 10, "msp": msp}},
            ema=ema,
        )
    fake_run(tmp_path, "linear_cut", seed=3, top1=0.99, last_step=2)  # unfinished: its evaluation is not counted
    fake_evaluation(tmp_path / "linear_cut", ece=0.90, per_class={"cat": 0.0}, ood={"other": {"msp": 0.1}})
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    evaluated = evaluation_table(table)
    lines = evaluated.splitlines()
    assert lines[0] == results.EVALUATION_TITLE and lines[1] == ""
    assert lines[2] == (
        "| data | model | QKV embedding | split | n | ECE | worst class top-1 | OOD digits msp AUROC "
        "| OOD digits energy AUROC | OOD digits mahalanobis AUROC | OOD svhn msp AUROC | OOD svhn knn AUROC |"
    )
    assert len(lines) == 7  # title, blank, header, alignment, a line per row and weights (F-SNE: raw and EMA)
    # ECE 5, 6, 7 %; worst classes dog 62, cat 60, cat 62: mean 61.33, sd sqrt((4/9 + 16/9 + 4/9) / 2) = 1.15, cat
    # in 2 of 3 (not the first run's, nor the worst of the per-class means: cat 62.00); msp 70, 72, 74; energy 80
    assert row(evaluated, "linear") == [
        "digits", "xcit_nano_12_p8", "linear", "test", "3", "6.00 ± 1.00", "61.33 ± 1.15 (cat)",
        "72.00 ± 2.00", "80.00 ± 0.00", "", "", "",
    ]  # fmt: skip
    # The runs of raw weights, s0 and s2 (never averaged with s1's EMA weights): worst bird 50, cat 52: mean 51,
    # sd 1.41, a tie; msp 75, 78: mean 76.5, sd 2.12; mahalanobis 50, 70: mean 60, sd 14.14
    assert row(evaluated, "fsne (m=8, h=128)", "test") == [
        "digits", "xcit_nano_12_p8", "fsne (m=8, h=128)", "test", "2", "4.00 ± 0.00", "51.00 ± 1.41 (bird, cat)",
        "76.50 ± 2.12", "", "60.00 ± 14.14", "60.00 ± 0.00", "90.00 ± 0.00",
    ]  # fmt: skip
    # The run of EMA weights, s1: worst bird 54, msp 75, mahalanobis 60
    assert row(evaluated, "fsne (m=8, h=128)", "test (EMA)") == [
        "digits", "xcit_nano_12_p8", "fsne (m=8, h=128)", "test (EMA)", "1", "4.00", "54.00 (bird)",
        "75.00", "", "60.00", "60.00", "90.00",
    ]  # fmt: skip
    assert lines.index(row_line(evaluated, "linear")) < lines.index(row_line(evaluated, "fsne (m=8, h=128)", "test"))
    # after the paired comparison, before the unfinished runs
    assert table.index(results.PAIRED_CAVEAT) < table.index(results.EVALUATION_TITLE) < table.index("Unfinished")
    assert "other" not in evaluated and "90.00 ± " not in row_line(evaluated, "linear")


def row_line(table, *cells):
    """The table line holding all these cells, as it is written."""
    return "| " + " | ".join(row(table, *cells)) + " |"


def test_a_row_counts_only_its_runs_with_an_evaluation_and_ties_name_every_worst_class(tmp_path):
    lr = {"optimizer": {"lr": 0.01}}
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60]})
    paired_runs(tmp_path, {"linear": [0.40, 0.40]}, changes=lr, seeds=(0, 1))
    fake_evaluation(tmp_path / "linear__s0", ece=0.02, per_class={"cat": 0.5, "dog": 0.6})
    fake_evaluation(tmp_path / "linear__s2", ece=0.03, per_class={"cat": 0.7, "dog": 0.6})  # no s1, and no OOD
    for seed, worst in enumerate(["dog", "cat"]):  # one each: a tie
        path = tmp_path / f"linear_{lr}_s{seed}".replace(" ", "")
        fake_evaluation(path, ece=0.1, per_class={"cat": 0.5, "dog": 0.5, worst: 0.4}, split="val")
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    evaluated = evaluation_table(table)
    header = "| data | model | QKV embedding | settings | split | n | ECE | worst class top-1 |"
    assert evaluated.splitlines()[2] == header
    assert row(main_table(table), "linear", "optimizer.lr=0.002")[-2] == "3"
    assert row(evaluated, "linear", "optimizer.lr=0.002")[4:] == ["test", "2", "2.50 ± 0.71", "55.00 ± 7.07 (cat, dog)"]
    assert row(evaluated, "linear", "optimizer.lr=0.01")[4:] == ["val", "2", "10.00 ± 0.00", "40.00 ± 0.00 (cat, dog)"]
    assert "sne" not in evaluated  # no sne run has an evaluation.json
    assert row(main_table(table), "sne (h=64)")[-2] == "3"


def test_runs_whose_first_splits_differ_are_never_averaged_together(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52]}, seeds=(0, 1))
    fake_evaluation(tmp_path / "linear__s0", ece=0.02, per_class={"cat": 0.5}, split="test", extra_splits=["val"])
    fake_evaluation(tmp_path / "linear__s1", ece=0.04, per_class={"cat": 0.7}, split="val")
    evaluated = evaluation_table(results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])]))
    assert row(evaluated, "test")[3:] == ["test", "1", "2.00", "50.00 (cat)"]
    assert row(evaluated, "val")[3:] == ["val", "1", "4.00", "70.00 (cat)"]  # not s0's val (ECE 99)


def test_no_evaluation_of_a_finished_run_no_evaluation_section(tmp_path):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60]})
    fake_run(tmp_path, "linear_cut", seed=3, top1=0.99, last_step=2)
    fake_evaluation(tmp_path / "linear_cut", ece=0.5, per_class={"cat": 0.5})  # an unfinished run's: not counted
    runs = [results.read_run(p) for p in results.find_runs([tmp_path])]
    assert runs[0].evaluation is None and runs[0].evaluation_error == ""
    rows = results.summarize(runs)
    paired = ["", results.PAIRED_TITLE, "", *results.paired_table(results.paired_with_linear(rows))]
    unfinished = ["", "Unfinished runs (not in the table above):", "", f"- {tmp_path / 'linear_cut'}: step 2 of 4"]
    expected = [*results.rows_table(rows), *paired, "", results.PAIRED_CAVEAT, *unfinished]
    assert results.markdown(runs) == "\n".join(expected) + "\n"


def test_an_unreadable_evaluation_is_one_line_and_the_rest_is_still_there(tmp_path, capsys):
    paired_runs(tmp_path, {"linear": [0.50, 0.52, 0.57], "sne": [0.51, 0.50, 0.60]})
    for seed in range(3):
        fake_evaluation(tmp_path / f"sne__s{seed}", ece=0.01 * (seed + 1), per_class={"cat": 0.5})
    cut = '{"weights": "/w", "splits": {"te'  # cut mid-write
    (tmp_path / "sne__s2" / "evaluation.json").write_text(cut)
    with pytest.raises(json.JSONDecodeError) as error:
        json.loads(cut)
    (tmp_path / "linear__s1" / "evaluation.json").write_text('{"weights": "/w"}')  # valid JSON, no splits
    assert results.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    evaluated = evaluation_table(printed)
    assert row(evaluated, "sne (h=64)")[3:] == ["test", "2", "1.50 ± 0.71", "50.00 ± 0.00 (cat)"]
    assert "| linear |" not in evaluated
    reported = [line for line in printed.splitlines() if "evaluation.json unreadable" in line]
    assert reported == [
        f"- {tmp_path / 'linear__s1'}: evaluation.json unreadable: no splits (not written by "
        "`python -m qkv_vit.evaluate`?)",
        f"- {tmp_path / 'sne__s2'}: evaluation.json unreadable: {error.value}",
    ]
    assert printed.index(evaluated) < printed.index(reported[0])
    assert row(main_table(printed), "sne (h=64)")[-2] == "3" and results.PAIRED_CAVEAT in printed
    # With no readable evaluation at all, the title and the line.
    (tmp_path / "sne__s0" / "evaluation.json").unlink()
    (tmp_path / "sne__s1" / "evaluation.json").unlink()
    (tmp_path / "linear__s1" / "evaluation.json").unlink()
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path])])
    assert table.endswith(f"{results.PAIRED_CAVEAT}\n\n{results.EVALUATION_TITLE}\n\n{reported[1]}\n")


@pytest.mark.slow
def test_a_real_run_is_read_as_the_trainer_wrote_it(tmp_path, tiny_config):
    tiny_config.total_steps = None
    tiny_config.total_epochs = 3 / 89  # 1437 digits / batch 16 = 89 steps per epoch: 3 steps, counted from the data
    state = train_and_evaluate(tiny_config, tmp_path / "runs" / "real")
    run = results.read_run(tmp_path / "runs" / "real")
    final = [m for m in read_metrics(tmp_path / "runs" / "real") if "val/top1" in m][-1]
    assert run.finished and run.total_steps == 3 == final["step"] == int(state.step)
    table = results.markdown([run])
    assert row(table, "digits")[3] == f"{models.count_params(state.params):,}"
    assert row(table, "digits")[-3:] == [f"{100 * final['val/top1']:.2f}", "1", ""]
    # The same run without its final evaluation is unfinished.
    shutil.copytree(tmp_path / "runs" / "real", tmp_path / "runs" / "cut")
    metrics = (tmp_path / "runs" / "cut" / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in metrics if json.loads(line)["step"] < 3]
    (tmp_path / "runs" / "cut" / "metrics.jsonl").write_text(
        "\n".join(kept) + '\n{"step": 3, "val/to'
    )  # killed mid-line
    table = results.markdown([results.read_run(p) for p in results.find_runs([tmp_path / "runs"])])
    assert row(table, "digits")[-2] == "1" and "cut: step 2 of 3" in table


def test_command_line(tmp_path, capsys):
    fake_run(tmp_path / "sweep" / "a", "s0", top1=0.5)  # two levels below the given directory
    out = tmp_path / "table.md"
    assert results.main([str(tmp_path / "sweep"), f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() and "| 50.00 | 1 |" in printed
    assert results.main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert results.main([str(tmp_path / "empty")]) == 1
    assert "No runs under" in capsys.readouterr().err


@pytest.mark.parametrize("values, expected", [([], ""), ([50.0], "50.00"), ([50.0, 52.0], "51.00 ± 1.41")])
def test_mean_std(values, expected):
    assert results.mean_std(values) == expected


@pytest.mark.parametrize(
    "values, expected",
    [([], ""), ([-0.634], "-0.63"), ([1.0, -2.0, 3.0], "+0.67 ± 2.52"), ([-3.0, -5.0], "-4.00 ± 1.41")],
)
def test_mean_std_signed_is_the_same_helper(values, expected):
    assert results.mean_std(values, signed=True) == expected
    assert not hasattr(results, "signed_mean_std")  # one helper, not two that can drift apart


def test_final_top1_reads_the_final_evaluation_as_the_table_does(tmp_path):
    record = results.RunRecord("w", {"eval_name": "holdout"}, {}, 4, 4, {"step": 4, "holdout/top1": 0.625})
    assert results.final_top1(record) == 62.5 and results.final_top1(record, ema=True) is None
    record.final["ema_holdout/top1"] = 0.75
    assert results.final_top1(record, ema=True) == 75.0
    assert results.final_top1(results.RunRecord("w", {}, {}, 4, 4, {"step": 4, "val/top1": 0.5})) == 50.0
    assert results.final_top1(results.RunRecord("w", {}, {}, 4, 2, None)) is None  # unfinished
    run = results.read_run(fake_run(tmp_path, "a", top1=0.57, ema=0.58))
    assert results.final_top1(run) == pytest.approx(57.0) and results.final_top1(run, ema=True) == pytest.approx(58.0)
    [found] = results.summarize([run])
    assert found.top1 == [results.final_top1(run)] and found.ema_top1 == [results.final_top1(run, ema=True)]


def test_results_py_lines_fit_in_120_characters():
    """The formatter wraps code at 120, not docstrings: these are checked here."""
    source = Path(results.__file__).read_text(encoding="utf-8").splitlines()
    assert [number for number, line in enumerate(source, 1) if len(line) > 120] == []


@pytest.mark.parametrize(
    "config, label",
    [
        ({"data.source": "image_folder", "data.path": "/d/cifar10-jpeg.tar.gz"}, "cifar10-jpeg"),
        ({"data.source": "digits", "data.path": None}, "digits"),
        ({"data.source": "tfds", "data.name": "cifar100", "init_from": "/runs/x"}, "cifar100 (fine-tuned)"),
    ],
)
def test_data_label_names_the_data_whatever_the_source(config, label):
    assert results.data_label({"data.name": "", **config}) == label


def test_settings_show_floats_without_their_binary_noise():
    assert results.setting_value(0.1 + 0.2) == "0.3" and results.setting_value(1e-3) == "0.001"
    assert results.setting_value(3) == "3" and results.setting_value("adamw") == "adamw"
