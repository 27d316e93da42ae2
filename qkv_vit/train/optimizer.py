"""AdamW (default) or SGD with XCiT's schedule and weight-decay mask, optional layer-wise lr decay, clipping and
gradient accumulation."""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

import jax
import optax

from qkv_vit.errors import ConfigError

if TYPE_CHECKING:  # type hints only: the step and the mesh need no ml_collections (nor TensorFlow)
    import ml_collections

# Leaves that never get weight decay: biases, norm scales, LayerScale, XCA temperatures, the class token.
NO_DECAY_LEAVES = ("bias", "scale", "gamma1", "gamma2", "gamma3", "temperature", "cls_token")
NO_DECAY_SUFFIXES = ("_bias",)  # the QKV embeddings' hidden_bias / output_bias
NO_DECAY_MODULES = ("pos_embed",)  # the positional encoding's projection

# config.optimizer's defaults (XCiT's AdamW recipe), as plain values: base_config() makes config.optimizer of them
# (warmup_steps a placeholder there), and benchmarks/device_check.py steps with them without ml_collections.
DEFAULTS = dict(
    name="adamw",  # or "sgd" (with momentum; DeiT's fine-tuning recipe)
    lr=5e-4,  # at 512 images per update; scaled by global batch x accumulation steps / 512 (scale_lr_by_batch)
    scale_lr_by_batch=True,
    warmup_epochs=5.0,
    warmup_steps=None,  # set: overrides warmup_epochs
    warmup_init_lr=1e-6,
    min_lr=1e-5,
    weight_decay=0.05,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    momentum=0.9,  # sgd only
    nesterov=False,  # sgd only
    grad_clip_norm=0.0,  # 0: no clipping (XCiT's recipe)
    accumulation_steps=1,
    code_weight_decay=False,  # F-SNE codes: no weight decay by default
    filter_bias_and_bn=True,  # no weight decay on biases, norms, gammas, ... (timm's default); False: all
    layer_decay=1.0,  # layer-wise lr decay for fine-tuning (timm's --layer-decay, e.g. 0.75); 1.0: none
)


def learning_rate(
    opt: ml_collections.ConfigDict, global_batch_size: int, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Linear warmup from warmup_init_lr to the peak lr, then cosine decay to min_lr, indexed by optimizer update.

    The peak is opt.lr, or with opt.scale_lr_by_batch opt.lr x (images per update) / 512, where an update sees
    global_batch_size x accumulation_steps images (timm's train.py: batch x world size x grad_accum_steps / 512), so
    accumulating 8 micro-batches of 128 trains like one batch of 1024. `total_steps` and `warmup_steps` count
    micro-batches (train steps); the schedule counts updates.
    """
    images_per_update = global_batch_size * opt.accumulation_steps
    peak = opt.lr * images_per_update / 512 if opt.scale_lr_by_batch else opt.lr
    updates = max(total_steps // opt.accumulation_steps, 1)
    warmup = min(warmup_steps // opt.accumulation_steps, updates - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=opt.warmup_init_lr, peak_value=peak, warmup_steps=warmup, decay_steps=updates, end_value=opt.min_lr
    )


def decay_mask(params: Any, code_weight_decay: bool = False, filter_bias_and_bn: bool = True) -> Any:
    """True where weight decay applies: a tree of bools shaped as `params`.

    With `filter_bias_and_bn` (timm's create_optimizer_v2 name and default) biases, norm scales, LayerScale gammas,
    XCA temperatures, the class token and the positional encoding's projection are skipped; without it every
    leaf decays, as `torch.optim.AdamW(model.parameters(), weight_decay=...)` in a plain script does. The F-SNE
    codes follow `code_weight_decay` either way (the paper's choice, not a bias or norm).
    """

    def decays(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        leaf = names[-1]
        if leaf == "codes":
            return code_weight_decay
        if not filter_bias_and_bn:
            return True
        no_decay = (
            leaf in NO_DECAY_LEAVES or leaf.endswith(NO_DECAY_SUFFIXES) or any(m in names for m in NO_DECAY_MODULES)
        )
        return not no_decay

    return jax.tree_util.tree_map_with_path(decays, params)


STEM_MODULES = (
    "cls_token",
    "pos_embed",
    "patch_embed",
)  # timm's XCiT group_matcher: stem=r'^cls_token|pos_embed|patch_embed'


def layer_ids(params: Any) -> Any:
    """Each XCiT parameter's layer for layer-wise lr decay: a tree of ints shaped as `params`, as timm numbers them
    (group_with_matcher with XCiT's group_matcher): 0 for the class token, positional encoding and patch embedding,
    1 + i for blocks_i, then the class-attention blocks in order, the final norm with the last of them (timm's
    MATCH_PREV_GROUP), and last the head (with anything else: timm's unmatched parameters). A block's QKV
    embedding, F-SNE codes included, is in its block's layer.
    """
    names = list(params)
    depth = sum(bool(re.fullmatch(r"blocks_\d+", n)) for n in names)
    cls_layers = sum(bool(re.fullmatch(r"cls_attn_blocks_\d+", n)) for n in names)
    last_block = depth + cls_layers  # the final norm joins the group before it

    def layer(name: str) -> int:
        index = re.fullmatch(r"(blocks|cls_attn_blocks)_(\d+)", name)
        if name in STEM_MODULES:
            return 0
        if index:
            return 1 + int(index.group(2)) + (depth if index.group(1) == "cls_attn_blocks" else 0)
        if name == "norm":
            return last_block
        return last_block + 1

    return {name: jax.tree.map(lambda _, n=name: layer(n), subtree) for name, subtree in params.items()}


def layer_scales(params: Any, layer_decay: float) -> Any:
    """timm's layer-wise lr scales, decay ** (last layer - layer), a tree of floats shaped as `params`: 1 for the
    head, layer_decay for the layer before it, and so on down to the stem (param_groups_layer_decay's lr_scale)."""
    ids = layer_ids(params)
    last = max(jax.tree.leaves(ids))
    return jax.tree.map(lambda i: float(layer_decay ** (last - i)), ids)


def scale_by_layer(layer_decay: float) -> optax.GradientTransformation:
    """Each layer's updates multiplied by its layer_scales, as timm's scheduler multiplies each param group's lr by
    its lr_scale: the whole update is scaled, the decoupled weight decay (a term of it) included.

    A stateless per-leaf scale: what optax.multi_transform of one optax.scale per layer computes, without knowing
    the layer count before the parameters are seen; the optimizer's own state stays one tree.
    """

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree.map(lambda u, s: u * s, updates, layer_scales(updates, layer_decay)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """config.optimizer.name: "adamw" (decoupled weight decay, XCiT) or "sgd" (momentum, DeiT's fine-tuning).

    Both decay only the leaves that decay_mask selects. SGD's decay is PyTorch's: weight_decay x param is
    added to the (clipped) gradient before momentum, as torch.optim.SGD(weight_decay=...) does. With
    opt.layer_decay < 1 each layer's update is scaled by its layer_scales (timm's --layer-decay).
    """
    name = opt.name
    mask = functools.partial(
        decay_mask, code_weight_decay=opt.code_weight_decay, filter_bias_and_bn=opt.filter_bias_and_bn
    )
    if name == "adamw":
        update = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)
    elif name == "sgd":
        update = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
        )
    else:
        raise ConfigError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {name!r}: set it to one of them.")
    clip = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm else []
    layer_decay = [scale_by_layer(opt.layer_decay)] if opt.layer_decay != 1.0 else []
    optimizer = optax.chain(*clip, update, *layer_decay)
    if opt.accumulation_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=opt.accumulation_steps)
    return optimizer
