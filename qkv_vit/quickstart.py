"""Offline quickstart: the named XCiT models and their sizes, then XCiT-N12/16 on real images.

Run with `python -m qkv_vit.quickstart`. Needs no data and no network: the images are scikit-learn's
8x8 handwritten digits, which ship inside the installed package. (Training arrives with the trainer.)
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from qkv_vit import models


def print_model_table() -> None:
    print(f"{'model':<20} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} {'parameters':>13}")
    for name in models.list_models():
        model = models.create(name)
        count = models.param_count(model)
        print(f"{name:<20} {model.patch_size:>5} {model.embed_dim:>5} {model.depth:>5} {model.num_heads:>5} {count:>13,}")


def digit_images(count: int, size: int) -> np.ndarray:
    """scikit-learn's digits as RGB images in [-1, 1], upsampled (nearest) to size x size."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count] / 16.0  # (count, 8, 8) in [0, 1]
    repeat = size // 8
    images = digits.repeat(repeat, axis=1).repeat(repeat, axis=2)
    return np.repeat(images[..., None] * 2 - 1, 3, axis=-1).astype(np.float32)


def run_forward(name: str = "xcit_nano_12_p16", image_size: int = 224, batch: int = 8) -> None:
    model = models.create(name, num_classes=10)
    images = jnp.asarray(digit_images(batch, image_size))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    forward = jax.jit(model.apply)
    start = time.perf_counter()
    logits = forward(variables, images).block_until_ready()
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    forward(variables, images).block_until_ready()
    run = time.perf_counter() - start
    print(f"\n{name} (10 classes), {batch} digits at {image_size}x{image_size} on {jax.devices()[0].platform}:")
    print(f"  logits {tuple(logits.shape)}, finite: {bool(jnp.isfinite(logits).all())}")
    print(f"  first call (compile + run) {compile_and_run:.1f}s, then {batch / run:.1f} images/s")


def main() -> None:
    print_model_table()
    run_forward()


if __name__ == "__main__":
    main()
