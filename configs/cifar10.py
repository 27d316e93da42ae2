"""CIFAR-10 from scratch at 32x32, from the JPEG archive (an image folder) or tfds `cifar10`.

  python -m qkv_vit.main --config=configs/cifar10.py --workdir=workdirs/cifar10
  python -m qkv_vit.main --config=configs/cifar10.py:qkv=fsne_m8,epochs=100 --workdir=workdirs/cifar10_fsne
  python -m qkv_vit.main --config=configs/cifar10.py:qkv=psne,depth=4,epochs=2,seed=1 --workdir=workdirs/c10_psne_s1
  python -m launch.sweep local --config=configs/cifar10.py --sweep=depth=4,epochs=2 --workdir=workdirs/cifar10_sweep

Data: by default `../shared/data/cifar10-jpeg.tar.gz` (60,000 JPEGs: cifar10-jpeg/{train,test}/<class>/),
prepared once into a tfds data set under ~/.cache/qkv_vit. Elsewhere, point `path=` at your own copy
of such a folder or tar, or use `source=tfds` (needs `python -m qkv_vit.data.prepare cifar10 --data_dir DIR` on a machine with internet,
then --config.data.data_dir=...).
Model: XCiT-N12/8 (patch 8, so a 4x4 token grid at 32x32), width 128, optionally with depth=N fewer blocks.
Expected: 54.4% top-1 after 5 epochs with depth=6 (measured on a 2-core CPU in 26 minutes), and
47.3-47.8% for every QKV embedding after 2 epochs with depth=4 (3 seeds each, ± 0.6; the README's
Results section has the table). Longer runs (the default is 100 epochs) should go higher; we have not measured one, since on a CPU
they take days.
Arguments: qkv=<preset>, epochs=<n>, depth=<n>, batch=<n>, seed=<n>, path=<folder or tar>, source=tfds, runlocal.
Sweep (`get_sweep(arg)`): the QKV comparison at one budget, qkv in linear, sne, psne, fsne_m8, fsne_m8_wide
x seed in 0, 1, 2; `arg` (e.g. "depth=4,epochs=2") is added to every point.
"""

from pathlib import Path

import ml_collections

from qkv_vit import data
from qkv_vit.errors import ConfigError
from qkv_vit.train.config import base_config, parse_arg, shrink_for_local_run

SHARED_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ARGUMENTS = dict(
    qkv="linear",
    epochs=100.0,
    depth=int,
    batch=128,
    seed=0,
    path=str(SHARED_ARCHIVE),
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
    if args.source == "tfds":
        config.data = data.get_config("small", source="tfds", name="cifar10")
    elif args.source == "image_folder":
        config.data = data.get_config("small", source="image_folder")
        config.data.path = args.path
    else:
        raise ConfigError(f"source={args['source']!r}: use source=tfds, or leave it out for the image folder at path=.")
    config.data.image_size = 32
    config.global_batch_size = args.batch
    config.total_epochs = args.epochs
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_epochs = 1.0
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
    if args.runlocal:
        shrink_for_local_run(config, steps=3, keep_data=True)
    return config


def get_sweep(arg: str | None = None) -> list[str]:
    """One argument string per run: every QKV embedding x 3 seeds, each with `arg` appended."""
    extra = f",{arg}" if arg else ""
    return [f"qkv={qkv},seed={seed}{extra}" for seed in SWEEP_SEEDS for qkv in SWEEP_QKV]
