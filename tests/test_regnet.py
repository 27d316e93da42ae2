"""The RegNet distillation teacher (qkv_vit/models/regnet.py) computes what timm 1.0.31's RegNet computes, and its
weight conversion (qkv_vit/convert/regnet.py, python -m qkv_vit.convert) takes timm's keys, all or nothing.

The fixtures under tests/fixtures/ come from timm with random weights (make_regnet_fixtures.py, run in an
environment with timm); timm itself is needed only by the live comparison at the end, skipped where it is absent.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qkv_vit.convert import regnet as regnet_convert
from qkv_vit.convert.__main__ import main as convert_main
from qkv_vit.convert.loading import WeightMismatchError
from qkv_vit.models import count_params, regnet
from qkv_vit.tree import flatten
from qkv_vit.weights import read_weights

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
WEIGHTS = FIXTURES / "regnety_test.safetensors"
REFERENCE = json.loads((FIXTURES / "regnet_timm_reference.json").read_text())


@pytest.fixture(scope="module")
def fixture():
    data = np.load(FIXTURES / "regnety_test.npz")
    return json.loads(str(data["config"])), data["images"], data["logits"]


@pytest.fixture(scope="module")
def variables():
    return regnet_convert.load_regnet_weights(WEIGHTS)


def test_fixture_config_is_regnety_test(fixture):
    config, _, _ = fixture
    cfg = regnet.REGNET_CONFIGS[config["name"]]
    assert {k: v for k, v in config.items() if k not in ("name", "num_classes")} == {
        k: getattr(cfg, k) for k in config if k not in ("name", "num_classes")
    }


def test_logits_match_timm(fixture, variables):
    config, images, logits = fixture
    model = regnet.create(config["name"], num_classes=config["num_classes"])
    out = model.apply(variables, images)
    assert out.dtype == jnp.float32 and out.shape == logits.shape
    np.testing.assert_allclose(np.asarray(out), logits, rtol=0, atol=1e-4)


def test_bfloat16_runs_and_stays_close(fixture, variables):
    config, images, logits = fixture
    model = regnet.create(config["name"], num_classes=config["num_classes"], dtype=jnp.bfloat16)
    out = np.asarray(model.apply(variables, images))
    assert out.dtype == np.float32
    assert np.abs(out - logits).max() < 0.02 * np.abs(logits).max()  # bfloat16 keeps 8 bits of mantissa
    np.testing.assert_array_equal(out.argmax(-1), logits.argmax(-1))


def test_training_mode_updates_batch_stats(fixture, variables):
    config, images, _ = fixture
    model = regnet.create(config["name"], num_classes=config["num_classes"])
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert out.shape == (len(images), config["num_classes"]) and np.isfinite(out).all()
    before, after = flatten(variables["batch_stats"]), flatten(updates["batch_stats"])
    assert before.keys() == after.keys() and not np.allclose(
        before[("stem", "bn", "mean")], after[("stem", "bn", "mean")]
    )


def timm_shapes(keys: dict[str, list[int]]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{flax path: flax shape} of timm keys, through the converter's own mapping (zero-stride views: nothing of
    regnety_160's 330 MB is allocated)."""
    return {
        regnet_convert.flax_path(key): regnet_convert.flax_array(key, np.broadcast_to(np.float32(0), shape)).shape
        for key, shape in keys.items()
        if not key.endswith("num_batches_tracked")
    }


def test_regnety_160_variables_are_timms_key_for_key():
    reference = REFERENCE["regnety_160"]
    model = regnet.create("regnety_160")
    abstract = regnet.init_shapes(model)  # jax.eval_shape: nothing allocated
    ours = {path: tuple(leaf.shape) for path, leaf in flatten(abstract).items()}
    assert ours == timm_shapes(reference["keys"])
    assert count_params(abstract["params"]) == reference["param_count"] == 83_590_140


def test_stage_widths_depths_and_groups_are_timms():
    """Our port of generate_regnet + adjust_widths_groups_comp against timm's _get_stage_args, every config."""
    assert set(REFERENCE["stage_args"]) == set(regnet.REGNET_CONFIGS) - {"regnety_test"}
    for name, stages in REFERENCE["stage_args"].items():
        ours = [
            dict(out_chs=s.width, depth=s.depth, group_size=s.group_size, bottle_ratio=s.bottle_ratio, stride=s.stride)
            for s in regnet.stage_specs(regnet.REGNET_CONFIGS[name])
        ]
        assert ours == stages, name


def test_architecture_round_trip_and_unknown_names():
    model = regnet.create("regnety_160", num_classes=7, dtype=jnp.bfloat16)
    architecture = regnet.architecture_of(model)
    assert architecture == {"family": "regnet", "name": "regnety_160", "num_classes": 7}
    assert json.loads(json.dumps(architecture)) == architecture
    rebuilt = regnet.from_architecture(architecture)
    assert (rebuilt.config_name, rebuilt.num_classes, rebuilt.dtype) == ("regnety_160", 7, jnp.float32)
    with pytest.raises(ValueError, match="Unknown RegNet 'regnety_161'"):
        regnet.create("regnety_161")
    with pytest.raises(ValueError, match="Not a RegNet architecture"):
        regnet.from_architecture({"patch_size": 16, "embed_dim": 128})


def test_inferred_architecture_and_headless_weights(variables):
    state_dict = regnet_convert.read_regnet_state_dict(WEIGHTS)
    assert regnet_convert.infer_regnet_architecture(state_dict) == {
        "family": "regnet",
        "name": "regnety_test",
        "num_classes": 10,
    }
    headless = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    model = regnet.create("regnety_test", num_classes=0)
    features = model.apply(regnet_convert.regnet_variables(headless, model), np.zeros((1, 32, 32, 3), np.float32))
    assert features.shape == (1, 40)


def test_wrapped_pth_checkpoint_loads_like_the_bare_weights(tmp_path, variables):
    torch = pytest.importorskip("torch")
    tensors = {f"module._orig_mod.{k}": torch.from_numpy(v.copy()) for k, v in load_file(str(WEIGHTS)).items()}
    torch.save({"model": tensors, "epoch": 3}, tmp_path / "regnety_test.pth")  # DeiT's {'model': ...} + DDP, compile
    loaded = regnet_convert.load_regnet_weights(tmp_path / "regnety_test.pth")
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables))


def test_mismatched_weights_name_every_key_and_load_nothing():
    state_dict = regnet_convert.read_regnet_state_dict(WEIGHTS)
    del state_dict["s4.b2.conv3.conv.weight"]
    state_dict["s1.b1.se.fc1.bias"] = np.zeros(3, np.float32)
    state_dict["s1.b1.extra.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(WeightMismatchError) as error:
        regnet_convert.regnet_variables(state_dict, regnet.create("regnety_test", num_classes=10))
    message = str(error.value)
    assert "s1.b1.extra.weight" in message and "params/s4/b2/conv3/conv/kernel" in message
    assert "s1.b1.se.fc1.bias (3,) (model wants (2,))" in message
    with pytest.raises(WeightMismatchError, match="The model is regnety_160 with 10 classes"):
        regnet_convert.regnet_variables(
            regnet_convert.read_regnet_state_dict(WEIGHTS), regnet.create("regnety_160", 10)
        )


def test_convert_command_writes_the_converters_arrays(tmp_path, capsys, variables):
    assert convert_main([str(WEIGHTS), str(tmp_path / "out")]) == 0
    assert "Weights match regnety_test" in capsys.readouterr().out
    written = read_weights(tmp_path / "out")
    assert written.architecture == {"family": "regnet", "name": "regnety_test", "num_classes": 10}
    assert flatten(written.variables).keys() == flatten(variables).keys()
    assert all(
        np.array_equal(np.asarray(written_leaf), flatten(variables)[path])
        for path, written_leaf in flatten(written.variables).items()
    )
    assert convert_main([str(WEIGHTS), str(tmp_path / "named"), "--model", "regnety_test"]) == 0


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_xcit_weights_named_as_a_regnet_are_refused(tmp_path, capsys):
    xcit = {"cls_token": np.zeros((1, 1, 8), np.float32), "blocks.0.attn.temperature": np.ones((2, 1, 1), np.float32)}
    save_file(xcit, str(tmp_path / "xcit.safetensors"))
    assert convert_main([str(tmp_path / "xcit.safetensors"), str(tmp_path / "out"), "--model", "regnety_160"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "xcit.safetensors is not a timm RegNet checkpoint" in line and "cls_token" in line
    assert not (tmp_path / "out").exists()


def test_neither_xcit_nor_regnet_is_refused(tmp_path, capsys):
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    assert convert_main([str(tmp_path / "other.safetensors"), str(tmp_path / "out")]) == 2
    assert "other.safetensors is not an XCiT checkpoint" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_truncated_regnet_weights_fail_with_one_line_and_exit_code_2(tmp_path):
    state_dict = load_file(str(WEIGHTS))
    save_file({k: v for k, v in state_dict.items() if not k.startswith("s4.")}, str(tmp_path / "cut.safetensors"))
    run = subprocess.run(
        [sys.executable, "-m", "qkv_vit.convert", str(tmp_path / "cut.safetensors"), str(tmp_path / "out")],
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    line = one_error_line(run.stderr)
    assert "match no named RegNet" in line and not (tmp_path / "out").exists()
    run = subprocess.run(
        [sys.executable, "-m", "qkv_vit.convert", str(tmp_path / "cut.safetensors"), str(tmp_path / "out")]
        + ["--model", "regnety_test"],
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "model variables missing from the file" in one_error_line(run.stderr)


@pytest.mark.slow
def test_regnety_160_matches_live_timm():
    """Where timm imports: a random timm regnety_160 (BatchNorm statistics calibrated, see make_regnet_fixtures.
    calibrate) against ours through the converter, on small images."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(FIXTURES))
    from make_regnet_fixtures import calibrate, randomize

    generator = torch.Generator().manual_seed(0)
    teacher = timm.create_model("regnety_160", pretrained=False)
    randomize(teacher, generator)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    calibrate(teacher, images, generator)
    with torch.no_grad():
        logits = teacher(images).numpy()
    state_dict = {k: v.numpy() for k, v in teacher.state_dict().items()}
    model = regnet.create("regnety_160")
    variables = regnet_convert.regnet_variables(regnet_convert.regnet_layout(state_dict), model)
    out = model.apply(variables, images.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(np.asarray(out), logits, rtol=0, atol=1e-4 * max(1.0, np.abs(logits).max()))
