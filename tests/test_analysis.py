"""Code analysis: norms and cosines on codes with known geometry, the 2-D map, files written, checkpoints read."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from qkv_vit import models
from qkv_vit.analysis import analyze_codes, code_statistics, collect_codes, embed_2d
from qkv_vit.analysis.__main__ import main as analysis_main
from qkv_vit.weights import read_weights, save_converted


def params_with_codes(codes_by_layer):
    return {
        layer: {"attn": {"qkv": {"codes": np.asarray(c, np.float32), "hidden_bias": np.zeros(2)}}}
        for layer, c in codes_by_layer.items()
    }


ORTHOGONAL = [[3.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 5.0]]
COLLINEAR = [[1.0, 1, 0, 0], [2.0, 2, 0, 0], [-1.0, -1, 0, 0]]


def test_collects_codes_in_layer_order():
    params = params_with_codes({"cls_attn_blocks_0": ORTHOGONAL, "blocks_10": ORTHOGONAL, "blocks_2": COLLINEAR})
    assert list(collect_codes(params)) == ["blocks_2", "blocks_10", "cls_attn_blocks_0"]


def test_norms_and_cosines_on_known_codes():
    stats = code_statistics(collect_codes(params_with_codes({"blocks_0": ORTHOGONAL, "blocks_1": COLLINEAR})))
    assert stats["layers"]["blocks_0"]["norm"] == pytest.approx({"q": 3.0, "k": 4.0, "v": 5.0})
    assert stats["layers"]["blocks_0"]["cosine"] == pytest.approx({"qk": 0.0, "qv": 0.0, "kv": 0.0})
    assert stats["layers"]["blocks_1"]["cosine"] == pytest.approx({"qk": 1.0, "qv": -1.0, "kv": -1.0})
    assert stats["max_abs_cosine"] == pytest.approx(1.0) and stats["mean_abs_cosine"] == pytest.approx(0.5)
    assert stats["code_size"] == 4


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_2d_embedding_of_every_code(method):
    rng = np.random.default_rng(0)
    codes = collect_codes(params_with_codes({f"blocks_{i}": rng.normal(size=(3, 8)) for i in range(12)}))
    points = embed_2d(codes, method)
    assert points.shape == (36, 2) and np.isfinite(points).all()
    np.testing.assert_allclose(points, embed_2d(codes, method))  # deterministic


def test_pca_keeps_the_main_direction():
    codes = {"blocks_0": np.array([[10.0, 0, 0], [-10.0, 0, 0], [0, 0.1, 0]])}
    points = embed_2d(codes, "pca")
    assert abs(points[0, 0] - points[1, 0]) == pytest.approx(20.0, rel=1e-6)


def test_model_without_codes_is_a_clear_error():
    with pytest.raises(ValueError, match="does not use F-SNE"):
        collect_codes({"blocks_0": {"attn": {"qkv": {"kernel": np.zeros((2, 6))}}}})


@pytest.fixture(scope="module")
def fsne_params():
    model = models.create("xcit_nano_12_p16", qkv="fsne_m8", depth=3, num_classes=10)
    return jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)), model


def test_report_files(tmp_path, fsne_params):
    variables, _ = fsne_params
    stats = analyze_codes(variables["params"], tmp_path, method="pca")
    written = json.loads((tmp_path / "codes.json").read_text())
    assert list(written["layers"]) == ["blocks_0", "blocks_1", "blocks_2"] == list(stats["layers"])
    assert len(written["embedding"]["points"]) == 9
    for plot in ("code_norms.png", "code_cosines.png", "code_embedding.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_reads_converted_weights_and_checkpoint_manager_dirs(tmp_path, fsne_params):
    variables, model = fsne_params
    save_converted(tmp_path / "converted", variables, {"embed_dim": 128})
    manager = ocp.CheckpointManager(tmp_path / "run")
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": variables["params"], "step": 7})))
    manager.wait_until_finished()
    expected = variables["params"]["blocks_1"]["attn"]["qkv"]["codes"]
    for directory in ("converted", "run"):
        codes = read_weights(tmp_path / directory).variables["params"]["blocks_1"]["attn"]["qkv"]["codes"]
        np.testing.assert_array_equal(codes, expected)


def test_command(tmp_path, fsne_params, capsys):
    variables, _ = fsne_params
    save_converted(tmp_path / "converted", variables, {"embed_dim": 128})
    assert analysis_main([str(tmp_path / "converted"), "--out", str(tmp_path / "report")]) == 0
    assert "3 layers of codes (m=8)" in capsys.readouterr().out
    assert (tmp_path / "report" / "code_embedding.png").is_file()
    assert analysis_main([str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
