"""Evaluation metrics (qkv_vit.evaluate): classification metrics, class subsets, OOD scores and detection metrics,
against hand-computed cases, scikit-learn and NumPy."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from sklearn import metrics as sk

from conftest import REPO, fake_devices, load_config
from qkv_vit import data, models
from qkv_vit.data.testing import write_image_folder
from qkv_vit.errors import ConfigError
from qkv_vit.evaluate.evaluation import Corruptions, build_model, evaluate
from qkv_vit.metrics import classification, corruption, ood
from qkv_vit.train import sharding, train_and_evaluate
from qkv_vit.train.config import check_config
from qkv_vit.train.evaluators import DataSpec, SplitEvaluator
from qkv_vit.train.logging_utils import read_metrics
from qkv_vit.weights import read_weights


def test_classification_metrics_by_hand():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [2.0, 2.5, 0.0]])
    labels = np.array([0, 2, 2, 0])
    found = classification.classification_metrics(classification.outcomes(logits, labels), ["a", "b", "c"])
    assert found["count"] == 4 and found["top1"] == 0.5 and found["top5"] == 1.0  # top-3 of 3 classes
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert found["loss"] == pytest.approx(-np.mean(log_probs[np.arange(4), labels]))
    assert found["per_class"] == {"a": {"count": 2, "top1": 0.5}, "c": {"count": 2, "top1": 0.5}}
    assert "real_top1" not in found  # no label sets
    # Label sets, -1 padded: example 1 (top-1 class 1) has {1, 2}, example 3 has none and is left out.
    sets = np.array([[0, -1], [1, 2], [0, -1], [-1, -1]])
    relabelled = classification.classification_metrics(classification.outcomes(logits, labels, sets), "abc")
    assert (relabelled["real_top1"], relabelled["real_count"]) == (2 / 3, 3)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
        classification.outcomes(logits, np.array([0, 1, 2, 3]))


def test_expected_calibration_error_by_hand():
    # Bins of width 0.5: (0, 0.5] holds 0.3 (wrong) and 0.5 (right); (0.5, 1] holds 0.9 and 1.0 (both right).
    confidence = np.array([0.3, 0.5, 0.9, 1.0])
    correct = np.array([0, 1, 1, 1])
    expected = 2 / 4 * abs(0.5 - 0.4) + 2 / 4 * abs(1.0 - 0.95)
    assert classification.expected_calibration_error(confidence, correct, bins=2) == pytest.approx(expected)
    assert classification.expected_calibration_error(np.ones(3), np.ones(3)) == 0.0


def test_a_class_subset_restricts_the_logits_to_the_datas_classes():
    """A synthetic 3-of-10-class split (as ImageNet-A / -R's 200 of 1,000): argmax over the 3 classes only."""
    model_classes = [f"n{c:02d}" for c in range(10)]
    subset = classification.class_subset(["n07", "n02", "n09"], model_classes)
    assert subset.tolist() == [7, 2, 9]
    logits = np.zeros((2, 10))
    logits[0, [7, 5]] = [1.0, 9.0]  # class 5 is not in the data: its logit must not win
    logits[1, [2, 9]] = [1.0, 2.0]
    found = classification.classification_metrics(
        classification.outcomes(classification.restrict(logits, subset), [0, 2]), "abc"
    )
    assert found["top1"] == 1.0
    assert classification.class_subset(model_classes, model_classes) is None
    with pytest.raises(ValueError, match="1 of the data's 2 classes are not classes of the model"):
        classification.class_subset(["n01", "cat"], model_classes)


def test_detection_metrics_by_hand():
    inside, outside = np.array([0.9, 0.8, 0.4]), np.array([0.5, 0.1])
    found = ood.detection_metrics(inside, outside)
    assert found["auroc"] == pytest.approx(5 / 6)  # 5 of the 6 (in, out) pairs ordered; 0.4 < 0.5
    assert found["fpr95"] == 0.5  # keeping all 3 in-distribution examples (threshold 0.4) keeps 0.5
    # In as positives, highest first: 0.9 (P 1), 0.8 (P 1), 0.5, 0.4 (R 1, P 3/4): 1/3 + 1/3 + 1/3 x 3/4.
    assert found["aupr_in"] == pytest.approx(2 / 3 + 1 / 4)
    tied = ood.detection_metrics(np.array([1.0, 1.0]), np.array([1.0, 0.0]))
    assert tied["auroc"] == pytest.approx(0.75)  # ties count half


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    inside = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounded: many ties
    outside = np.round(rng.normal(0.0, 1.0, 200), 1)
    found = ood.detection_metrics(inside, outside)
    truth = np.r_[np.ones(300), np.zeros(200)]
    scores = np.r_[inside, outside]
    assert found["auroc"] == pytest.approx(sk.roc_auc_score(truth, scores), abs=1e-12)
    assert found["aupr_in"] == pytest.approx(sk.average_precision_score(truth, scores), abs=1e-12)
    assert found["aupr_out"] == pytest.approx(sk.average_precision_score(1 - truth, -scores), abs=1e-12)
    fpr, tpr, _ = sk.roc_curve(truth, scores)
    assert found["fpr95"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")], abs=1e-12)


def test_logit_scores():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    found = ood.scores(logits)
    assert found["msp"] == pytest.approx([np.exp(2) / (np.exp(2) + 1), 0.5])
    assert found["max_logit"].tolist() == [2.0, 0.0]
    assert found["energy"] == pytest.approx([np.log(np.exp(2) + 1), np.log(2)])
    assert "mahalanobis" not in found


def test_mahalanobis_equals_a_numpy_computation():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    features[labels == 1] += 2.0
    statistics = ood.ClassStatistics(num_classes=3, dim=4)
    for part in np.array_split(np.arange(60), 7):  # batch by batch, as over a split
        statistics.add(features[part], labels[part])
    means, precision = statistics.fitted()
    expected_means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centered = features - expected_means[labels]
    np.testing.assert_allclose(means, expected_means, atol=1e-12)
    np.testing.assert_allclose(precision, np.linalg.inv(centered.T @ centered / 60), rtol=1e-9)
    queries = rng.normal(size=(5, 4))
    expected = [
        -min((q - m) @ np.linalg.inv(centered.T @ centered / 60) @ (q - m) for m in expected_means) for q in queries
    ]
    np.testing.assert_allclose(ood.scores(np.zeros((5, 3)), queries, (means, precision))["mahalanobis"], expected)
    with pytest.raises(ValueError, match=r"Classes \[2\] have no train examples"):
        empty = ood.ClassStatistics(num_classes=3, dim=4)
        empty.add(features[labels < 2], labels[labels < 2])
        empty.fitted()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    """A tiny quickstart run (8 steps), and its config."""
    config = load_config("quickstart", "runlocal")
    config.model.update(embed_dim=32, depth=1, num_heads=4)
    config.data.cache_dir = str(data_cache)
    config.async_checkpointing = False
    config.total_steps = 8
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, workdir)
    return workdir, config


@pytest.mark.slow  # trains a run
def image_folder(root, class_names, per_class: int):
    """ROOT/test/<class>/*.png (data.testing's flat-colour images), the folder."""
    write_image_folder(root, {"test": {name: per_class for name in class_names}})
    return root


def test_evaluating_a_run_gives_the_trainers_final_evaluation_over_every_example_once(trained_run, tmp_path):
    workdir, config = trained_run
    noise = image_folder(tmp_path / "noise", [f"class_{c:02d}" for c in range(12)], 3)  # more than the model's 10
    ood_data = [DataSpec.parse("digits:"), DataSpec.parse(f"image_folder:{noise}:test")]
    result = evaluate(str(workdir), config, ["test", "train"], ood_data=ood_data)
    final = [m for m in read_metrics(workdir) if "val/top1" in m][-1]
    test = result["splits"]["test"]
    assert test["count"] == 360 and 360 % config.eval_batch_size  # the last batch is padded, and masked
    assert test["top1"] == pytest.approx(final["val/top1"], abs=1e-6)
    assert test["loss"] == pytest.approx(final["val/loss"], abs=1e-4)
    assert sum(c["count"] for c in test["per_class"].values()) == 360 and len(test["per_class"]) == 10
    assert result["splits"]["train"]["count"] == 1437
    # The digits' test split against itself: no score can tell them apart.
    digits = result["ood"]["digits"]
    assert digits["count"] == 360 and set(digits) == {"count", *ood.SCORES}
    for score in ood.SCORES:
        assert digits[score]["auroc"] == pytest.approx(0.5)
    assert result["ood"][f"image_folder:{noise}:test"]["count"] == 36  # scored; its labels are never read


@pytest.mark.slow
def test_the_evaluate_command_on_four_devices_writes_json_and_refuses_bad_input_in_one_line(trained_run, tmp_path):
    workdir, config = trained_run
    command = [
        sys.executable, "-m", "qkv_vit.evaluate", str(workdir), "--config=configs/quickstart.py:runlocal",
        f"--config.data.cache_dir={config.data.cache_dir}", f"--output={tmp_path / 'result.json'}",
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    four_devices = {**env, **fake_devices(4)}  # batches split over them
    done = subprocess.run(command, cwd=REPO, env=four_devices, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    final = [m for m in read_metrics(workdir) if "val/top1" in m][-1]
    assert result["splits"]["test"]["count"] == 360 and "test: top1" in done.stderr
    assert result["splits"]["test"]["top1"] == pytest.approx(final["val/top1"], abs=1e-6)
    bad = subprocess.run([*command, "--ood=svhn"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    message = "error: Data 'svhn': start it with one of the sources digits, tfds, image_folder"
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    missing = subprocess.run(
        [*command[:3], str(tmp_path / "nothing"), *command[4:]], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "error: " in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("qkv", ["linear", "fsne_m8"])
def test_attention_maps_sum_to_one_and_capturing_changes_no_logit(qkv):
    model = models.create(
        "xcit_nano_12_p16", qkv=qkv, embed_dim=32, depth=2, num_heads=4, cls_attn_layers=2, num_classes=5
    )
    images = jax.random.uniform(jax.random.key(0), (2, 48, 32, 3))  # a 3 x 2 token grid
    variables = model.init(jax.random.key(1), images)
    logits, found = models.capture(model, variables, images)
    np.testing.assert_array_equal(logits, model.apply(variables, images))
    assert [a.shape for a in found.xca_attention] == [(2, 4, 8, 8)] * 2  # (B, heads, C/h, C/h)
    assert [a.shape for a in found.class_attention] == [(2, 4, 1, 7)] * 2  # the class token and 6 patch tokens
    assert [b.shape for b in found.blocks] == [(2, 6, 32)] * 2
    for maps in (*found.xca_attention, *found.class_attention):
        np.testing.assert_allclose(np.asarray(maps).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(found.pre_logits, model.apply(variables, images, method=model.pre_logits))


@pytest.mark.slow  # trains a run
def test_periodic_evaluators_run_at_their_interval_and_at_the_end(tmp_path, tiny_config):
    config = tiny_config
    config.total_steps = 4
    config.evaluators.ood = dict(type="ood", every_steps=2, data="digits:test", mahalanobis=True)
    config.evaluators.on_train = dict(type="classification", every_steps=0, split="train")
    train_and_evaluate(config, tmp_path)
    records = read_metrics(tmp_path)
    ood_steps = [m["step"] for m in records if "ood/msp_auroc" in m]
    assert ood_steps == [2, 4] and [m["step"] for m in records if "on_train/top1" in m] == [4]
    final = [m for m in records if "ood/mahalanobis_auroc" in m][-1]
    assert final["ood/mahalanobis_auroc"] == pytest.approx(0.5)  # the digits' test split against itself
    on_train = [m for m in records if "on_train/top1" in m][-1]
    result = evaluate(str(tmp_path), config, ["train"])["splits"]["train"]
    assert on_train["on_train/count"] == result["count"] == 1437
    assert on_train["on_train/top1"] == pytest.approx(result["top1"], abs=1e-6)
    assert records[-1]["step"] == 4 and "val/top1" in records[-1]  # the eval split last: the run's end


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("x", dict(type="oops"), "config.evaluators.x.type must be one of ['classification', 'ood']"),
        ("x", dict(type="classification", every_steps=1), "config.evaluators.x lacks split"),
        ("x", dict(type="ood", every_steps=1, data="svhn", mahalanobis=False), "Data 'svhn'"),
        ("val", dict(type="classification", every_steps=1, split="train"), "written under val/"),
        ("a/b", dict(type="classification", every_steps=1, split="train"), "config.evaluators.a/b (a name)"),
    ],
)
def test_a_bad_evaluator_is_one_config_error(tiny_config, name, options, message):
    tiny_config.evaluators[name] = options
    with pytest.raises(ConfigError) as error:
        check_config(tiny_config)
    assert message in str(error.value)


def test_corruption_errors_by_hand():
    errors = {"noise": {"1": 0.2, "2": 0.4}, "blur": {"1": 0.1, "2": 0.3}}
    baseline = {"noise": {"1": 0.3, "2": 0.5}, "blur": {"1": 0.2, "2": 0.2}}
    found = corruption.summary(errors, baseline)
    assert found["mean_error"] == pytest.approx(0.25)
    assert found["error"] == pytest.approx({"noise": 0.3, "blur": 0.2})
    assert found["ce"] == pytest.approx({"noise": 0.6 / 0.8, "blur": 0.4 / 0.4})
    assert found["mce"] == pytest.approx((0.75 + 1.0) / 2)
    with pytest.raises(ValueError, match="The baseline has no error for noise 2"):
        corruption.summary(errors, {"noise": {"1": 0.3}, "blur": baseline["blur"]})


@pytest.mark.slow  # uses a trained run
def test_corruptions_are_evaluated_per_corruption_and_severity_against_a_baseline(trained_run, tmp_path):
    workdir, config = trained_run
    for name in ("noise", "blur"):
        for severity in (1, 2):
            image_folder(tmp_path / name / str(severity), [str(d) for d in range(10)], 2)  # the digits' class names
    suite = Corruptions(f"image_folder:{tmp_path}/{{corruption}}/{{severity}}:test", ("noise", "blur"), (1, 2))
    found = evaluate(str(workdir), config, corruptions=suite)["corruptions"]
    assert set(found["errors"]) == {"noise", "blur"} and set(found["errors"]["noise"]) == {"1", "2"}
    assert all(0.0 <= e <= 1.0 and e * 20 == pytest.approx(round(e * 20)) for e in found["errors"]["blur"].values())
    against_itself = Corruptions(suite.template, suite.names, suite.severities, baseline=found)
    compared = evaluate(str(workdir), config, corruptions=against_itself)["corruptions"]
    assert compared["mce"] == pytest.approx(1.0) and compared["ce"] == pytest.approx({"noise": 1.0, "blur": 1.0})


@pytest.mark.slow  # uses a trained run
def test_an_evaluator_compiles_its_forward_pass_once(trained_run):
    workdir, config = trained_run
    weights = read_weights(workdir)
    model = build_model(weights, config, "cpu")
    evaluator = SplitEvaluator(model, config.data, 16, sharding.make_mesh({"data": -1}, jax.devices()))
    source = data.open_source(config.data)
    for _ in range(2):  # as a periodic evaluator does at every interval
        evaluator.split(weights.variables, source, "test")
    dataclasses.replace(evaluator, subset=None).split(weights.variables, source, "test")  # a corrupted set's copy
    assert evaluator.step._cache_size() == 1


class FakeReal(tfds.core.GeneratorBasedBuilder):
    """30 of the digits' test images with ReaL-style label sets: none, the label, or the label and the next class."""

    VERSION = tfds.core.Version("1.0.0")

    @classmethod
    def _get_pkg_dir_path(cls):  # tfds looks for metadata beside the builder's package; a test module is none
        return epath.Path(__file__).parent

    def _info(self):
        names = [str(d) for d in range(10)]
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=names),
                    "real_label": tfds.features.Sequence(tfds.features.ClassLabel(names=names)),
                }
            )
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for i in range(30):
            label = int(digits.target[i])
            real = [[], [label], [label, (label + 1) % 10]][i % 3]
            yield i, {"image": images[i], "label": label, "real_label": real}


@pytest.mark.slow  # uses a trained run
def test_relabelled_examples_count_when_the_top1_is_any_of_their_labels(trained_run, tmp_path):
    workdir, config = trained_run
    FakeReal(data_dir=str(tmp_path)).download_and_prepare()
    config = config.copy_and_resolve_references()
    config.data.update(source="tfds", name="fake_real", data_dir=str(tmp_path), train_split="test", eval_split="test")
    found = evaluate(str(workdir), config, ["test"])["splits"]["test"]
    weights = read_weights(workdir)
    model = build_model(weights, config, "cpu")
    evaluator = SplitEvaluator(model, config.data, 8, sharding.make_mesh({"data": -1}, jax.devices()))
    parts = list(evaluator.batches(weights.variables, data.open_source(config.data), "test"))
    top1 = np.concatenate([p.logits for p in parts]).argmax(axis=1)
    sets = np.concatenate([p.label_sets for p in parts])
    assert sorted((row >= 0).sum() for row in sets) == [0] * 10 + [1] * 10 + [2] * 10  # padded with -1
    relabelled = (sets >= 0).any(axis=1)
    expected = np.mean([top1[i] in sets[i] for i in np.flatnonzero(relabelled)])
    assert found["count"] == 30 and found["real_count"] == 20  # every third example has no ReaL label: left out
    assert found["real_top1"] == pytest.approx(expected)
    assert found["top1"] == pytest.approx(np.mean(top1 == np.concatenate([p.labels for p in parts])))


@pytest.mark.slow  # uses a trained run
def test_a_data_set_of_3_of_the_models_10_classes_is_evaluated_on_their_logits(trained_run, tmp_path):
    """As ImageNet-A / -R's 200 of 1,000 classes: the data's classes found among the model's by name."""
    workdir, config = trained_run
    folder = image_folder(tmp_path / "three", ["2", "5", "7"], 4)
    config = config.copy_and_resolve_references()
    config.data.update(source="image_folder", path=str(folder), train_split="test", eval_split="test")
    found = evaluate(str(workdir), config, ["test"])["splits"]["test"]
    weights = read_weights(workdir)
    model = build_model(weights, config, "cpu")
    evaluator = SplitEvaluator(model, config.data, 8, sharding.make_mesh({"data": -1}, jax.devices()))
    parts = list(evaluator.batches(weights.variables, data.open_source(config.data), "test"))
    logits, labels = np.concatenate([p.logits for p in parts]), np.concatenate([p.labels for p in parts])
    assert logits.shape == (12, 10) and sorted(set(labels.tolist())) == [0, 1, 2]
    assert found["count"] == 12 and set(found["per_class"]) == {"2", "5", "7"}
    assert found["top1"] == pytest.approx(np.mean(logits[:, [2, 5, 7]].argmax(axis=1) == labels))
    # The loss too is over the 3 classes: the softmax over all 10 would put mass on the 7 the data lack.
    masked = classification.log_softmax(logits[:, [2, 5, 7]])[np.arange(12), labels]
    unmasked = classification.log_softmax(logits)[np.arange(12), np.array([2, 5, 7])[labels]]
    assert found["loss"] == pytest.approx(-masked.mean()) and -unmasked.mean() > -masked.mean() + 1e-3
