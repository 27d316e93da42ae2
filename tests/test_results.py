"""The results table: hand-written workdirs with known numbers (means, spreads, paper columns, unfinished runs),
and one real run of the trainer read back."""

import json
import shutil

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
    assert paired.splitlines()[-1] == "A difference whose 95% interval contains 0 is not shown by these runs."
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
        "optimizer.lr=0.01, total_epochs=400.0",
        "s0 +5.00, s1 -1.00, s2 +0.00",
        "+1.33 ± 3.21",
        "[-6.65, +9.32]",
        "1 of 3",
        "3",
    ]
    assert row(paired, "sne (h=64)")[5] == "s0 +1.00, s1 -2.00, s2 +3.00"
    assert "fsne" not in paired and row(main_table(table), "fsne (m=8, h=128)")[-3:] == ["70.00 ± 0.00", "2", ""]


def test_no_linear_runs_no_paired_comparison(tmp_path):
    paired_runs(tmp_path, {"sne": [0.51, 0.50, 0.60], "fsne_m8": [0.55, 0.56, 0.60]})
    fake_run(tmp_path, "linear_other_model", model_name="xcit_tiny_12_p8", top1=0.5)  # linear, but another model
    runs = [results.read_run(p) for p in results.find_runs([tmp_path])]
    table = results.markdown(runs)
    assert "Paired" not in table and results.PAIRED_CAVEAT not in table
    assert table == "\n".join(results.rows_table(results.summarize(runs))) + "\n"  # the results table alone


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
    "config, label",
    [
        ({"data.source": "image_folder", "data.path": "/d/cifar10-jpeg.tar.gz"}, "cifar10-jpeg"),
        ({"data.source": "digits", "data.path": None}, "digits"),
        ({"data.source": "tfds", "data.name": "cifar100", "init_from": "/runs/x"}, "cifar100 (fine-tuned)"),
    ],
)
def test_data_label_names_the_data_whatever_the_source(config, label):
    assert results.data_label({"data.name": "", **config}) == label
