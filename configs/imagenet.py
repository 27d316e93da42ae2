"""ImageNet-1k from scratch at 224: any XCiT size x any QKV embedding, with XCiT's recipe.

  python -m qkv_vit.main --config=configs/imagenet.py:model=nano_12_p16,qkv=linear --workdir=gs://BUCKET/in1k/n12_linear
  python -m qkv_vit.main --config=configs/imagenet.py:model=nano_12_p16,qkv=fsne_m8_wide --workdir=gs://BUCKET/in1k/n12_fsne
  python -m qkv_vit.main --config=configs/imagenet.py:model=nano_12_p16,qkv=fsne,code_size=8 --workdir=...
  python -m qkv_vit.main --config=configs/imagenet.py:model=tiny_12_p16,qkv=fsne,code_size=16,ema --workdir=...
  python -m qkv_vit.main --config=configs/imagenet.py:model=small_12_p16,qkv=psne,hidden=288 --workdir=...
  python -m launch.sweep tpu_pod --config=configs/imagenet.py --sweep=code_size --workdir=gs://BUCKET/in1k_codes ...
  python -m qkv_vit.main --config=configs/imagenet.py:model=nano_12_p16,distill=regnety_160,teacher=converted/regnety_160 --workdir=...
  python -m qkv_vit.main --config=configs/imagenet.py:model=nano_12_p16,res=384,init=gs://BUCKET/in1k/n12_dist,distill=regnety_160,teacher=converted/regnety_160 --workdir=...

Needs an accelerator: 400 epochs of 1.28M images at batch 1024 (500k steps; XCiT trained N12 on 8-16 V100s).

Data: tfds `imagenet2012`, which cannot be downloaded automatically: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/, run
`python -m qkv_vit.data.prepare imagenet2012 --data_dir <data_dir> --manual_dir <data_dir>/downloads/manual` once
(docs/data.md, "ImageNet-1k"), and pass data_dir=<data_dir> (a gs:// bucket works on TPU VMs).
Recipe (XCiT's paper, arXiv 2106.09681, and facebookresearch/xcit): 400 epochs, batch 1024, AdamW (eps 1e-8, weight decay 0.05),
lr 5e-4 x batch/512, 5 warmup epochs from 1e-6, cosine to 1e-5, no clipping; the `xcit` augmentation
(RandAugment m9, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, repeated augmentation x3);
one drop-path rate per size (XCiT's Table B.1: 0.0 for N12/T12, 0.05 T24/S12, 0.1 S24, 0.15 M24, 0.25 L24);
eval: resize to 224 with crop_pct 1.0; bfloat16 compute with float32 parameters (XCiT used mixed precision);
BatchNorm statistics over groups of 64 images (XCiT's per-GPU batch: DDP without SyncBatchNorm).
Expected top-1 (ImageNet val, 224): XCiT (qkv=linear): N12/16 69.9, T12/16 77.1, T24/16 79.4, S12/16 82.0,
S24/16 82.6, M24/16 82.7, L24/16 82.9 (p8: 73.8, 79.7, 81.9, 83.4, 83.9, 83.7, 84.4; XCiT's README).
Ahn et al.'s proposed embedding: N12/16 71.4 (3.1M parameters: qkv=fsne_m8_wide, F-SNE m=8 h=192),
T12/16 77.8, S12/16 82.1 (arXiv 2111.10017 and Mathematics 11(8):1933, 2023, as docs/models.md, "What the papers report"; the
abstract does not say which variant gave T12/S12).
Distillation (XCiT's † / § rows, distill=<teacher>): DeiT's hard distillation as facebookresearch/xcit main.py runs
it (alpha 0.5, tau 1.0; train/distillation.py), teacher=<its weights>: for regnety_160, DeiT's regnety_160-a5fe301d.pth
converted with `python -m qkv_vit.convert regnety_160-a5fe301d.pth converted/regnety_160` (docs/training.md,
"Distillation"). Expected (XCiT's README, distilled at 224 / then fine-tuned at 384): N12/16 72.2 / 75.4, T12/16 78.6
/ 80.9, S12/16 83.3 / 84.7.
res=384 is the fine-tune at 384 that XCiT's 384 rows come from. XCiT publishes no command for it; its main.py is
DeiT's, so this is DeiT's (README_deit.md): init=<the 224 run> required, 30 epochs, AdamW lr 5e-6 x batch/512,
weight decay 1e-8, min lr 5e-6, 5 warmup epochs from 1e-6, evaluation at 384 with crop_pct 1.0. XCiT's 384 rows
are distilled; its main.py (--pretrained) allows a teacher while fine-tuning, where DeiT's --finetune refuses one.
Arguments: model=<size>_<patch> (nano_12_p16, tiny_12_p16, tiny_24_p16, small_12_p16, small_24_p16,
medium_24_p16, large_24_p16, and the _p8 ones), qkv=linear|sne|psne|psne_second|fsne|fsne_m8|fsne_m8_wide|fsne_m16,
code_size=<m> (F-SNE only; the paper's best: 8 for nano, 16 for tiny), hidden=<h> (QKV hidden width),
ema (EMA 0.99996, evaluated too), batch=<n>, epochs=<n> (default 400, 30 with res=384), data_dir=<tfds dir>,
distill=<teacher model: regnety_160 or an xcit_* name>, teacher=<its weights>, res=224|384, init=<run dir or converted
weights> (res=384), layer_decay=<timm's layer-wise lr decay, e.g. 0.75; none by default>, runlocal.
Sweeps (`get_sweep(arg)`): "paper" (N12/T12/S12 x linear, sne, psne, fsne_m8, fsne_m16, fsne_m8_wide),
"code_size" (N12 and T12, F-SNE with m = 4, 8, 16, 32); other items of `arg` are added to every point.
"""

import ml_collections

from qkv_vit import data
from qkv_vit.errors import ConfigError
from qkv_vit.train.config import base_config, parse_arg, refuse_with_runlocal, set_xcit_model, shrink_for_local_run

ARGUMENTS = dict(
    model="nano_12_p16",
    qkv="linear",
    code_size=int,
    hidden=int,
    ema=False,
    batch=1024,
    epochs=float,
    data_dir=str,
    distill=str,
    teacher=str,
    res=224,
    init=str,
    layer_decay=float,
    runlocal=False,
)
RESOLUTIONS = (224, 384)
# XCiT's stochastic depth per size (the same for patch 16 and 8); none in the class-attention blocks.
DROP_PATH = {
    "nano_12": 0.0,
    "tiny_12": 0.0,
    "tiny_24": 0.05,
    "small_12": 0.05,
    "small_24": 0.1,
    "medium_24": 0.15,
    "large_24": 0.25,
}
PAPER_SIZES = ("nano_12_p16", "tiny_12_p16", "small_12_p16")
PAPER_QKV = ("linear", "sne", "psne", "fsne_m8", "fsne_m16", "fsne_m8_wide")
CODE_SIZES = (4, 8, 16, 32)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, **ARGUMENTS)
    check_arguments(args)
    config = base_config()
    set_xcit_model(config, args.model, args.qkv, args.code_size, args.hidden)
    size = config.model_name.removeprefix("xcit_").rsplit("_p", 1)[0]
    config.model.drop_path_rate = DROP_PATH[size]
    # XCiT's main.py wraps the model in plain DistributedDataParallel (no SyncBatchNorm): each of its 16 GPUs
    # normalized its own 64 images. Groups of 64 consecutive images of the global batch reproduce that on any
    # number of devices.
    config.model.batch_norm_group_size = 64
    config.compute_dtype = "bfloat16"

    config.data = data.get_config("xcit", source="tfds", name="imagenet2012")
    config.data.data_dir = args.data_dir
    config.global_batch_size = args.batch
    config.total_epochs = 400.0 if args.epochs is None else args.epochs
    config.optimizer.update(name="adamw", lr=5e-4, scale_lr_by_batch=True, warmup_epochs=5.0, weight_decay=0.05)
    if args.res == 384:
        fine_tune_at_384(config, args)
    if args.distill:  # XCiT's main.py: --distillation-type hard, alpha 0.5, tau 1.0 (its defaults)
        config.distillation.update(type="hard", alpha=0.5, tau=1.0, teacher_model=args.distill)
        config.distillation.teacher_path = args.teacher
    if args.layer_decay is not None:
        config.optimizer.layer_decay = args.layer_decay
    if args.ema:
        config.ema_decay = 0.99996
    config.log_every_steps = 100
    config.eval_every_steps = 12_500  # about every 10 epochs at batch 1024
    config.checkpoint_every_steps = 2_500
    if args.runlocal:
        refuse_with_runlocal(arg, ("batch", "epochs"))
        shrink_for_local_run(config)
        config.data.num_classes = 1000  # ImageNet's head, so a transfer test re-initializes it
    return config


def check_arguments(args: ml_collections.ConfigDict) -> None:
    if args.res not in RESOLUTIONS:
        raise ConfigError(f"res={args.res}: choose 224 (training from scratch) or 384 (XCiT's fine-tune at 384).")
    if args.res == 384 and not args.init and not args.runlocal:
        raise ConfigError("res=384 fine-tunes a 224 run: give init=<its run directory or converted weights>.")
    if args.init and args.res != 384:
        raise ConfigError(
            "init= goes with res=384 (the fine-tune): add res=384, or use configs/transfer.py to fine-tune elsewhere."
        )
    if args.teacher and not args.distill:
        raise ConfigError("teacher= names the weights of the distill= teacher: give distill=<its model> too.")


def fine_tune_at_384(config: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
    """DeiT's fine-tune at 384 (README_deit.md: --input-size 384 --lr 5e-6 --weight-decay 1e-8 --epochs 30
    --min-lr 5e-6, its 5 warmup epochs from 1e-6), on 384 x 384 images, from the 224 run at init."""
    config.data.image_size = 384
    config.total_epochs = 30.0 if args.epochs is None else args.epochs
    config.optimizer.update(lr=5e-6, weight_decay=1e-8, min_lr=5e-6)
    config.init_from = args.init
    config.eval_every_steps = 1_250  # about every epoch at batch 1024


def get_sweep(arg: str | None = None) -> list[str]:
    """Argument strings of a listing: "paper" (default) or "code_size"; other items go to every point."""
    items = [item for item in (arg or "").split(",") if item]
    listings = [item for item in items if item in ("paper", "code_size")]
    extra = "".join(f",{item}" for item in items if item not in listings)
    if len(listings) > 1:
        raise ConfigError(f"Choose one sweep listing, not {listings}.")
    if listings == ["code_size"]:
        return [f"model={model},qkv=fsne,code_size={m}{extra}" for model in PAPER_SIZES[:2] for m in CODE_SIZES]
    return [f"model={model},qkv={qkv}{extra}" for model in PAPER_SIZES for qkv in PAPER_QKV]
