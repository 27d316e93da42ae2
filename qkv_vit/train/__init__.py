"""Training: jit over a device mesh, optax AdamW, clu metrics, Orbax checkpoints with exact resume.

The step, optimizer, state and sharding modules (`qkv_vit.train.steps`, `.optimizer`, `.state`, `.sharding`)
import without TensorFlow, tfds, clu or ml_collections, so a model can be stepped on synthetic data where
those are not installed; the names below load the trainer on first use. The trainer itself needs
ml_collections, and TensorFlow and tfds only to read data through tf.data: with data.pipeline="in_memory" it runs
without them and without clu (then writing metrics.jsonl but no TensorBoard events).
"""

import importlib
from typing import Any

_EXPORTS = {
    "NonFiniteError": "trainer",
    "Preempted": "trainer",
    "evaluate": "trainer",
    "train_and_evaluate": "trainer",
    "base_config": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qkv_vit.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qkv_vit.train' has no attribute {name!r}")
