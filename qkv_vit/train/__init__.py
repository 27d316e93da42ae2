"""Training: jit over a device mesh, optax AdamW, clu metrics, Orbax checkpoints with exact resume."""

from qkv_vit.train.config import base_config
from qkv_vit.train.trainer import NonFiniteError, Preempted, evaluate, train_and_evaluate

__all__ = ["NonFiniteError", "Preempted", "base_config", "evaluate", "train_and_evaluate"]
