"""Transfer learning: fine-tune an ImageNet run on CIFAR-10, CIFAR-100, Stanford Cars or STL-10 at 224.

  python -m qkv_vit.main \
      --config=configs/transfer.py:dataset=cifar10,model=nano_12_p16,qkv=fsne_m8,init=gs://BUCKET/in1k/n12_fsne_m8 \
      --workdir=gs://BUCKET/transfer/n12_fsne_m8_cifar10
  python -m qkv_vit.main --workdir=... \
      --config=configs/transfer.py:dataset=cars196,model=small_12_p16,qkv=linear,init=converted/small,opt=adamw
  python -m launch.sweep slurm --config=configs/transfer.py --sweep=init_root=/shared/in1k --workdir=/shared/transfer ...

Needs an accelerator (1000 epochs at 224), and an ImageNet checkpoint of the same model and QKV embedding:
`init=` takes a qkv_vit run directory (its latest step; e.g. a configs/imagenet.py workdir) or converted
PyTorch weights (`python -m qkv_vit.convert`, for qkv=linear). The head is re-initialized for the new class
count; nothing else may differ (model=, qkv=, code_size=, hidden= must match the checkpoint's run).

Data: tfds `cifar10`, `cifar100`, `cars196`, `stl10` (train / test). This code never downloads: run
`python -m qkv_vit.data.prepare <name> --data_dir <data_dir>` on a machine with internet, copy <data_dir> if the training
machine is offline, and pass data_dir=<data_dir> (docs/data.md, "Transfer data sets").
Recipe (XCiT's paper, arXiv 2106.09681, follows DeiT; Touvron, facebookresearch/deit#45): batch 768, SGD (momentum 0.9)
lr 0.01 (not scaled by batch), weight decay 1e-4, 1000 epochs, cosine after 5 warmup epochs from 1e-6 to
1e-5; no random erasing, no drop path; otherwise ImageNet's augmentation (`transfer` preset: RandAugment,
mixup / cutmix, label smoothing). opt=adamw is the usual alternative: ImageNet's weight decay 0.05 and a
smaller lr, by default 7.5e-6 (Touvron's value for ViT-B on CIFAR-10, facebookresearch/dino#81; tiny
models may want more: lr=).
Expected top-1, averaged over the four data sets (Mathematics 11(8):1933, 2023, as docs/models.md, "What the papers report"): N12/16 XCiT 92.2, F-SNE 93.3 (2.9M parameters:
qkv=fsne_m8); S12/16 XCiT 94.5, proposed 94.8. The paper's per-data-set numbers are not available to us.
Arguments: dataset=cifar10|cifar100|cars196|stl10, model=<size>_<patch>, qkv=<as configs/imagenet.py>,
code_size=<m>, hidden=<h>, init=<run dir or converted weights> (required), opt=sgd|adamw, lr=<lr>,
batch=<n>, epochs=<n>, data_dir=<tfds dir>, runlocal (digits, tiny model; init= optional there: without it
the run starts from scratch, with it the tiny checkpoint must come from configs/imagenet.py:runlocal).
Sweep (`get_sweep("init_root=DIR")`): N12/16 and S12/16 x qkv linear, fsne_m8 x the four data sets, each
initialized from DIR/<the configs/imagenet.py sweep point of its model>, as launch.sweep names them.
"""

import ml_collections

from qkv_vit import data
from qkv_vit.errors import ConfigError
from qkv_vit.sweep import point_name
from qkv_vit.train.config import base_config, parse_arg, refuse_with_runlocal, set_xcit_model, shrink_for_local_run

DATASETS = ("cifar10", "cifar100", "cars196", "stl10")
ARGUMENTS = dict(
    dataset="cifar10",
    model="nano_12_p16",
    qkv="linear",
    code_size=int,
    hidden=int,
    init=str,
    opt="sgd",
    lr=float,
    batch=768,
    epochs=1000.0,
    data_dir=str,
    runlocal=False,
)
DEFAULT_LR = {"sgd": 0.01, "adamw": 7.5e-6}
WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
SWEEP_MODELS = ("nano_12_p16", "small_12_p16")
SWEEP_QKV = ("linear", "fsne_m8")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, **ARGUMENTS)
    if args.dataset not in DATASETS:
        raise ConfigError(f"Unknown dataset={args['dataset']!r}; choose one of {', '.join(DATASETS)}.")
    if args.opt not in DEFAULT_LR:
        raise ConfigError(f"Unknown opt={args['opt']!r}; choose sgd (the paper's recipe) or adamw.")
    if not args.init and not args.runlocal:
        raise ConfigError(
            "configs/transfer.py starts from ImageNet weights: give init=<ImageNet run dir or converted weights> of "
            "the same model, e.g. init=gs://BUCKET/in1k/n12_fsne_m8 (train one with configs/imagenet.py)."
        )
    config = base_config()
    set_xcit_model(config, args.model, args.qkv, args.code_size, args.hidden)
    config.model.drop_path_rate = 0.0
    config.compute_dtype = "bfloat16"
    config.init_from = args.init

    config.data = data.get_config("transfer", source="tfds", name=args.dataset)
    config.data.data_dir = args.data_dir
    config.global_batch_size = args.batch
    config.total_epochs = args.epochs
    config.optimizer.update(
        name=args.opt,
        lr=args.lr or DEFAULT_LR[args.opt],
        scale_lr_by_batch=False,
        weight_decay=WEIGHT_DECAY[args.opt],
        warmup_epochs=5.0,
    )
    config.log_every_steps = 100
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 2_500
    if args.runlocal:
        refuse_with_runlocal(arg, ("batch", "epochs"))
        shrink_for_local_run(config)
    return config


def get_sweep(arg: str | None = None) -> list[str]:
    """Argument strings for N12/S12 x (linear, F-SNE m=8) x the four data sets; `arg` must give init_root=."""
    items = [item for item in (arg or "").split(",") if item]
    roots = [item.split("=", 1)[1] for item in items if item.startswith("init_root=")]
    if len(roots) != 1:
        raise ConfigError(
            "The transfer sweep needs one init_root=DIR: give init_root= once, the directory where the "
            "configs/imagenet.py sweep wrote its runs."
        )
    extra = "".join(f",{item}" for item in items if not item.startswith("init_root="))
    points = []
    for model in SWEEP_MODELS:
        for qkv in SWEEP_QKV:
            init = f"{roots[0].rstrip('/')}/{point_name(f'model={model},qkv={qkv}')}"
            points += [f"dataset={dataset},model={model},qkv={qkv},init={init}{extra}" for dataset in DATASETS]
    return points
