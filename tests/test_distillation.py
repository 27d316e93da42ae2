"""Distillation as DeiT / XCiT compute it (train/distillation.py) and timm's layer-wise lr decay (train/optimizer.py):
the losses against DeiT's formula, a distilled run that trains, resumes bit-exactly and leaves its teacher untouched,
the teacher's mistakes as one ConfigError, and the layer scales against timm's own."""

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkv_vit import models
from qkv_vit.convert.mapping import flax_path
from qkv_vit.errors import ConfigError
from qkv_vit.train import distillation, program, steps, trainer
from qkv_vit.train.config import check_config
from qkv_vit.train.optimizer import DEFAULTS, layer_scales, make_optimizer
from qkv_vit.train.target import Target
from qkv_vit.train.trainer import build_run, train_and_evaluate
from qkv_vit.tree import flatten
from qkv_vit.weights import read_weights

FIXTURES = Path(__file__).parent / "fixtures"

# A hand-made batch: 3 examples, 4 classes; the teacher's argmax differs from the student's on two of them.
STUDENT = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-3.0, 1.0, 2.0, 0.5]], np.float32)
TEACHER = np.array([[0.0, 3.0, 1.0, -2.0], [1.5, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 1.0]], np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_soft_loss_is_deits_kl_sum_times_tau_squared_over_numel(tau):
    # losses.py: F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction='sum', log_target=True) * T * T / s.numel()
    log_s, log_t = log_softmax(STUDENT / tau), log_softmax(TEACHER / tau)
    expected = np.sum(np.exp(log_t) * (log_t - log_s)) * tau * tau / STUDENT.size
    got = distillation.distillation_loss(jnp.asarray(STUDENT), jnp.asarray(TEACHER), "soft", tau)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_hard_loss_is_cross_entropy_with_the_teachers_argmax():
    expected = -np.mean(log_softmax(STUDENT)[np.arange(3), TEACHER.argmax(-1)])
    got = distillation.distillation_loss(jnp.asarray(STUDENT), jnp.asarray(TEACHER), "hard", 1.0)
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_losses_equal_torchs_own_functions():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s, t = torch.from_numpy(STUDENT), torch.from_numpy(TEACHER)
    tau = 2.0
    soft = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="sum", log_target=True)
    soft = soft * tau * tau / s.numel()
    hard = F.cross_entropy(s, t.argmax(dim=1))
    ours = {
        kind: distillation.distillation_loss(jnp.asarray(STUDENT), jnp.asarray(TEACHER), kind, tau)
        for kind in ("soft", "hard")
    }
    np.testing.assert_allclose(float(ours["soft"]), float(soft), rtol=1e-6)
    np.testing.assert_allclose(float(ours["hard"]), float(hard), rtol=1e-6)


def test_combined_loss_weights_base_and_distillation_by_alpha():
    combined = distillation.Distillation(kind="hard", alpha=0.3, tau=1.0, teacher=None)
    distill = distillation.distillation_loss(jnp.asarray(STUDENT), jnp.asarray(TEACHER), "hard", 1.0)
    got = combined.loss(jnp.float32(2.0), jnp.asarray(STUDENT), jnp.asarray(TEACHER))
    np.testing.assert_allclose(float(got), 0.7 * 2.0 + 0.3 * float(distill), rtol=1e-6)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_cache):
    """A finished tiny qkv_vit run on the digits: a teacher of the same 10 classes."""
    from conftest import load_config

    config = load_config("quickstart", "runlocal")
    config.model.update(embed_dim=32, depth=1, num_heads=4)
    config.data.cache_dir = str(data_cache)
    config.async_checkpointing = False
    workdir = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(config, workdir)
    return workdir


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_distilled_run_resumes_bit_exactly_and_leaves_the_teacher_untouched(tmp_path, tiny_config, teacher_run):
    teacher_before = jax.device_get(read_weights(teacher_run).variables)
    tiny_config.total_steps = 6
    tiny_config.distillation.update(type="hard", teacher_path=str(teacher_run))
    straight = train_and_evaluate(tiny_config, tmp_path / "straight")
    train_and_evaluate(tiny_config, tmp_path / "resumed")  # checkpoints at 2, 4, 6
    for step in (4, 6):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    resumed = train_and_evaluate(tiny_config, tmp_path / "resumed")
    assert int(resumed.step) == 6
    assert leaves_equal(straight.params, resumed.params)
    assert leaves_equal(straight.opt_state, resumed.opt_state)
    assert leaves_equal(straight.batch_stats, resumed.batch_stats)
    assert leaves_equal(teacher_before, jax.device_get(read_weights(teacher_run).variables))
    # Another teacher setting would train something else from here on: refused, as any result-changing key.
    tiny_config.total_steps = 8
    tiny_config.distillation.tau = 2.0
    with pytest.raises(ConfigError, match="distillation.tau"):
        train_and_evaluate(tiny_config, tmp_path / "resumed")


def test_the_teacher_changes_the_gradients_and_adds_nothing_at_alpha_zero(tiny_config, teacher_run):
    """steps.gradients of one finished batch: the teacher's term moves them; weighted by 0 it leaves them as
    they are without a teacher, bit for bit."""
    tiny_config.data.num_classes = 10
    tiny_config.distillation.update(type="soft", teacher_path=str(teacher_run), tau=2.0)
    run = build_run(tiny_config, None, None, target=Target.present())
    state = jax.jit(run.steps.init_state)()
    teacher = trainer.load_teacher(run)
    labels = jnp.arange(16) % 10
    batch = {"image": jax.random.normal(jax.random.key(1), (16, 32, 32, 3)), "soft_label": jax.nn.one_hot(labels, 10)}

    def grads(distilling):
        options = dict(model=run.model, mesh=run.mesh, all_reduce_dtype=jnp.float32, distillation=distilling)
        step = jax.jit(functools.partial(steps.gradients, **options))
        return step(state.params, state.batch_stats, batch, jax.random.key(2), teacher)[3]

    plain = grads(None)
    assert not leaves_equal(plain, grads(run.steps.distillation))
    assert leaves_equal(plain, grads(dataclasses.replace(run.steps.distillation, alpha=0.0)))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(type="hard"), "needs a teacher"),
        (dict(type="hard", teacher_model="regnety_999"), "Unknown config.distillation.teacher_model"),
        (dict(type="hard", teacher_path="/nonexistent/teacher"), "teacher_path"),
        (dict(type="medium"), "config.distillation.type"),
        (dict(type="soft", alpha=1.5), "config.distillation.alpha"),
    ],
)
def test_teacher_mistakes_are_one_config_error_before_anything_compiles(tiny_config, options, message):
    tiny_config.data.num_classes = 10  # the digits' (the source, which would say so, is not opened here)
    tiny_config.distillation.update(options)
    with pytest.raises(ConfigError, match=message):
        check_config(tiny_config)
        build_run(tiny_config, None, None, target=Target.present())


def test_a_teacher_of_other_classes_is_refused(tiny_config, teacher_run):
    tiny_config.data.num_classes = 5
    tiny_config.distillation.update(type="hard", teacher_path=str(teacher_run))
    with pytest.raises(ConfigError, match="predicts 10 classes, the student 5"):
        build_run(tiny_config, None, None, target=Target.present())


def test_a_name_stands_for_a_size_whatever_the_runs_embedding_and_training_options():
    run = models.architecture_of(models.create("xcit_small_12_p16", qkv="fsne_m8", drop_path_rate=0.05))
    assert distillation.same_model(run, distillation.named_architecture("xcit_small_12_p16", 1000))
    assert not distillation.same_model(run, distillation.named_architecture("xcit_small_12_p8", 1000))
    assert not distillation.same_model(run, distillation.named_architecture("regnety_160", 1000))


def test_a_named_teacher_that_is_not_the_recorded_one_is_refused(tiny_config, teacher_run):
    tiny_config.distillation.update(type="hard", teacher_path=str(teacher_run), teacher_model="xcit_nano_12_p16")
    with pytest.raises(ConfigError, match="is not the model recorded"):
        build_run(tiny_config, None, None, target=Target.present())


def test_training_needs_the_teachers_weights(tmp_path, tiny_config):
    tiny_config.distillation.update(type="hard", teacher_model="xcit_nano_12_p16")
    tiny_config.model_name = "xcit_nano_12_p16"
    with pytest.raises(ConfigError, match="set config.distillation.teacher_path"):
        train_and_evaluate(tiny_config, tmp_path)


def test_the_teachers_forward_is_in_the_step_program(tiny_config):
    """A named RegNetY teacher (regnety_test, the student's 10 classes: planned, no weights) runs inside the jitted
    step on random variables laid out as the student's parameters: the step's flops grow by its forward."""
    tiny_config.data.num_classes = 10
    tiny_config.total_steps = tiny_config.optimizer.warmup_steps = 2
    plain = program.lower_train_step(build_run(tiny_config, None, None, target=Target.present()))
    tiny_config.distillation.update(type="hard", teacher_model="regnety_test")
    run = build_run(tiny_config, None, None, target=Target.present())
    distilled = program.lower_train_step(run)
    teacher = run.steps.init_teacher()
    images = jnp.zeros((tiny_config.global_batch_size, 32, 32, 3))
    forward = jax.jit(lambda v, x: run.steps.distillation.teacher.apply(v, x)).lower(teacher, images).compile()
    added = distilled.compile().cost_analysis()["flops"] - plain.compile().cost_analysis()["flops"]
    assert added == pytest.approx(forward.cost_analysis()["flops"], rel=0.05)
    state = jax.jit(run.steps.init_state, out_shardings=run.steps.state_sharding)()
    batch = {"image": np.zeros((16, 32, 32, 3), np.uint8), "label": np.arange(16, dtype=np.int32)}
    teacher_before = jax.device_get(teacher)
    state, metrics = run.steps.train_step(state, batch, teacher)
    assert np.isfinite(float(metrics["loss"])) and leaves_equal(teacher_before, jax.device_get(teacher))


@pytest.mark.parametrize("case", [0, 1])
def test_layer_decay_scales_equal_timms_param_groups(case):
    """timm.optim.param_groups_layer_decay's lr_scale of every parameter of timm's XCiT (tests/fixtures/
    timm_layer_decay.json, written by make_layer_decay_fixture.py) is ours for the same parameter."""
    fixture = json.loads((FIXTURES / "timm_layer_decay.json").read_text())["cases"][case]
    name = fixture["model"].removesuffix("_224")
    params = models.init_shapes(models.create(name, num_classes=10), image_size=32)["params"]
    ours = flatten({"params": layer_scales(params, fixture["layer_decay"])})
    theirs = {flax_path(key): scale for key, scale in fixture["lr_scale"].items()}
    assert set(ours) == set(theirs)
    assert all(ours[key] == pytest.approx(theirs[key], rel=1e-12) for key in theirs)


def test_layer_decay_puts_a_blocks_qkv_embedding_and_codes_in_its_block():
    params = models.init_shapes(models.create("xcit_nano_12_p16", qkv="fsne_m8"), image_size=32)["params"]
    scales = layer_scales(params, 0.5)
    assert scales["blocks_3"]["attn"]["qkv"]["codes"] == scales["blocks_3"]["norm1"]["scale"] == 0.5 ** (15 - 4)


def test_layer_decay_scales_each_update_including_weight_decay():
    import ml_collections

    kernel = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    params = {name: {"kernel": kernel, "bias": kernel[0]} for name in ("patch_embed", "blocks_0", "blocks_1", "head")}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    options = ml_collections.ConfigDict({**DEFAULTS, "weight_decay": 0.1})
    schedule = optax.constant_schedule(1e-3)
    plain = make_optimizer(options, schedule)
    updates, _ = plain.update(grads, plain.init(params), params)
    options.layer_decay = 0.75
    decayed = make_optimizer(options, schedule)
    scaled, _ = decayed.update(grads, decayed.init(params), params)
    expected = jax.tree.map(lambda u, s: u * s, updates, layer_scales(params, 0.75))
    assert layer_scales(params, 0.75)["patch_embed"]["kernel"] == 0.75**3
    assert all(np.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(expected)))
    assert float(jnp.abs(scaled["head"]["kernel"] - updates["head"]["kernel"]).max()) == 0.0


def test_a_regnet_is_never_taken_for_an_xcit(tmp_path, tiny_config):
    """Converted RegNet weights given where XCiT weights are due (fine-tuning, export, evaluation's model) are one
    ConfigError saying what they are, not a default-sized XCiT that does not fit them."""
    from qkv_vit.convert import load_regnet_weights
    from qkv_vit.export import export_weights
    from qkv_vit.models import regnet
    from qkv_vit.weights import save_converted

    teacher = regnet.create("regnety_test", num_classes=10)
    converted = save_converted(
        tmp_path / "rn",
        load_regnet_weights(FIXTURES / "regnety_test.safetensors", teacher),
        regnet.architecture_of(teacher),
    )
    with pytest.raises(ConfigError, match="a regnet model .regnety_test., not an XCiT"):
        models.architecture_from_json(read_weights(converted).architecture)
    with pytest.raises(ConfigError, match="not an XCiT"):
        export_weights(converted, tmp_path / "out", safetensors=True)
    tiny_config.init_from = str(converted)
    with pytest.raises(ConfigError, match=f"config.init_from={converted}: a regnet model"):
        train_and_evaluate(tiny_config, tmp_path / "fine_tuned")
