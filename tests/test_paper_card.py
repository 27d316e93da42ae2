"""The paper card (python -m qkv_vit.results --card): each claim beside ours where a run measures it, never a
number where none does; per run, what its evaluation.json holds."""

import json

from test_results import fake_run

from qkv_vit import models, paper_card, results
from qkv_vit.models.flops import count_macs

IMAGENET = dict(source="tfds", name="imagenet2012")


def claim_row(card: str, start: str) -> list[str]:
    (line,) = [line for line in card.splitlines() if line.startswith(f"| {start}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def card_of(root) -> str:
    return paper_card.card([results.read_run(p) for p in results.find_runs([root])])


def test_claims_are_measured_only_by_runs_of_their_setting(tmp_path):
    fake_run(tmp_path, "n12_linear", model_name="xcit_nano_12_p16", top1=0.70, data=IMAGENET, num_params=3_053_224)
    fake_run(tmp_path, "n12_wide", model_name="xcit_nano_12_p16", qkv="fsne_m8_wide", top1=0.712, data=IMAGENET)
    fake_run(tmp_path, "n12_digits", model_name="xcit_nano_12_p16", qkv="fsne_m8", top1=0.99)  # not ImageNet
    card = card_of(tmp_path)
    wide = claim_row(card, "XCiT-N12/16 ImageNet-1k top-1, F-SNE at 3.1M")
    assert wide[1:3] == ["69.9 -> 71.4", f"{paper_card.ARXIV}; {paper_card.JOURNAL}"]
    assert wide[3] == "measured: 71.2 (fsne_m8_wide, 1.23M)"
    assert claim_row(card, "XCiT-N12/16 ImageNet-1k top-1 with XCiT's linear")[3] == "measured: 70.0 (linear, 3.05M)"
    for claim in ("XCiT-T12/16", "XCiT-S12/16", "N12 fine-tuned", "out-of-distribution", "code size 8"):
        assert claim_row(card, claim)[3] == "not yet measured", claim
    assert claim_row(card, "F-SNE's learned codes")[2] == paper_card.SUMMARY


def test_ood_claim_reads_the_auroc_difference_and_runs_show_their_evaluation(tmp_path):
    for name, qkv, auroc in (("linear", "linear", 0.60), ("fsne", "fsne_m8", 0.65)):
        workdir = fake_run(tmp_path, name, model_name="xcit_nano_12_p16", qkv=qkv, top1=0.9)
        evaluation = {
            "splits": {"test": {"top1": 0.9, "top5": 1.0, "ece": 0.05, "count": 360}},
            "ood": {"digits:test": {"count": 360, "msp": {"auroc": auroc}, "energy": {"auroc": auroc - 0.1}}},
            "corruptions": {"data": "image_folder:c/{corruption}/{severity}:test", "mean_error": 0.25, "mce": 0.9},
        }
        (workdir / "evaluation.json").write_text(json.dumps(evaluation))
    card = card_of(tmp_path)
    assert claim_row(card, "out-of-distribution")[3] == (
        "measured: fsne_m8 vs linear on digits, OOD digits:test: AUROC msp +0.050, energy +0.050"
    )
    assert "- OOD digits:test (360 examples), AUROC: msp 0.650, energy 0.550" in card
    assert "- corruptions (image_folder:c/{corruption}/{severity}:test): mean error 25.00%, mCE 0.900" in card
    gflops = count_macs(models.create("xcit_nano_12_p16", qkv="fsne_m8"), 32) / 1e9  # the fake records 1000 classes
    assert f"digits, xcit_nano_12_p16, fsne_m8: 1,234,567 parameters, {gflops:.3f} GFLOPs" in card


def test_a_run_is_named_by_its_preset_whatever_form_its_hidden_width_takes(tmp_path):
    workdir = fake_run(tmp_path, "fsne_default_h", model_name="xcit_nano_12_p16", qkv="fsne_m8", top1=0.9)
    model = json.loads((workdir / "model.json").read_text())
    model["architecture"]["qkv_hidden_dim"] = None  # h = d, as a config that leaves it unset records it
    (workdir / "model.json").write_text(json.dumps(model))
    assert paper_card.RunFacts(results.read_run(workdir), 1, 0.0, None, None).qkv == "fsne_m8"
