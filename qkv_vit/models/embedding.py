"""XCiT's input side: convolutional patch embedding and Fourier positional encoding."""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qkv_vit.models.layers import Dtype, conv_init, gelu, make_batch_norm

STAGE_WIDTH_DIVISORS = {16: (8, 4, 2, 1), 8: (4, 2, 1)}


class ConvPatchEmbed(nn.Module):
    """Stride-2 conv3x3 + BatchNorm stages with GELU between them: 4 stages for patch 16, 3 for patch 8."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    layer_impl: str = "flax"
    batch_norm_group_size: int | None = None

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = images.astype(self.dtype)
        for stage, divisor in enumerate(STAGE_WIDTH_DIVISORS[self.patch_size]):
            if stage:
                x = gelu(x)
            x = nn.Conv(
                self.embed_dim // divisor,
                kernel_size=(3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),  # torch padding=1; 'SAME' would pad (0, 1) at stride 2
                use_bias=False,
                dtype=self.dtype,
                kernel_init=conv_init,
                name=f"conv_{stage}",
            )(x)
            x = make_batch_norm(train, self.dtype, f"bn_{stage}", self.layer_impl, self.batch_norm_group_size)(x)
        return x  # (B, H / patch, W / patch, embed_dim)


def fourier_features(height: int, width: int, hidden_dim: int = 32, temperature: float = 10000.0) -> np.ndarray:
    """The sinusoidal (y, x) features of the reference PositionalEncodingFourier, shape (H, W, 2 * hidden_dim).

    Computed in float32 numpy from the static grid size, so any grid works and nothing runs per step.
    """
    eps, scale = 1e-6, 2 * math.pi
    y = np.arange(1, height + 1, dtype=np.float32)[:, None].repeat(width, axis=1)
    x = np.arange(1, width + 1, dtype=np.float32)[None, :].repeat(height, axis=0)
    y = y / (np.float32(height) + eps) * scale
    x = x / (np.float32(width) + eps) * scale
    dim_t = np.arange(hidden_dim, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / hidden_dim)

    def interleave(position: np.ndarray) -> np.ndarray:
        angles = position[..., None] / dim_t
        # sin of even channels and cos of odd channels, interleaved: s0 c1 s2 c3 ...
        return np.stack([np.sin(angles[..., 0::2]), np.cos(angles[..., 1::2])], axis=-1).reshape(
            height, width, hidden_dim
        )

    return np.concatenate([interleave(y), interleave(x)], axis=-1).astype(np.float32)


class FourierPositionalEncoding(nn.Module):
    """Fourier features of the patch grid projected to the token width by a 1x1 conv (here a Dense)."""

    embed_dim: int
    hidden_dim: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, height: int, width: int) -> jnp.ndarray:
        features = jnp.asarray(fourier_features(height, width, self.hidden_dim))
        projection = nn.Dense(
            self.embed_dim,
            dtype=self.dtype,
            kernel_init=conv_init,
            name="token_projection",
        )
        return projection(features).reshape(height * width, self.embed_dim)
