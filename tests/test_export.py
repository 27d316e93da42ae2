"""qkv_vit.export: our weights as timm's and the official code's state dicts (checked against the fixtures timm
saved), qkv_vit/torch_xcit.py computing our logits for every QKV embedding, the round trip through
qkv_vit.convert, every named model's key layout, and the command with its model card on a tiny trained run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURE_NAMES, REPO, require_fixtures
from qkv_vit import models
from qkv_vit.convert import infer_architecture, load_pytorch_weights, read_state_dict
from qkv_vit.convert.__main__ import main as convert_main
from qkv_vit.export import export_weights, to_state_dict
from qkv_vit.export.__main__ import main as export_main
from qkv_vit.export.exporting import TRAINING_ONLY_FIELDS
from qkv_vit.tree import flatten, unflatten
from qkv_vit.weights import read_weights, save_converted

TOLERANCE = 1e-4  # float32 logits, ours against PyTorch's
# The five embeddings on a small model, each with another of the options that change the function.
EMBEDDINGS = {
    "sne": dict(qkv_embed="sne", qkv_hidden_dim=24),
    "psne_first": dict(qkv_embed="psne", shared_layer="first", qkv_hidden_dim=40, tokens_norm=True),
    "psne_second": dict(qkv_embed="psne", shared_layer="second", qkv_hidden_dim=24, global_pool="avg"),
    "fsne_concat_m8": dict(qkv_embed="fsne", code_size=8, qkv_in_class_attention=True),
    "fsne_add": dict(qkv_embed="fsne", code_mode="add", qkv_activation="identity", use_pos_embed=False),
}
SMALL = dict(embed_dim=32, depth=2, num_heads=4, cls_attn_layers=2, num_classes=5)


def torch_module():
    pytest.importorskip("torch", reason="the PyTorch side needs torch: pip install -e '.[torch]'")
    import torch

    from qkv_vit import torch_xcit

    torch.set_num_threads(1)
    return torch, torch_xcit


def random_variables(model, image_size: int, seed: int = 0) -> dict:
    """Every variable random (gammas, temperatures, codes and BatchNorm statistics too), so that a wrong transpose
    or a swapped q/k/v shows in the logits."""
    rng = np.random.default_rng(seed)
    shapes = flatten(models.init_shapes(model, image_size))
    return unflatten(
        {
            path: (rng.uniform(0.5, 1.5, leaf.shape) if path[-1] == "var" else rng.normal(0, 0.2, leaf.shape)).astype(
                np.float32
            )
            for path, leaf in shapes.items()
        }
    )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_weights_export_to_what_timm_and_the_official_code_saved(name):
    fixtures = require_fixtures()
    reference = load_file(str(fixtures / f"{name}.safetensors"))
    exported = to_state_dict(load_pytorch_weights(fixtures / f"{name}.safetensors"))
    assert set(exported) == set(reference)
    for key, value in reference.items():
        assert exported[key].dtype == np.float32 and np.array_equal(exported[key], value), key
    torch, torch_xcit = torch_module()
    official = torch.load(fixtures / f"{name}.official.pth", weights_only=True)["model"]
    exported = to_state_dict(load_pytorch_weights(fixtures / f"{name}.safetensors"), "official")
    assert set(exported) == set(official)
    for key, value in official.items():
        assert np.array_equal(exported[key], value.numpy()), key
    fixture = np.load(fixtures / f"{name}.npz")
    model = torch_xcit.Xcit(**json.loads(str(fixture["config"]))).eval()
    model.load_state_dict(
        {
            k: torch.from_numpy(v)
            for k, v in to_state_dict(load_pytorch_weights(fixtures / f"{name}.safetensors")).items()
        },
        strict=True,
    )
    with torch.no_grad():
        logits = model(torch.from_numpy(fixture["images"]).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(logits, fixture["logits"], atol=TOLERANCE)


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_torch_xcit_computes_our_logits_and_converting_back_gives_the_same_arrays(embedding, tmp_path):
    torch, torch_xcit = torch_module()
    model = models.create("xcit_nano_12_p8", **SMALL, **EMBEDDINGS[embedding])
    variables = random_variables(model, image_size=32)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images)))
    state_dict = to_state_dict(variables)

    architecture = models.architecture_of(model)
    theirs_model = torch_xcit.from_architecture(architecture).eval()
    theirs_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()})
    with torch.no_grad():
        theirs = theirs_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ours).max() > 0.1  # the comparison is not between two near-zero outputs
    np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)

    inferred = infer_architecture(state_dict)
    assert {field: inferred.get(field) for field in defining_fields(architecture)} == {
        field: architecture[field] for field in defining_fields(architecture)
    }
    assert inferred["qkv_hidden_dim"] == (architecture["qkv_hidden_dim"] or architecture["embed_dim"])
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(tmp_path / "w.safetensors"))
    back = flatten(load_pytorch_weights(tmp_path / "w.safetensors", model))
    original = flatten(variables)
    assert set(back) == set(original)
    assert all(np.array_equal(back[path], original[path]) for path in original)


def defining_fields(architecture: dict) -> list[str]:
    """The QKV options that shape a non-linear embedding's weights, so the weights tell them."""
    fields = ["qkv_embed", "qkv_in_class_attention", "use_pos_embed"]
    if architecture["qkv_embed"] == "psne":
        fields.append("shared_layer")
    if architecture["qkv_embed"] == "fsne":
        fields += ["code_mode", "code_size"] if architecture["code_mode"] == "concat" else ["code_mode"]
    return fields


@pytest.mark.parametrize("name", models.list_models())
def test_every_named_model_exports_to_the_pytorch_models_keys_and_shapes(name):
    torch, torch_xcit = torch_module()
    model = models.create(name, layer_impl="flax")  # the same variables as every layer_impl
    shapes = models.init_shapes(model, image_size=model.patch_size)
    # Zero-stride views: the mapping transposes views, so nothing of a large model's size is allocated.
    exported = to_state_dict(jax.tree.map(lambda leaf: np.broadcast_to(np.float32(0), leaf.shape), shapes))
    with torch.device("meta"):
        reference = torch_xcit.create(name).state_dict()
    wanted = {k: tuple(v.shape) for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in exported.items()} == wanted


def test_a_non_linear_qkv_layout_at_full_size():
    torch, torch_xcit = torch_module()
    options = dict(models.qkv_preset("fsne_m8_wide", 128), qkv_in_class_attention=True)
    shapes = models.init_shapes(models.create("xcit_nano_12_p16", layer_impl="flax", **options), image_size=16)
    exported = to_state_dict(jax.tree.map(lambda leaf: np.broadcast_to(np.float32(0), leaf.shape), shapes))
    with torch.device("meta"):
        reference = torch_xcit.create("xcit_nano_12_p16", **options).state_dict()
    wanted = {k: tuple(v.shape) for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in exported.items()} == wanted
    assert exported["blocks.0.attn.qkv.hidden_weight"].shape == (192, 128 + 8)
    assert exported["cls_attn_blocks.1.attn.qkv.codes"].shape == (3, 8)


def test_the_pytorch_module_imports_without_jax_and_matches_the_exports_field_list():
    torch_module()
    script = (
        "import json, sys; sys.modules['jax'] = None; sys.modules['flax'] = None\n"
        "from qkv_vit import torch_xcit\n"
        "model = torch_xcit.from_architecture(json.loads(sys.argv[1]))\n"
        "print(type(model).__name__, sum(p.numel() for p in model.parameters()))\n"
    )
    architecture = models.architecture_of(models.create("xcit_nano_12_p16", qkv="fsne_m8"))
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(architecture)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["Xcit", "2867656"]  # docs/models.md's count for fsne_m8
    from qkv_vit import torch_xcit

    assert torch_xcit.TRAINING_ONLY_FIELDS == TRAINING_ONLY_FIELDS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cache):
    """A 1-block quickstart run (F-SNE) of 2 steps, evaluated at its end."""
    from conftest import load_config
    from qkv_vit.train import train_and_evaluate

    config = load_config("quickstart", "runlocal")
    config.model.update(embed_dim=32, depth=1, num_heads=4)
    config.data.cache_dir = str(data_cache)
    config.async_checkpointing = False
    config.total_steps = 2
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, workdir)
    return workdir


@pytest.mark.slow  # trains a run
def test_the_command_exports_a_run_with_a_card_that_names_its_accuracy(tiny_run, tmp_path, capsys):
    torch, torch_xcit = torch_module()
    assert export_main([str(tiny_run), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "pytorch_model.pth"]
    config = json.loads((out / "config.json").read_text())
    model = torch_xcit.Xcit(**config["qkv_vit"]["torch_xcit"])
    model.load_state_dict(torch.load(out / "pytorch_model.pth", weights_only=True), strict=True)
    assert config["label_names"] == [str(i) for i in range(10)] and config["qkv_vit"]["timm_model"] is None
    final = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()][-1]
    card = (out / "README.md").read_text()
    assert f"val/top1 **{final['val/top1']:.4f}** at step 2" in card and "fsne (m=8, h=32)" in card
    assert "the offline digits" in card and "adamw" in card
    # Converting the export back: the same arrays, the activation read from config.json beside the file.
    assert convert_main([str(out / "pytorch_model.pth"), str(tmp_path / "back")]) == 0
    assert f"QKV activation relu (read from {out / 'config.json'})" in capsys.readouterr().out
    back, trained = flatten(read_weights(tmp_path / "back").variables), flatten(read_weights(tiny_run).variables)
    assert set(back) == set(trained) and all(np.array_equal(back[p], trained[p]) for p in trained)

    assert export_main([str(tiny_run), str(tmp_path / "st"), "--safetensors"]) == 0
    assert set(load_file(str(tmp_path / "st" / "model.safetensors"))) == set(model.state_dict()) - {
        k for k in model.state_dict() if k.endswith("num_batches_tracked")
    }


@pytest.mark.slow  # starts a process
def test_bad_input_is_one_error_line(tiny_run, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "qkv_vit.export", str(tiny_run), str(tmp_path / "out"), "--format", "official"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert errors == [
        "error: The official XCiT code has no fsne QKV embedding: export with --format timm "
        "(qkv_vit/torch_xcit.py loads it)."
    ]
    assert not (tmp_path / "out").exists()


def test_converted_weights_export_with_unknown_provenance_and_refuse_an_existing_directory(tmp_path):
    fixtures = require_fixtures()
    source = fixtures / f"{FIXTURE_NAMES[0]}.safetensors"
    model = models.XCiT(**infer_architecture(read_state_dict(source)))  # tokens_norm=False, as this fixture's
    save_converted(tmp_path / "converted", load_pytorch_weights(source, model), models.architecture_of(model))
    out = export_weights(tmp_path / "converted", tmp_path / "out", safetensors=True)
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(source)).keys()
    card = (out / "README.md").read_text()
    assert "data, recipe and accuracy unknown" in card and "Unknown: qkv_vit measured none" in card
    with pytest.raises(FileExistsError, match="already exists"):
        export_weights(tmp_path / "converted", out, safetensors=True)


def test_timm_loads_an_export_strictly_and_computes_our_logits(tmp_path):
    """Only where timm is installed (it needs torchvision): timm's own xcit_nano_12_p16_224."""
    timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")
    torch, _ = torch_module()
    model = models.create("xcit_nano_12_p16", num_classes=7)
    variables = random_variables(model, image_size=32)
    state_dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_state_dict(variables).items()}
    reference = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=7).eval()
    reference.load_state_dict(state_dict, strict=True)
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(model.apply(variables, jnp.asarray(images))), atol=TOLERANCE)
