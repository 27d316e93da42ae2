"""Our XCiT with imported weights computes what the reference (timm) computes, for every weights layout."""

import json

import numpy as np
import pytest

from conftest import FIXTURE_NAMES, require_fixtures
from qkv_vit import models
from qkv_vit.convert import load_pytorch_weights

TOLERANCE = 1e-4  # max absolute difference in float32


def load_fixture(name, layer_impl="auto"):
    fixture = np.load(require_fixtures() / f"{name}.npz")
    config = json.loads(str(fixture["config"]))
    config.pop("img_size")  # any size divisible by the patch works
    return models.from_architecture({**config, "layer_impl": layer_impl}), fixture


def timm_layout_pth(name, tmp_path):
    """The safetensors weights saved with torch.save, as timm users have them."""
    torch = pytest.importorskip("torch", reason="the .pth layouts need the torch extra: pip install -e '.[torch]'")
    from safetensors.torch import load_file

    path = tmp_path / f"{name}.timm.pth"
    torch.save(load_file(str(require_fixtures() / f"{name}.safetensors")), path)
    return path


def weights_path(name, layout, tmp_path):
    if layout == "safetensors":
        return require_fixtures() / f"{name}.safetensors"
    if layout == "official_pth":
        pytest.importorskip("torch", reason="the .pth layouts need the torch extra: pip install -e '.[torch]'")
        return require_fixtures() / f"{name}.official.pth"
    return timm_layout_pth(name, tmp_path)


@pytest.mark.parametrize("layout", ["safetensors", "official_pth", "timm_pth"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_and_pre_logits_match_reference(name, layout, tmp_path):
    model, fixture = load_fixture(name)
    variables = load_pytorch_weights(weights_path(name, layout, tmp_path), model)
    logits = model.apply(variables, fixture["images"])
    pre_logits = model.apply(variables, fixture["images"], method="pre_logits")
    assert np.abs(np.asarray(logits) - fixture["logits"]).max() < TOLERANCE
    assert np.abs(np.asarray(pre_logits) - fixture["pre_logits"]).max() < TOLERANCE


@pytest.mark.parametrize("layer_impl", ["flax", "cpu"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_both_layer_implementations_match_reference(name, layer_impl):
    """The standard flax layers (GPU/TPU) and the CPU kernels load the same weights and compute the reference."""
    model, fixture = load_fixture(name, layer_impl)
    variables = load_pytorch_weights(require_fixtures() / f"{name}.safetensors", model)
    assert np.abs(np.asarray(model.apply(variables, fixture["images"])) - fixture["logits"]).max() < TOLERANCE
    pre_logits = model.apply(variables, fixture["images"], method="pre_logits")
    assert np.abs(np.asarray(pre_logits) - fixture["pre_logits"]).max() < TOLERANCE


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inferred_architecture_matches_fixture(name):
    model, fixture = load_fixture(name)
    variables = load_pytorch_weights(require_fixtures() / f"{name}.safetensors")  # no model given
    np.testing.assert_allclose(model.apply(variables, fixture["images"]), fixture["logits"], atol=TOLERANCE)


def test_fixtures_detect_a_wrong_model():
    """The fixture is sensitive: with 2 class-attention layers, flipping tokens_norm changes the logits."""
    model, fixture = load_fixture("xcit_p8_d2_img64")
    variables = load_pytorch_weights(require_fixtures() / "xcit_p8_d2_img64.safetensors", model)
    wrong = model.clone(tokens_norm=True)
    assert np.abs(np.asarray(wrong.apply(variables, fixture["images"])) - fixture["logits"]).max() > TOLERANCE
