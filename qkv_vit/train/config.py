"""Defaults of a training run; each configs/*.py starts from base_config() and overrides a few fields."""

import ml_collections
from ml_collections import config_dict

from qkv_vit import data

MODEL_OPTIONS = {  # XCiT options a config may set; None keeps the named model's value
    "drop_path_rate": float,
    "drop_rate": float,
    "eta": float,
    "tokens_norm": bool,
    "qkv_embed": str,
    "qkv_hidden_dim": int,
    "shared_layer": str,
    "code_size": int,
    "code_mode": str,
    "code_init_std": float,
    "qkv_in_class_attention": bool,
    # Architecture overrides for tiny test/quickstart models:
    "embed_dim": int,
    "depth": int,
    "num_heads": int,
    "cls_attn_layers": int,
    "patch_size": int,
}


def parse_arg(arg: str | None) -> dict[str, str]:
    """A config file's argument string, big_vision style: "qkv=fsne_m8,epochs=100,runlocal" -> dict."""
    items = [item for item in (arg or "").split(",") if item]
    return dict(item.split("=", 1) if "=" in item else (item, "true") for item in items)


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_name = "xcit_nano_12_p16"
    config.qkv = ""  # a models.QKV_PRESETS name, e.g. "fsne_m8"; "" = the options in config.model
    config.model = ml_collections.ConfigDict({k: config_dict.placeholder(t) for k, t in MODEL_OPTIONS.items()})
    config.compute_dtype = "float32"  # or "bfloat16": bf16 compute, float32 parameters

    config.data = data.get_config("small", source="digits")
    config.seed = 0
    config.global_batch_size = 1024
    config.eval_batch_size = config_dict.placeholder(int)  # None: global_batch_size
    config.total_epochs = 400.0
    config.total_steps = config_dict.placeholder(int)  # set: overrides total_epochs

    config.optimizer = ml_collections.ConfigDict(
        dict(
            lr=5e-4,  # at batch 512; scaled by global_batch_size / 512 when scale_lr_by_batch
            scale_lr_by_batch=True,
            warmup_epochs=5.0,
            warmup_steps=config_dict.placeholder(int),  # set: overrides warmup_epochs
            warmup_init_lr=1e-6,
            min_lr=1e-5,
            weight_decay=0.05,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip_norm=0.0,  # 0: no clipping (XCiT's recipe)
            accumulation_steps=1,
            code_weight_decay=False,  # F-SNE codes: no weight decay by default
        )
    )
    config.ema_decay = config_dict.placeholder(float)  # e.g. 0.99996; evaluations then also report ema_*
    config.nonfinite = "stop"  # NaN/inf loss or gradients: "stop" the run, or "skip" the step

    config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1: all remaining devices
    config.sharding = "replicate"  # or "fsdp": parameters and optimizer state sharded over `model`

    config.log_every_steps = 50
    config.eval_every_steps = 1000  # 0: only at the end
    config.eval_name = "val"  # metrics are written as <eval_name>/top1, /top5, /loss
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpointing = True

    config.init_from = config_dict.placeholder(str)  # fine-tuning: our run dir or converted PyTorch weights
    config.init_from_ema = False
    return config
