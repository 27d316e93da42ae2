"""CIFAR-10 from scratch at 32x32 with XCiT-N12/8, from a folder or tar of its JPEGs, or tfds `cifar10`.

  python -m qkv_vit.main --config=configs/cifar10.py:recipe=short --workdir=workdirs/cifar10_short
  python -m qkv_vit.main --config=configs/cifar10.py:recipe=short,source=in_memory --workdir=workdirs/cifar10_mem
  python -m qkv_vit.main --config=configs/cifar10.py --workdir=workdirs/cifar10
  python -m qkv_vit.main --config=configs/cifar10.py:qkv=fsne_m8,epochs=100 --workdir=workdirs/cifar10_fsne
  python -m qkv_vit.main --config=configs/cifar10.py:source=in_memory --workdir=workdirs/cifar10_long_mem
  python -m qkv_vit.main --config=configs/cifar10.py:qkv=psne,depth=4,epochs=2,seed=1 --workdir=workdirs/c10_psne_s1
  python -m launch.sweep local --config=configs/cifar10.py --sweep=depth=4,epochs=2 --workdir=workdirs/cifar10_sweep

Data: `path=` a folder or tar of CIFAR-10's 60,000 images as `{train,test}/<class>/<image>`. Made once, on a
machine with internet, by `python -m qkv_vit.data.prepare cifar10 --image_folder data/cifar10` (tfds downloads
CIFAR-10, https://www.cs.toronto.edu/~kriz/cifar.html, then its arrays are written as PNGs), which is where this
file looks by default (else for data/cifar10-jpeg.tar.gz in the clone, else for a developer machine's archive:
docs/development.md).
The folder is converted once into a tfds data set under ~/.cache/qkv_vit. Or `source=tfds` (the tfds data set
itself, after `python -m qkv_vit.data.prepare cifar10 --data_dir DIR`, and --config.data.data_dir=DIR), or
`source=in_memory`: the same folder or tar
through the in-memory pipeline (data.source="image_folder", data.pipeline="in_memory"), decoded once into arrays,
batches served without tf.data and without TensorFlow, cropped and flipped on the device (the long recipe then runs
without RandAugment, which only tf.data does).
Model: XCiT-N12/8 (patch 8, so a 4x4 token grid at 32x32), width 128, optionally with depth=N fewer blocks.
Recipes, each named for the budget it is meant for:
  recipe=long (default, 100 epochs): XCiT's recipe scaled to CIFAR: AdamW, lr 1e-3 x batch / 512, one warmup
    epoch, drop path 0.05, the `small` augmentation (crop, RandAugment, erasing, mixup); over a few epochs it
    learns slowly (47% after 2 epochs at depth 4).
  recipe=short (3 epochs): a plain PyTorch script's recipe: AdamW lr 1e-3 not scaled by batch, weight decay
    0.05 on every parameter (optimizer.filter_bias_and_bn=False), linear warmup over the first 10% of steps from
    4e-5, then cosine to 0; horizontal flips and label smoothing 0.1 only, CIFAR-10's mean and std, no drop
    path, full depth.
Expected: recipe=short, 58.7 / 67.8 / 71.2% top-1 after epochs 1 / 2 / 3 (measured: linear QKV, mean of seeds 0,
1, 2, ± 0.8 / 0.8 / 0.4, the in-memory pipeline, 2-core CPU, 2026-11-30; its PyTorch reference,
benchmarks/torch_cifar_short.py, reached 71.3 and 70.9% with seeds 0 and 1, and 71.6% in an earlier run; every
QKV embedding: docs/experiments.md); recipe=long 54.4% top-1 after 5 epochs with depth=6
(measured on a 2-core CPU in 26 minutes) and 47.3-47.8% for every QKV embedding after 2 epochs with depth=4
(3 seeds each, ± 0.6; docs/experiments.md has the table); its 100-epoch default is unmeasured.
Arguments: recipe=long|short, qkv=<preset>, epochs=<n> (default: the recipe's), depth=<n>, batch=<n>, seed=<n>,
path=<folder or tar>, source=image_folder|tfds|in_memory, runlocal.
Sweep (`get_sweep(arg)`): the QKV comparison at one budget, qkv in linear, sne, psne, fsne_m8, fsne_m8_wide
x seed in 0, 1, 2 (`seeds=N` in `arg`: 0 to N-1); the rest of `arg` (e.g. "depth=4,epochs=2" or "recipe=short")
is added to every point.
"""

from pathlib import Path

import ml_collections

from qkv_vit import data
from qkv_vit.errors import ConfigError
from qkv_vit.train.config import base_config, parse_arg, refuse_with_runlocal, shrink_for_local_run

CLONE = Path(__file__).resolve().parents[1]
# Where CIFAR-10 is looked for without path=, the first that exists: what `python -m qkv_vit.data.prepare cifar10
# --image_folder data/cifar10` writes (run from the clone), the JPEG archive put in the clone (the earlier default:
# runs made with it resume unchanged), then the one developer machines hold beside the clone.
DEFAULT_PATHS = (
    CLONE / "data" / "cifar10",
    CLONE / "data" / "cifar10-jpeg.tar.gz",
    CLONE.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
RECIPE_EPOCHS = {"long": 100.0, "short": 3.0}
ARGUMENTS = dict(
    recipe="long",
    qkv="linear",
    epochs=float,
    depth=int,
    batch=128,
    seed=0,
    path=str,
    source="image_folder",
    runlocal=False,
)
SWEEP_QKV = ("linear", "sne", "psne", "fsne_m8", "fsne_m8_wide")
SWEEP_SEEDS = (0, 1, 2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, **ARGUMENTS)
    config = base_config()
    config.model_name = "xcit_nano_12_p8"
    config.qkv = args.qkv
    config.seed = args.seed
    if args.depth is not None:
        config.model.depth = args.depth
    config.model.drop_path_rate = 0.05
    # How to read CIFAR-10: (data.source, data.pipeline) of each choice of this file's `source=` argument.
    readers = {
        "image_folder": ("image_folder", "tf_data"),
        "tfds": ("tfds", "tf_data"),
        "in_memory": ("image_folder", "in_memory"),
    }
    if args.source not in readers:
        raise ConfigError(
            f"source={args['source']!r}: use source=tfds or source=in_memory, or leave it out for the image folder "
            "at path=."
        )
    source, pipeline = readers[args.source]
    config.data = data.get_config("small", source=source, name="cifar10" if source == "tfds" else "", pipeline=pipeline)
    if source == "image_folder":
        config.data.path = args.path or str(default_path())
    if pipeline == "in_memory":  # the device crops, flips, erases and mixes; RandAugment is tf.data's
        config.data.augment.randaugment_layers = 0
    config.data.image_size = 32
    config.global_batch_size = args.batch
    if args.recipe not in RECIPE_EPOCHS:
        raise ConfigError(f"recipe={args.recipe!r}: choose one of {sorted(RECIPE_EPOCHS)}.")
    config.total_epochs = args.epochs if args.epochs is not None else RECIPE_EPOCHS[args.recipe]
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_epochs = 1.0
    if args.recipe == "short":
        use_short_recipe(config)
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
    if args.runlocal:
        refuse_with_runlocal(arg, ("depth", "batch", "epochs"))
        shrink_for_local_run(config, steps=3, keep_data=True)
    return config


def default_path() -> Path:
    """The first of DEFAULT_PATHS that exists; else the first, whose absence the data's error explains."""
    return next((path for path in DEFAULT_PATHS if path.exists()), DEFAULT_PATHS[0])


def use_short_recipe(config: ml_collections.ConfigDict) -> None:
    """A plain PyTorch CIFAR script's recipe for a few epochs (the docstring's recipe=short)."""
    config.model.drop_path_rate = 0.0
    # A plain script's torch.optim.AdamW(model.parameters(), weight_decay=0.05) decays every parameter.
    config.optimizer.update(
        scale_lr_by_batch=False, warmup_init_lr=4e-5, min_lr=0.0, weight_decay=0.05, filter_bias_and_bn=False
    )
    config.optimizer.warmup_epochs = 0.1 * config.total_epochs
    augment = data.augment_config("none")
    augment.update(flip_prob=0.5, label_smoothing=0.1)
    config.data.augment = augment
    config.data.mean, config.data.std = CIFAR10_MEAN, CIFAR10_STD


def get_sweep(arg: str | None = None) -> list[str]:
    """One argument string per run: every QKV embedding x seeds 0, 1, 2 (`seeds=N` in `arg`: 0 to N-1, so that a
    sweep grows without renaming the points it has), each with the rest of `arg` appended."""
    items = [item for item in (arg or "").split(",") if item]
    seeds, rest = SWEEP_SEEDS, [item for item in items if not item.startswith("seeds=")]
    given = [item for item in items if item.startswith("seeds=")]
    if len(given) > 1:
        raise ConfigError(f"{', '.join(given)}: give seeds= once.")
    for item in given:
        count = item.partition("=")[2]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{item}: give the number of seeds, e.g. seeds=5 for seeds 0 to 4.")
        seeds = tuple(range(int(count)))
    extra = "".join(f",{item}" for item in rest)
    return [f"qkv={qkv},seed={seed}{extra}" for seed in seeds for qkv in SWEEP_QKV]
