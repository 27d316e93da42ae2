"""RegNetX / RegNetY (Radosavovic et al., 2020) as timm 1.0.31 computes them (timm/models/regnet.py), in Flax.

The distillation teacher of XCiT's and DeiT's best small models is timm's `regnety_160` (RegNetY-16GF; DeiT's
regnety_160-a5fe301d.pth). This is the part of timm's RegNet those configurations use: the stem (conv3x3 stride 2,
BatchNorm, ReLU), four stages of Bottleneck blocks (conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU, squeeze-and-
excitation, conv1x1-BN, plus a conv1x1-BN shortcut where the shape changes, then ReLU) and the head (global average
pool, Linear). Not ported: pre-activation (RegNetV), RegNetZ's linear_out / final conv, other activations or norms,
dilation (output stride 32 only), drop path and dropout (a teacher runs in eval mode).

Module and variable names are timm's (`stem/conv`, `s1/b1/conv2/bn`, `s1/b1/se/fc1`, `head/fc`), so a timm key maps
to our path by splitting at the dots (qkv_vit/convert/regnet.py). Images are NHWC, variables hold `params`
(float32) and `batch_stats` (running mean and variance). The stage widths, depths and group widths come from
timm's RegNetCfg by timm's own quantisation (`generate_regnet`, `adjust_widths_groups_comp`, ported below to
float32 numpy as timm computes them in float32 torch).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

FAMILY = "regnet"  # the "family" of a RegNet's stored architecture (XCiT's stored architectures have none)
# PyTorch's BatchNorm2d defaults: eps 1e-5, running-stat momentum 0.1 (flax's momentum is 1 - torch's).
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9
NUM_STAGES = 4  # timm's RegNet asserts four stages
STAGE_STRIDE = 2  # every stage halves the resolution at output stride 32 (timm's default)


@dataclasses.dataclass(frozen=True)
class RegNetCfg:
    """timm's RegNetCfg, the fields the ported blocks use (act relu, norm batchnorm, downsample conv1x1)."""

    depth: int
    w0: int
    wa: float
    wm: float
    group_size: int
    bottle_ratio: float = 1.0
    se_ratio: float = 0.0
    group_min_ratio: float = 0.0
    stem_width: int = 32


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage as timm's RegNet._get_stage_args gives it: output width, block count, group width, stride."""

    width: int
    depth: int
    group_size: int
    bottle_ratio: float
    stride: int = STAGE_STRIDE


# timm 1.0.31's model_cfgs for RegNetX and RegNetY (those without pre-activation, other activations or norms).
REGNET_CONFIGS: dict[str, RegNetCfg] = {
    "regnetx_002": RegNetCfg(w0=24, wa=36.44, wm=2.49, group_size=8, depth=13),
    "regnetx_004": RegNetCfg(w0=24, wa=24.48, wm=2.54, group_size=16, depth=22),
    "regnetx_004_tv": RegNetCfg(w0=24, wa=24.48, wm=2.54, group_size=16, depth=22, group_min_ratio=0.9),
    "regnetx_006": RegNetCfg(w0=48, wa=36.97, wm=2.24, group_size=24, depth=16),
    "regnetx_008": RegNetCfg(w0=56, wa=35.73, wm=2.28, group_size=16, depth=16),
    "regnetx_016": RegNetCfg(w0=80, wa=34.01, wm=2.25, group_size=24, depth=18),
    "regnetx_032": RegNetCfg(w0=88, wa=26.31, wm=2.25, group_size=48, depth=25),
    "regnetx_040": RegNetCfg(w0=96, wa=38.65, wm=2.43, group_size=40, depth=23),
    "regnetx_064": RegNetCfg(w0=184, wa=60.83, wm=2.07, group_size=56, depth=17),
    "regnetx_080": RegNetCfg(w0=80, wa=49.56, wm=2.88, group_size=120, depth=23),
    "regnetx_120": RegNetCfg(w0=168, wa=73.36, wm=2.37, group_size=112, depth=19),
    "regnetx_160": RegNetCfg(w0=216, wa=55.59, wm=2.1, group_size=128, depth=22),
    "regnetx_320": RegNetCfg(w0=320, wa=69.86, wm=2.0, group_size=168, depth=23),
    "regnety_002": RegNetCfg(w0=24, wa=36.44, wm=2.49, group_size=8, depth=13, se_ratio=0.25),
    "regnety_004": RegNetCfg(w0=48, wa=27.89, wm=2.09, group_size=8, depth=16, se_ratio=0.25),
    "regnety_006": RegNetCfg(w0=48, wa=32.54, wm=2.32, group_size=16, depth=15, se_ratio=0.25),
    "regnety_008": RegNetCfg(w0=56, wa=38.84, wm=2.4, group_size=16, depth=14, se_ratio=0.25),
    "regnety_008_tv": RegNetCfg(w0=56, wa=38.84, wm=2.4, group_size=16, depth=14, se_ratio=0.25, group_min_ratio=0.9),
    "regnety_016": RegNetCfg(w0=48, wa=20.71, wm=2.65, group_size=24, depth=27, se_ratio=0.25),
    "regnety_032": RegNetCfg(w0=80, wa=42.63, wm=2.66, group_size=24, depth=21, se_ratio=0.25),
    "regnety_040": RegNetCfg(w0=96, wa=31.41, wm=2.24, group_size=64, depth=22, se_ratio=0.25),
    "regnety_064": RegNetCfg(w0=112, wa=33.22, wm=2.27, group_size=72, depth=25, se_ratio=0.25),
    "regnety_080": RegNetCfg(w0=192, wa=76.82, wm=2.19, group_size=56, depth=17, se_ratio=0.25),
    "regnety_080_tv": RegNetCfg(w0=192, wa=76.82, wm=2.19, group_size=56, depth=17, se_ratio=0.25, group_min_ratio=0.9),
    "regnety_120": RegNetCfg(w0=168, wa=73.36, wm=2.37, group_size=112, depth=19, se_ratio=0.25),
    "regnety_160": RegNetCfg(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25),
    "regnety_320": RegNetCfg(w0=232, wa=115.89, wm=2.53, group_size=232, depth=20, se_ratio=0.25),
    "regnety_640": RegNetCfg(w0=352, wa=147.48, wm=2.4, group_size=328, depth=20, se_ratio=0.25),
    "regnety_1280": RegNetCfg(w0=456, wa=160.83, wm=2.52, group_size=264, depth=27, se_ratio=0.25),
    "regnety_2560": RegNetCfg(w0=640, wa=230.83, wm=2.53, group_size=373, depth=27, se_ratio=0.25),
    # Not a timm model: a 25k-parameter RegNetY (widths 8, 16, 24, 40; depths 1, 1, 2, 2; groups 1 to 5) that
    # takes every path regnety_160 takes (SE, grouped convs, conv shortcuts, identity shortcuts), for the tests'
    # fixtures (tests/fixtures/make_regnet_fixtures.py).
    "regnety_test": RegNetCfg(w0=8, wa=8.0, wm=1.5, group_size=8, depth=6, se_ratio=0.25, stem_width=8),
}


def list_regnets() -> list[str]:
    """The names of REGNET_CONFIGS."""
    return list(REGNET_CONFIGS)


def quantize_float(f: float, q: int) -> int:
    """timm's quantize_float: the multiple of q nearest to f (Python's round: halves to even)."""
    return int(round(f / q) * q)


def make_divisible(v: float, divisor: int, round_limit: float) -> int:
    """timm.layers.make_divisible (min_value = divisor): v rounded to a multiple of divisor, never below
    round_limit * v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def adjust_widths_groups_comp(
    widths: list[int], bottle_ratios: list[float], groups: list[int], min_ratio: float = 0.0
) -> tuple[list[int], list[int]]:
    """timm's adjust_widths_groups_comp: stage widths whose bottleneck widths are multiples of the group widths,
    and the group widths (capped at the bottleneck widths)."""
    bottleneck_widths = [int(w * b) for w, b in zip(widths, bottle_ratios)]
    groups = [min(g, w_bot) for g, w_bot in zip(groups, bottleneck_widths)]
    if min_ratio:  # torchvision's rounding, for the *_tv configs
        bottleneck_widths = [make_divisible(w_bot, g, min_ratio) for w_bot, g in zip(bottleneck_widths, groups)]
    else:
        bottleneck_widths = [quantize_float(w_bot, g) for w_bot, g in zip(bottleneck_widths, groups)]
    widths = [int(w_bot / b) for w_bot, b in zip(bottleneck_widths, bottle_ratios)]
    return widths, groups


def generate_regnet(
    width_slope: float, width_initial: int, width_mult: float, depth: int, group_size: int, quant: int = 8
) -> tuple[list[int], int, list[int]]:
    """timm's generate_regnet: (per-block widths, number of stages, per-stage group widths).

    timm computes the widths in float32 torch; this does the same arithmetic in float32 numpy (torch.round and
    np.round both round halves to even), so the quantised widths are timm's. ValueError where timm asserts.
    """
    if not (width_slope >= 0 and width_initial > 0 and width_mult > 1 and width_initial % quant == 0):
        raise ValueError(
            f"RegNet needs wa >= 0, w0 > 0, wm > 1 and w0 a multiple of {quant}; got wa={width_slope}, "
            f"w0={width_initial}, wm={width_mult}."
        )
    f32 = np.float32
    widths_cont = np.arange(depth, dtype=f32) * f32(width_slope) + f32(width_initial)
    width_exps = np.round(np.log(widths_cont / f32(width_initial)) / f32(math.log(width_mult)))
    widths = np.round((f32(width_initial) * np.power(f32(width_mult), width_exps)) / f32(quant)) * f32(quant)
    num_stages = len(np.unique(widths))
    return widths.astype(np.int32).tolist(), num_stages, [group_size] * num_stages


def stage_specs(cfg: RegNetCfg) -> tuple[StageSpec, ...]:
    """The four stages of a RegNetCfg, as timm's RegNet._get_stage_args computes them at output stride 32.
    ValueError for a configuration that does not give four stages (timm asserts it)."""
    widths, num_stages, stage_groups = generate_regnet(cfg.wa, cfg.w0, cfg.wm, cfg.depth, cfg.group_size)
    stage_widths, stage_depths = np.unique(np.asarray(widths), return_counts=True)
    if num_stages != NUM_STAGES:
        raise ValueError(f"{cfg} gives {num_stages} stages; timm's RegNet has {NUM_STAGES}.")
    ratios = [cfg.bottle_ratio] * num_stages
    stage_widths, stage_groups = adjust_widths_groups_comp(
        [int(w) for w in stage_widths], ratios, stage_groups, min_ratio=cfg.group_min_ratio
    )
    return tuple(
        StageSpec(width=w, depth=int(d), group_size=g, bottle_ratio=b)
        for w, d, g, b in zip(stage_widths, stage_depths, stage_groups, ratios)
    )


def get_padding(kernel_size: int, stride: int) -> int:
    """timm's get_padding (dilation 1): the symmetric padding of its convolutions (1 for a 3x3, stride 1 or 2)."""
    return ((stride - 1) + (kernel_size - 1)) // 2


def conv_kernel_init(kernel_size: int, features: int, groups: int = 1) -> nn.initializers.Initializer:
    """timm's RegNet init of a conv weight: normal(0, sqrt(2 / fan_out)), fan_out = k * k * out / groups."""
    return nn.initializers.normal(stddev=math.sqrt(2.0 / (kernel_size * kernel_size * features // groups)))


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: conv (no bias; stride, groups, timm's symmetric padding) + BatchNorm (+ ReLU):
    (B, H, W, C_in) -> (B, ceil(H / stride), ceil(W / stride), features) in `dtype`. Submodules `conv`, `bn`."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    relu: bool = True
    zero_init_scale: bool = False  # timm's zero_init_last: the block's last BN starts at 0 (the block at identity)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        pad = get_padding(self.kernel_size, self.stride)
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=self.stride,
            padding=((pad, pad), (pad, pad)),
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=conv_kernel_init(self.kernel_size, self.features, self.groups),
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
            dtype=self.dtype,
            use_fast_variance=False,  # two-pass variance, as PyTorch computes it in training
            scale_init=nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones,
            name="bn",
        )(x)
        return nn.relu(x) if self.relu else x


class SEModule(nn.Module):
    """timm's SEModule (timm/layers/squeeze_excite.py): x * sigmoid(fc2(relu(fc1(mean of x over H, W)))), fc1 and
    fc2 1x1 convs with bias. (B, H, W, C) -> (B, H, W, C) in `dtype`; the mean is taken in float32."""

    rd_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        squeezed = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        hidden = nn.Conv(
            self.rd_channels, (1, 1), dtype=self.dtype, kernel_init=conv_kernel_init(1, self.rd_channels), name="fc1"
        )(squeezed)
        gate = nn.Conv(channels, (1, 1), dtype=self.dtype, kernel_init=conv_kernel_init(1, channels), name="fc2")(
            nn.relu(hidden)
        )
        return x * nn.sigmoid(gate)


class Bottleneck(nn.Module):
    """timm's RegNet Bottleneck: conv1 (1x1, BN, ReLU), conv2 (grouped 3x3 with the block's stride, BN, ReLU), SE,
    conv3 (1x1, BN), plus the shortcut (`downsample`: 1x1 conv with the stride + BN where the width or the
    resolution changes, else the input), then ReLU. (B, H, W, C_in) -> (B, ceil(H / stride), ceil(W / stride),
    out_chs) in `dtype`.

    As timm: bottleneck width round(out_chs * bottle_ratio), groups = bottleneck width // group_size, and the SE
    reduction width round(in_chs * se_ratio) from the block's *input* width (Python's round, halves to even)."""

    out_chs: int
    stride: int = 1
    bottle_ratio: float = 1.0
    group_size: int = 1
    se_ratio: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        in_chs = x.shape[-1]
        bottleneck_chs = int(round(self.out_chs * self.bottle_ratio))
        groups = bottleneck_chs // self.group_size
        shortcut = x
        x = ConvNormAct(bottleneck_chs, 1, dtype=self.dtype, name="conv1")(x, train)
        x = ConvNormAct(bottleneck_chs, 3, self.stride, groups, dtype=self.dtype, name="conv2")(x, train)
        if self.se_ratio:
            x = SEModule(int(round(in_chs * self.se_ratio)), dtype=self.dtype, name="se")(x)
        x = ConvNormAct(self.out_chs, 1, relu=False, zero_init_scale=True, dtype=self.dtype, name="conv3")(x, train)
        if in_chs != self.out_chs or self.stride != 1:
            shortcut = ConvNormAct(self.out_chs, 1, self.stride, relu=False, dtype=self.dtype, name="downsample")(
                shortcut, train
            )
        return nn.relu(x + shortcut.astype(x.dtype))


class RegStage(nn.Module):
    """timm's RegStage: blocks b1 .. b{depth}, the first with the stage's stride and the width change.
    (B, H, W, C_in) -> (B, ceil(H / stride), ceil(W / stride), spec.width) in `dtype`."""

    spec: StageSpec
    se_ratio: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for i in range(self.spec.depth):
            x = Bottleneck(
                self.spec.width,
                stride=self.spec.stride if i == 0 else 1,
                bottle_ratio=self.spec.bottle_ratio,
                group_size=self.spec.group_size,
                se_ratio=self.se_ratio,
                dtype=self.dtype,
                name=f"b{i + 1}",
            )(x, train)
        return x


class RegNet(nn.Module):
    """A named RegNet of REGNET_CONFIGS (timm 1.0.31's RegNet with that RegNetCfg, output stride 32, avg pool).

    `__call__(images, train=False)`: images (B, H, W, 3) float, normalised as for ImageNet -> logits
    (B, num_classes) float32. `dtype` is the compute dtype (parameters stay float32; pooling in float32).
    Variables: `params`, and `batch_stats` with each BatchNorm's running mean and variance (eval mode uses
    them; `train=True` normalises by the batch and needs mutable=["batch_stats"]: flax's BatchNorm, which keeps
    the biased batch variance where PyTorch keeps the unbiased one). ValueError for an unknown config_name.
    """

    config_name: str = "regnety_160"
    num_classes: int = 1000
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cfg = regnet_config(self.config_name)
        x = images.astype(self.dtype)
        x = ConvNormAct(cfg.stem_width, 3, stride=2, dtype=self.dtype, name="stem")(x, train)
        for i, spec in enumerate(stage_specs(cfg)):
            x = RegStage(spec, se_ratio=cfg.se_ratio, dtype=self.dtype, name=f"s{i + 1}")(x, train)
        return ClassifierHead(self.num_classes, dtype=self.dtype, name="head")(x)


class ClassifierHead(nn.Module):
    """timm's ClassifierHead with avg pooling (drop rate 0): global average pool in float32, then Linear `fc`.
    (B, H, W, C) -> (B, num_classes) float32; with num_classes 0 the pooled features (B, C) float32."""

    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not self.num_classes:  # timm's reset_classifier(0): the pooled features, no Linear
            return features
        fc = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(stddev=0.01),  # timm's _init_weights for nn.Linear
            name="fc",
        )
        return fc(features.astype(self.dtype)).astype(jnp.float32)


def regnet_config(name: str) -> RegNetCfg:
    """The RegNetCfg of a named RegNet; ValueError naming the known ones for an unknown name."""
    if name not in REGNET_CONFIGS:
        raise ValueError(f"Unknown RegNet {name!r}: known RegNets are {', '.join(REGNET_CONFIGS)}.")
    return REGNET_CONFIGS[name]


def create(name: str, num_classes: int = 1000, dtype: Dtype = jnp.float32) -> RegNet:
    """A named RegNet, e.g. create("regnety_160") for DeiT's distillation teacher. ValueError for an unknown name."""
    regnet_config(name)
    return RegNet(config_name=name, num_classes=num_classes, dtype=dtype)


def architecture_of(model: RegNet) -> dict[str, Any]:
    """A RegNet's architecture as JSON: {"family": "regnet", "name": ..., "num_classes": ...} (the compute dtype
    is not part of it: weights are float32 whatever a model computes in)."""
    return {"family": FAMILY, "name": model.config_name, "num_classes": model.num_classes}


def is_regnet_architecture(architecture: dict[str, Any]) -> bool:
    """Whether a stored architecture is a RegNet's (XCiT's have no "family")."""
    return architecture.get("family") == FAMILY


def from_architecture(architecture: dict[str, Any], dtype: Dtype = jnp.float32) -> RegNet:
    """The RegNet of an architecture_of JSON; ValueError if it is not a RegNet's or names an unknown RegNet."""
    if not is_regnet_architecture(architecture):
        raise ValueError(f"Not a RegNet architecture (its family is {architecture.get('family')!r}): {architecture}.")
    return create(architecture["name"], num_classes=int(architecture.get("num_classes", 1000)), dtype=dtype)


def init_shapes(model: RegNet, image_size: int = 224) -> dict[str, Any]:
    """Abstract variables (jax.ShapeDtypeStruct, nothing allocated) of a RegNet: {"params", "batch_stats"}.
    The shapes do not depend on the image size."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape, images.dtype)))
