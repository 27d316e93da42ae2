"""Every config file: each command its docstring documents builds a valid config and model; `runlocal` trains
a step through the real trainer; sweeps expand to valid configs; the recipes say what the papers say (docs/models.md, "What the papers report")."""

import ast
import json
import re

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import REPO, load_config
from qkv_vit import data, models, sweep
from qkv_vit.data import in_memory
from qkv_vit.errors import ConfigError
from qkv_vit.train import train_and_evaluate
from qkv_vit.train.config import parse_arg
from qkv_vit.train.optimizer import learning_rate, make_optimizer
from qkv_vit.train.trainer import build_model


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """XLA without most optimizations: these runs check what a config does, not speed; compiling takes half the CPU."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


CONFIG_FILES = sorted(path.stem for path in (REPO / "configs").glob("*.py"))
# Arguments tested beyond the docstring's commands; a config file missing here fails test_every_config_is_listed.
EXTRA_ARGS = {
    "quickstart": [None, "runlocal"],
    "cifar10": [
        None,
        "source=tfds",
        "batch=64,seed=2",
        "runlocal",
        "recipe=short,runlocal",
        "recipe=short,epochs=10",
        "recipe=short,source=in_memory",
        "source=in_memory",
    ],
    "imagenet": [
        None,
        "model=tiny_24_p8,qkv=sne",
        "model=large_24_p16,qkv=psne_second,hidden=384",
        "runlocal",
        *(f"qkv=fsne,code_size={m}" for m in (4, 8, 16, 32)),
        "distill=regnety_160",
        "res=384,init=/ckpt,layer_decay=0.75",
        "res=384,distill=xcit_small_12_p16,runlocal",
    ],
    "transfer": [
        "runlocal",
        *(f"dataset={name},init=/ckpt" for name in ("cifar100", "cars196", "stl10")),
        "init=/ckpt,opt=adamw,lr=1e-4",
    ],
}


def documented_commands(name: str, program: str) -> list[str]:
    """The --config=configs/NAME.py[:ARG] arguments of the docstring's `python -m PROGRAM` lines."""
    docstring = ast.get_docstring(ast.parse((REPO / "configs" / f"{name}.py").read_text()))
    docstring = re.sub(r"\\\n\s*", " ", docstring)  # join shell line continuations
    pattern = rf"python -m {re.escape(program)} .*?--config=configs/{name}\.py(:\S+)?( --sweep=(\S+))?"
    return [match for match in re.findall(pattern, docstring)]


def config_cases() -> list[tuple[str, str | None]]:
    cases = []
    for name in CONFIG_FILES:
        documented = [arg[1:] or None for arg, _, _ in documented_commands(name, "qkv_vit.main")]
        cases += [(name, arg) for arg in dict.fromkeys(documented + EXTRA_ARGS.get(name, []))]
    return cases


def test_every_config_is_listed_and_documents_a_command():
    assert CONFIG_FILES == sorted(EXTRA_ARGS), "add the new config file to EXTRA_ARGS"
    for name in CONFIG_FILES:
        docstring = ast.get_docstring(ast.parse((REPO / "configs" / f"{name}.py").read_text()))
        assert documented_commands(name, "qkv_vit.main"), f"configs/{name}.py documents no command"
        assert "Expected" in docstring and "Data" in docstring and "Arguments" in docstring


@pytest.mark.parametrize("name, arg", config_cases())
def test_documented_arguments_build_a_valid_config_and_model(name, arg):
    config = load_config(name, arg)
    model = build_model(config, num_classes=10)
    data.validate_config(config.data)
    if config.data.pipeline == "in_memory":  # only what the device does: no host-only augmentation
        in_memory.check_device_augmentation(config.data)
    assert config.data.image_size % model.patch_size == 0
    assert config.global_batch_size > 0 and (config.total_steps or config.total_epochs) > 0
    if arg and "runlocal" in arg:
        assert config.data.source == "digits" or name == "cifar10"
        assert (config.total_steps or 0) <= 4 and config.global_batch_size <= 16


def test_imagenet_fine_tune_at_384_and_distillation_presets():
    config = load_config("imagenet", "model=nano_12_p16,res=384,init=/ckpt,distill=regnety_160,teacher=/teacher")
    assert (config.data.image_size, config.total_epochs, config.init_from) == (384, 30.0, "/ckpt")
    assert (config.optimizer.lr, config.optimizer.weight_decay, config.optimizer.min_lr) == (5e-6, 1e-8, 5e-6)
    assert config.distillation.to_dict() == dict(
        type="hard", alpha=0.5, tau=1.0, teacher_model="regnety_160", teacher_path="/teacher"
    )
    assert load_config("imagenet", "model=nano_12_p16").distillation.type == "none"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("res=384", "give init="),
        ("res=256", "res=256"),
        ("init=/ckpt", "init= goes with res=384"),
        ("teacher=/teacher", "give distill="),
    ],
)
def test_imagenet_argument_mistakes_say_what_to_give(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config("imagenet", arg)


@pytest.fixture(scope="module")
def tiny_image_folder(tmp_path_factory):
    """ROOT/{train,test}/{a,b}/*.png: random 32x32 images, enough for a batch of 16."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 3)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / label / f"{i}.png"
                )
    return root


def train_one_step(config, workdir, data_cache):
    config.data.cache_dir = str(data_cache)
    config.total_steps = 1
    config.async_checkpointing = False
    state = train_and_evaluate(config, workdir)
    assert int(state.step) == 1 and (workdir / "checkpoints" / "1").is_dir()
    return state


@pytest.mark.slow
def test_quickstart_runlocal_trains_a_step(tmp_path, data_cache):
    train_one_step(load_config("quickstart", "runlocal"), tmp_path, data_cache)


@pytest.mark.slow
def test_config_model_takes_every_xcit_option_and_trains(tmp_path, data_cache):
    """config.model.* is XCiT's own field list: the ablation options train, and --config.qkv=fsne is qkv=fsne."""
    config = load_config("quickstart", "runlocal")
    assert set(config.model) == set(models.architecture_fields()) - {"num_classes", "dtype"}
    config.qkv = "fsne"  # as --config.qkv=fsne sets it
    config.model.update(qkv_activation="identity", global_pool="avg", mlp_ratio=2)  # an int where a float is due
    state = train_one_step(config, tmp_path, data_cache)
    architecture = json.loads((tmp_path / "model.json").read_text())["architecture"]
    assert (architecture["qkv_activation"], architecture["global_pool"], architecture["mlp_ratio"]) == (
        "identity",
        "avg",
        2,
    )
    assert state.params["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (32, 64)  # mlp_ratio 2 x width 32
    flagged = load_config("imagenet", "model=nano_12_p16")
    flagged.qkv = "fsne"
    from_flag, from_argument = (
        build_model(flagged, 10),
        build_model(load_config("imagenet", "model=nano_12_p16,qkv=fsne"), 10),
    )
    assert from_flag == from_argument
    assert (from_flag.qkv_embed, from_flag.code_size, from_flag.qkv_hidden_dim) == ("fsne", 8, 128)


@pytest.fixture(scope="module")
def imagenet_runlocal(tmp_path_factory, data_cache):
    """configs/imagenet.py's runlocal, one step: a pretrained checkpoint for the transfer config."""
    workdir = tmp_path_factory.mktemp("imagenet_runlocal")
    state = train_one_step(
        load_config("imagenet", "model=nano_12_p16,qkv=fsne,code_size=8,ema,runlocal"), workdir, data_cache
    )
    return workdir, state


@pytest.mark.slow
def test_imagenet_runlocal_trains_a_step_with_ema_and_a_1000_class_head(imagenet_runlocal):
    _, state = imagenet_runlocal
    assert state.ema_params is not None and state.params["head"]["kernel"].shape[-1] == 1000


@pytest.mark.slow
def test_cifar10_runlocal_trains_on_an_image_folder(tmp_path, data_cache, tiny_image_folder):
    config = load_config("cifar10", f"runlocal,path={tiny_image_folder}")
    assert config.data.source == "image_folder" and config.data.path == str(tiny_image_folder)
    state = train_one_step(config, tmp_path, data_cache)
    assert state.params["head"]["kernel"].shape[-1] == 2  # the folder's two classes


@pytest.mark.slow
def test_transfer_runlocal_fine_tunes_the_imagenet_runlocal_checkpoint(tmp_path, data_cache, imagenet_runlocal):
    pretrained_dir, pretrained = imagenet_runlocal
    config = load_config("transfer", f"runlocal,qkv=fsne_m8,init={pretrained_dir}")
    assert config.optimizer.name == "sgd" and config.init_from == str(pretrained_dir)
    config.optimizer.update(lr=0.0, warmup_init_lr=0.0, min_lr=0.0, weight_decay=0.0)  # weights stay as loaded
    tuned = train_one_step(config, tmp_path, data_cache)
    assert tuned.params["head"]["kernel"].shape[-1] == 10  # re-initialized for the digits' 10 classes
    codes = ("blocks_0", "attn", "qkv", "codes")
    np.testing.assert_array_equal(get(tuned.params, codes), get(pretrained.params, codes))


def get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize(
    "arg, params",
    [
        ("model=nano_12_p16,qkv=linear", 3_053_224),
        ("model=nano_12_p16,qkv=fsne,code_size=8", 2_867_656),
        ("model=nano_12_p16,qkv=fsne_m8_wide", 3_071_176),
    ],
)
def test_imagenet_models_are_the_papers(arg, params):
    config = load_config("imagenet", arg)
    assert models.count_params(models.init_shapes(build_model(config, num_classes=1000))["params"]) == params


def test_imagenet_recipe_is_xcits():
    config = load_config("imagenet", "model=small_12_p16,qkv=fsne,code_size=16")
    assert (config.model_name, config.qkv, config.model.code_size) == ("xcit_small_12_p16", "fsne", 16)
    assert (config.global_batch_size, config.total_epochs, config.optimizer.name) == (1024, 400.0, "adamw")
    assert (config.optimizer.lr, config.optimizer.scale_lr_by_batch, config.optimizer.weight_decay) == (
        5e-4,
        True,
        0.05,
    )
    assert (config.optimizer.warmup_epochs, config.optimizer.warmup_init_lr, config.optimizer.min_lr) == (
        5.0,
        1e-6,
        1e-5,
    )
    assert (config.data.name, config.data.crop_pct, config.data.repeated_augmentation) == ("imagenet2012", 1.0, 3)
    assert config.data.augment.erasing_prob == 0.25 and config.ema_decay is None
    drop_path = {
        size: load_config("imagenet", f"model={size}").model.drop_path_rate
        for size in ("nano_12_p16", "tiny_12_p8", "tiny_24_p16", "small_12_p16", "large_24_p16")
    }
    assert drop_path == {
        "nano_12_p16": 0.0,
        "tiny_12_p8": 0.0,
        "tiny_24_p16": 0.05,
        "small_12_p16": 0.05,
        "large_24_p16": 0.25,
    }
    assert load_config("imagenet", "ema").ema_decay == 0.99996


def test_cifar10_short_recipe_is_the_plain_pytorch_scripts():
    """recipe=short: AdamW lr 1e-3 not scaled by batch, 10% linear warmup from 4e-5, cosine to 0, weight decay 0.05
    on every parameter, flips and label smoothing only, CIFAR-10's statistics, no drop path, 3 epochs at full depth."""
    config = load_config("cifar10", "recipe=short")
    assert (config.total_epochs, config.global_batch_size) == (3.0, 128)
    assert build_model(config, 10).depth == 12  # the named model's full depth
    opt = config.optimizer
    assert (opt.lr, opt.scale_lr_by_batch, opt.weight_decay, opt.warmup_init_lr, opt.min_lr) == (
        1e-3,
        False,
        0.05,
        4e-5,
        0,
    )
    assert opt.warmup_epochs == pytest.approx(0.3) and config.model.drop_path_rate == 0.0
    assert not opt.filter_bias_and_bn and load_config("cifar10").optimizer.filter_bias_and_bn
    augment = config.data.augment
    assert (augment.flip_prob, augment.label_smoothing, augment.crop_scale, augment.randaugment_layers) == (
        0.5,
        0.1,
        (1.0, 1.0),
        0,
    )
    assert augment.erasing_prob == 0 and augment.mixup_alpha == 0 and augment.cutmix_alpha == 0
    assert config.data.mean == (0.4914, 0.4822, 0.4465)
    schedule = learning_rate(opt, config.global_batch_size, total_steps=1000, warmup_steps=100)
    assert float(schedule(0)) == pytest.approx(4e-5, rel=1e-5) and float(schedule(100)) == pytest.approx(1e-3, rel=1e-5)
    assert float(schedule(1000)) == 0
    assert load_config("cifar10", "recipe=short,epochs=10").optimizer.warmup_epochs == pytest.approx(1.0)
    long = load_config("cifar10")
    assert (long.total_epochs, long.optimizer.scale_lr_by_batch, long.model.drop_path_rate) == (100.0, True, 0.05)


def test_transfer_recipe_is_deits():
    config = load_config("transfer", "dataset=cars196,model=small_12_p16,init=/runs/s12")
    assert (config.data.name, config.data.image_size, config.data.augment.erasing_prob) == ("cars196", 224, 0.0)
    assert (config.optimizer.name, config.optimizer.lr, config.optimizer.scale_lr_by_batch) == ("sgd", 0.01, False)
    assert (config.optimizer.weight_decay, config.global_batch_size, config.model.drop_path_rate) == (1e-4, 768, 0.0)
    adamw = load_config("transfer", "init=/runs/n12,opt=adamw")
    assert (adamw.optimizer.name, adamw.optimizer.lr, adamw.optimizer.weight_decay) == ("adamw", 7.5e-6, 0.05)


@pytest.mark.parametrize(
    "name, arg, message",
    [
        ("transfer", None, "give init="),
        ("transfer", "init=/x,dataset=mnist", "Unknown dataset='mnist'"),
        ("imagenet", "model=huge_12_p16", "Unknown model 'huge_12_p16'"),
        ("imagenet", "qkv=fsne_m3", "Unknown qkv="),
        ("imagenet", "qkv=sne,code_size=8", "code_size=8 only applies to F-SNE"),
        ("imagenet", "epochs=ten", "not a valid float"),
        ("cifar10", "qvk=sne", r"Unknown config argument\(s\) \['qvk'\]"),
        ("cifar10", "source=hub", "source='hub'"),
        ("cifar10", "recipe=medium", "recipe='medium': choose one of"),
        ("quickstart", "runlocal=maybe", "not a boolean"),
    ],
)
def test_bad_arguments_are_one_line_errors(name, arg, message):
    with pytest.raises(ValueError, match=message):
        load_config(name, arg)


def test_parse_arg_keeps_strings_without_a_spec_and_types_values_with_one():
    assert parse_arg("qkv=fsne_m8,epochs=100,runlocal").to_dict() == {
        "qkv": "fsne_m8",
        "epochs": "100",
        "runlocal": "true",
    }
    assert parse_arg(None).to_dict() == {}
    spec = dict(qkv="linear", epochs=400.0, depth=int, path=str, runlocal=False)
    args = parse_arg("depth=4,runlocal,path=a=b", **spec)
    assert args.to_dict() == {"qkv": "linear", "epochs": 400.0, "depth": 4, "path": "a=b", "runlocal": True}
    assert args.depth == args["depth"] == 4  # dot access, as big_vision's parse_arg
    assert parse_arg("runlocal=false", **spec).runlocal is False


def sweep_cases() -> list[tuple[str, str | None]]:
    return [
        (name, sweep_arg or None)
        for name in CONFIG_FILES
        for _, _, sweep_arg in documented_commands(name, "launch.sweep")
    ]


def test_documented_sweeps_exist():
    assert {name for name, _ in sweep_cases()} == {"cifar10", "imagenet", "transfer"}


@pytest.mark.parametrize("name, sweep_arg", sweep_cases())
def test_documented_sweeps_expand_to_valid_configs(name, sweep_arg):
    points = sweep.expand(REPO / "configs" / f"{name}.py", sweep_arg)  # builds every point's config
    assert points and len({p.name for p in points}) == len(points)


def test_sweep_listings():
    cifar = sweep.expand(REPO / "configs" / "cifar10.py", "depth=4,epochs=2")
    assert len(cifar) == 15 and cifar[0].name == "qkv-linear_seed-0_depth-4_epochs-2"
    assert cifar[0].config.endswith("cifar10.py:qkv=linear,seed=0,depth=4,epochs=2")
    codes = sweep.expand(REPO / "configs" / "imagenet.py", "code_size")
    configs = [load_config("imagenet", sweep.split_config_arg(p.config)[1]) for p in codes]
    assert sorted({(c.model_name, c.model.code_size) for c in configs}) == sorted(
        (f"xcit_{size}_12_p16", m) for size in ("nano", "tiny") for m in (4, 8, 16, 32)
    )
    paper = {p.name for p in sweep.expand(REPO / "configs" / "imagenet.py", "paper")}
    assert len(paper) == 18
    transfer = sweep.expand(REPO / "configs" / "transfer.py", "init_root=gs://b/in1k/")
    inits = {load_config("transfer", sweep.split_config_arg(p.config)[1]).init_from for p in transfer}
    assert len(transfer) == 16 and {init.removeprefix("gs://b/in1k/") for init in inits} <= paper


def test_sgd_decays_like_pytorch_and_respects_the_mask(tiny_config):
    opt = tiny_config.optimizer
    opt.update(name="sgd", momentum=0.9, weight_decay=0.1, accumulation_steps=1)
    optimizer = make_optimizer(opt, optax.constant_schedule(0.5))
    params = {"dense": {"kernel": np.full(2, 2.0, np.float32), "bias": np.full(2, 2.0, np.float32)}}
    grads = {"dense": {"kernel": np.ones(2, np.float32), "bias": np.ones(2, np.float32)}}
    state = optimizer.init(params)
    first, state = optimizer.update(grads, state, params)
    np.testing.assert_allclose(first["dense"]["kernel"], -0.5 * (1 + 0.1 * 2))  # lr x (g + wd x p)
    np.testing.assert_allclose(first["dense"]["bias"], -0.5)  # biases: no decay
    second, _ = optimizer.update(grads, state, params)
    np.testing.assert_allclose(second["dense"]["bias"], -0.5 * (0.9 * 1 + 1))  # momentum buffer 0.9 b + g
    opt.name = "lamb"
    with pytest.raises(ValueError, match="optimizer.name must be one of"):
        make_optimizer(opt, optax.constant_schedule(0.5))


CONFIG_FILE_MISTAKES = {  # file text -> what the one error line says after "--config=FILE: "
    "def get_config(arg=None)\n    return None\n": "line 1: expected ':'; fix the syntax there.",
    "def get_config(arg=None):\n    return undefined_name\n": (
        "line 2: NameError: name 'undefined_name' is not defined"
    ),
    "import ml_collections\n\n\ndef get_confg(arg=None):\n    return ml_collections.ConfigDict()\n": (
        "the file has no get_config function (it defines get_confg): add get_config(arg=None)"
    ),
    "def get_config(arg=None):\n    pass\n": "get_config() returned NoneType, not an ml_collections.ConfigDict (a missing return",
    "raise ValueError('broken on purpose')\n": "line 1: ValueError: broken on purpose",
    "import configs.no_such_module\n": "line 1: ModuleNotFoundError: No module named 'configs.no_such_module'",
    "def get_config():\n    import ml_collections\n    return ml_collections.ConfigDict()\n": (
        "calling get_config: TypeError: get_config() takes 0 positional arguments but 1 was given"
    ),
}


@pytest.mark.parametrize("text, problem", list(CONFIG_FILE_MISTAKES.items()))
def test_every_way_a_config_file_fails_to_load_is_one_error_line_naming_the_file_and_line(
    tmp_path, capsys, text, problem
):
    import qkv_vit.main  # noqa: F401 - defines the command's flags (--workdir)
    from qkv_vit.config_file import parse_flags

    path = tmp_path / "my_config.py"
    path.write_text(text)
    argument = f"--config={path}:arg" if "takes 0 positional" in problem else f"--config={path}"
    with pytest.raises(SystemExit) as stopped:
        parse_flags(["main", argument, f"--workdir={tmp_path}"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1, error
    assert error.startswith(f"error: {argument}: {problem}") and "override" not in error and "Traceback" not in error


def test_a_config_file_given_as_two_arguments_is_checked_the_same(tmp_path, capsys):
    import qkv_vit.main  # noqa: F401 - defines the command's flags (--workdir)
    from qkv_vit.config_file import parse_flags

    path = tmp_path / "my_config.py"
    path.write_text("def get_config(arg=None)\n    return None\n")
    with pytest.raises(SystemExit) as stopped:
        parse_flags(["main", "--config", str(path), f"--workdir={tmp_path}"])
    assert stopped.value.code == 2 and capsys.readouterr().err == (
        f"error: --config={path}: line 1: expected ':'; fix the syntax there.\n"
    )


def test_cifar10_reads_the_folder_prepare_writes_else_a_developer_archive_and_path_wins(tmp_path):
    module = sweep.load_config_module(REPO / "configs" / "cifar10.py")
    prepared, archive = tmp_path / "data" / "cifar10", tmp_path / "shared" / "cifar10-jpeg.tar.gz"
    module.DEFAULT_PATHS = (prepared, archive)
    assert [path.name for path in sweep.load_config_module(REPO / "configs" / "cifar10.py").DEFAULT_PATHS] == [
        "cifar10",
        "cifar10-jpeg.tar.gz",  # the clone's archive: runs made with the earlier default resume unchanged
        "cifar10-jpeg.tar.gz",
    ]
    assert module.get_config("recipe=short").data.path == str(prepared)  # neither exists: the one prepare writes
    archive.parent.mkdir()
    archive.touch()
    assert module.get_config("recipe=short").data.path == str(archive)
    prepared.mkdir(parents=True)
    assert module.get_config("recipe=short,source=in_memory").data.path == str(prepared)
    assert module.get_config("path=/mine").data.path == "/mine"
    assert module.get_config("source=tfds").data.name == "cifar10"


@pytest.mark.parametrize(
    "name, arg, clashes",
    [
        ("cifar10", "path=x,depth=6,runlocal", "depth="),
        ("cifar10", "runlocal,batch=8,epochs=2", "batch=, epochs="),
        ("imagenet", "runlocal,epochs=3", "epochs="),
        ("transfer", "runlocal,batch=32,init=/runs/n12", "batch="),
    ],
)
def test_runlocal_never_silently_replaces_an_argument_the_user_gave(name, arg, clashes):
    with pytest.raises(
        ConfigError, match=f"runlocal sets its own width, depth, batch and length .*: leave out {clashes} "
    ):
        load_config(name, arg)
    assert load_config(name, arg.replace("runlocal", "runlocal=false")).global_batch_size > 0  # without runlocal: fine


def test_the_cifar10_sweep_grows_by_seeds_without_renaming_its_points():
    three = sweep.expand(REPO / "configs" / "cifar10.py", "recipe=short,depth=4")
    five = sweep.expand(REPO / "configs" / "cifar10.py", "seeds=5,recipe=short,depth=4")
    assert len(three) == 15 and len(five) == 25 and [p.name for p in five[:15]] == [p.name for p in three]
    assert five[-1].name == "qkv-fsne_m8_wide_seed-4_recipe-short_depth-4"
    with pytest.raises(ConfigError, match="seeds=two: give the number of seeds"):
        sweep.expand(REPO / "configs" / "cifar10.py", "seeds=two")
