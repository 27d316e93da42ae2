"""TensorFlow as the host-side input pipeline uses it: quiet, and never on the accelerator.

JAX owns the GPU/TPU. If TensorFlow saw a GPU it would reserve most of its memory, so every module
of `qkv_vit.data` imports `tf` from here, which hides all GPUs from TensorFlow before first use.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was already initialized by someone else; too late to change, not fatal
    pass

__all__ = ["tf"]
