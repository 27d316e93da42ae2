"""PyTorch weight import: every mismatch is named, nothing loads partially, the CLI writes a usable checkpoint."""

import builtins
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import require_fixtures
from qkv_vit import models
from qkv_vit.convert import (
    WeightMismatchError,
    infer_architecture,
    load_pytorch_weights,
    read_state_dict,
)
from qkv_vit.convert.__main__ import main as convert_main
from qkv_vit.convert.__main__ import parse_args, resolve_architecture
from qkv_vit.models import XCiT
from qkv_vit.tree import flatten
from qkv_vit.weights import read_weights

NAME = "xcit_p8_d2_img64"


@pytest.fixture
def fixture_weights():
    return load_file(str(require_fixtures() / f"{NAME}.safetensors"))


@pytest.fixture
def fixture_model():
    config = json.loads(str(np.load(require_fixtures() / f"{NAME}.npz")["config"]))
    config.pop("img_size")
    return XCiT(**config)


def write(tmp_path, weights, name="edited.safetensors"):
    path = tmp_path / name
    save_file(weights, str(path))
    return path


def test_infer_architecture(fixture_weights):
    assert infer_architecture(fixture_weights) == dict(
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        cls_attn_layers=2,
        num_classes=10,
        use_pos_embed=True,
    )


def test_official_layout_is_rewritten_to_timm_keys():
    pytest.importorskip("torch", reason="reading .pth needs the torch extra")
    official = read_state_dict(require_fixtures() / f"{NAME}.official.pth")
    timm = load_file(str(require_fixtures() / f"{NAME}.safetensors"))
    assert sorted(official) == sorted(timm)
    for key in timm:
        np.testing.assert_array_equal(official[key], timm[key])


def test_missing_key_is_named(tmp_path, fixture_weights, fixture_model):
    del fixture_weights["blocks.1.attn.qkv.weight"]
    with pytest.raises(WeightMismatchError, match=r"1 model variables missing[\s\S]*params/blocks_1/attn/qkv/kernel"):
        load_pytorch_weights(write(tmp_path, fixture_weights), fixture_model)


def test_unexpected_key_is_named(tmp_path, fixture_weights, fixture_model):
    fixture_weights["blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightMismatchError, match=r"1 unexpected keys[\s\S]*blocks.0.attn.extra.weight"):
        load_pytorch_weights(write(tmp_path, fixture_weights), fixture_model)


def test_wrong_shape_is_named(tmp_path, fixture_weights, fixture_model):
    fixture_weights["head.weight"] = np.zeros((11, 48), np.float32)
    fixture_weights["head.bias"] = np.zeros((11,), np.float32)
    with pytest.raises(
        WeightMismatchError, match=r"2 shape mismatches[\s\S]*head.bias \(11,\) \(model wants \(10,\)\)"
    ):
        load_pytorch_weights(write(tmp_path, fixture_weights), fixture_model)


def test_checkpoint_of_another_architecture_is_refused():
    other = models.create("xcit_nano_12_p8", num_classes=10)
    with pytest.raises(WeightMismatchError, match=r"The file holds XCiT\(patch_size=8, embed_dim=48, depth=2"):
        load_pytorch_weights(require_fixtures() / f"{NAME}.safetensors", other)


def test_non_xcit_weights_are_refused_saying_what_was_found_and_expected(tmp_path):
    vit_like = {
        "pos_embed": np.zeros((1, 197, 32), np.float32),
        "blocks.0.attn.qkv.weight": np.zeros((96, 32), np.float32),
    }
    with pytest.raises(
        ValueError,
        match=r"edited.safetensors is not an XCiT checkpoint: expected .*cls_token and "
        r"blocks.0.attn.temperature.* top-level keys are \[blocks.0.attn.qkv.weight, "
        r"pos_embed\] \(2 in all\)",
    ):
        load_pytorch_weights(write(tmp_path, vit_like))


@pytest.mark.parametrize(
    "prefix",
    [
        "module.",
        "_orig_mod.",
        "module._orig_mod.",
        "_orig_mod.module.",
        "model.",
        "model._orig_mod.",
        "module.backbone.",
    ],
)
def test_weights_of_a_wrapped_model_load_like_the_bare_ones(tmp_path, fixture_weights, fixture_model, prefix):
    """DDP (`module.`), torch.compile (`_orig_mod.`), in any order, and an outer model's attribute (`model.`)."""
    bare = load_pytorch_weights(write(tmp_path, fixture_weights, "bare.safetensors"), fixture_model)
    wrapped = load_pytorch_weights(write(tmp_path, {prefix + k: v for k, v in fixture_weights.items()}), fixture_model)
    assert flatten(wrapped).keys() == flatten(bare).keys()
    for key, value in flatten(bare).items():
        np.testing.assert_array_equal(flatten(wrapped)[key], value)


def test_an_outer_prefix_is_kept_when_not_every_key_has_it(tmp_path, fixture_weights, fixture_model):
    """Another module's weights beside the model's are not silently dropped: they are named as unexpected."""
    weights = {**{"model." + k: v for k, v in fixture_weights.items()}, "criterion.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="not an XCiT checkpoint"):
        load_pytorch_weights(write(tmp_path, weights), fixture_model)


def test_training_checkpoint_dicts_are_unwrapped_and_non_xcit_ones_name_their_top_level_keys(
    tmp_path, fixture_weights, fixture_model
):
    torch = pytest.importorskip("torch", reason="reading .pth needs the torch extra")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in fixture_weights.items()}
    for container in ("state_dict", "model_state_dict", "module"):
        torch.save(
            {"epoch": 3, container: {"model._orig_mod." + k: v for k, v in tensors.items()}},
            tmp_path / f"{container}.pth",
        )
        loaded = read_state_dict(tmp_path / f"{container}.pth")
        assert sorted(loaded) == sorted(fixture_weights)
    torch.save({"epoch": 3, "optimizer": {}, "net": {"conv1.weight": torch.zeros(8, 3, 7, 7)}}, tmp_path / "resnet.pth")
    with pytest.raises(
        ValueError,
        match=r"resnet.pth is not an XCiT checkpoint: .*top-level keys are \[epoch, "
        r"optimizer, net\] \(3 in all\)",
    ):
        read_state_dict(tmp_path / "resnet.pth")


def test_files_that_cannot_be_read_as_weights_are_one_error_each(tmp_path, fixture_weights, fixture_model):
    torch = pytest.importorskip("torch", reason="reading .pth needs the torch extra")
    import pathlib

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole model, not its state dict
    (tmp_path / "cut.pth").write_bytes((tmp_path / "module.pth").read_bytes()[:100])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name, message in [
        (
            "module.pth",
            r"cannot be read as PyTorch weights without running code it holds \("
            r"UnpicklingError: .*torch.save\(model.state_dict\(\)",
        ),
        ("cut.pth", "cannot be read as PyTorch weights"),
        ("empty.safetensors", r"cannot be read as a .safetensors file \(SafetensorError"),
    ]:
        with pytest.raises(ValueError, match=message) as raised:
            read_state_dict(tmp_path / name)
        assert "\x1b[" not in str(raised.value)  # no terminal colour codes from the library's message
    # A Lightning checkpoint keeps paths in its hyper-parameters: they are no reason to refuse its weights.
    tensors = {"model." + k: torch.from_numpy(v.copy()) for k, v in fixture_weights.items()}
    torch.save(
        {"state_dict": tensors, "hyper_parameters": {"data_dir": pathlib.PosixPath("/data")}},
        tmp_path / "lightning.ckpt",
    )
    assert sorted(read_state_dict(tmp_path / "lightning.ckpt")) == sorted(fixture_weights)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="Unsupported weights file weights.h5"):
        read_state_dict(path)


def test_pth_without_torch_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"needs PyTorch[\s\S]*pip install -e \"\.\[torch\]\""):
        read_state_dict(require_fixtures() / f"{NAME}.official.pth")


def test_cli_writes_an_orbax_checkpoint_that_reproduces_the_reference(tmp_path, capsys):
    fixtures = require_fixtures()
    source = fixtures / "xcit_p16_d3_img96_tokensnorm.safetensors"
    assert convert_main([str(source), str(tmp_path / "out"), "--tokens-norm"]) == 0
    converted = read_weights(tmp_path / "out")
    assert converted.architecture["tokens_norm"] is True and converted.architecture["num_classes"] == 7
    assert converted.architecture["dtype"] == "float32"  # JSON: the dtype by name
    fixture = np.load(fixtures / "xcit_p16_d3_img96_tokensnorm.npz")
    logits = models.from_architecture(models.architecture_from_json(converted.architecture)).apply(
        converted.variables, fixture["images"]
    )
    assert np.abs(np.asarray(logits) - fixture["logits"]).max() < 1e-4


def test_cli_refuses_weights_of_another_named_model(tmp_path, capsys):
    source = require_fixtures() / f"{NAME}.safetensors"
    assert convert_main([str(source), str(tmp_path / "out"), "--model", "xcit_tiny_12_p8"]) == 2
    assert "does not fit XCiT(patch_size=8, embed_dim=192" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert convert_main([str(require_fixtures() / f"{NAME}.safetensors"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_recognizes_a_named_model(capsys):
    inferred = dict(
        patch_size=8,
        embed_dim=128,
        depth=12,
        num_heads=4,
        mlp_ratio=4.0,
        cls_attn_layers=2,
        num_classes=10,
        use_pos_embed=True,
    )
    config = resolve_architecture(parse_args(["src.pth", "dst"]), inferred)
    assert "Weights match xcit_nano_12_p8" in capsys.readouterr().out
    assert config == models.architecture("xcit_nano_12_p8", num_classes=10)
    tiny_12 = resolve_architecture(parse_args(["src.pth", "dst"]), {**inferred, "embed_dim": 192})
    assert tiny_12["tokens_norm"] is True  # read from the named model, not from the weights
