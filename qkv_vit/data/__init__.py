"""Input pipelines: tfds / image folders / offline digits -> XCiT's augmentation -> numpy batches for JAX.

Everything here runs on the host (TensorFlow on CPU, never on the accelerator); train and eval images leave it
as uint8, and the trainer's step finishes them on the device (qkv_vit.train.finishing). Typical use:

    from qkv_vit import data
    config = data.get_config("xcit", source="tfds", name="imagenet2012")
    train = data.build_train_iterator(config, global_batch_size=1024, seed=0, start_step=step)
    evaluation = data.build_eval_iterator(config, global_batch_size=1024)
"""

from qkv_vit.data.config import augment_config, get_config, validate_config
from qkv_vit.data.errors import DataConfigError
from qkv_vit.data.pipeline import (
    EvalBatches,
    build_eval_iterator,
    build_train_iterator,
    dataset_info,
    local_batch_size,
    steps_per_epoch,
)
from qkv_vit.data.sources import DatasetInfo, SkippedFiles, Source, open_source

__all__ = [
    "DataConfigError",
    "DatasetInfo",
    "EvalBatches",
    "SkippedFiles",
    "Source",
    "augment_config",
    "build_eval_iterator",
    "build_train_iterator",
    "dataset_info",
    "get_config",
    "local_batch_size",
    "open_source",
    "steps_per_epoch",
    "validate_config",
]
