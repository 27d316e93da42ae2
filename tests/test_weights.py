"""qkv_vit.weights: reading weights (converted, a run's) with their architecture, and the fine-tuning merge.

Reading a run's workdir, step directory and EMA copy is also exercised by tests/test_train.py and
tests/test_train_distributed.py; converting PyTorch weights by tests/test_convert.py.
"""

import numpy as np
import pytest

from qkv_vit import models
from qkv_vit.weights import merge_for_fine_tuning, read_weights, save_converted


def test_fine_tuning_reinitializes_a_head_of_another_size():
    fresh = {"params": {"head": {"kernel": np.zeros((4, 5)), "bias": np.zeros(5)}, "norm": {"scale": np.ones(4)}}}
    loaded = {
        "params": {"head": {"kernel": np.ones((4, 1000)), "bias": np.ones(1000)}, "norm": {"scale": np.full(4, 2.0)}}
    }
    merged = merge_for_fine_tuning(fresh, loaded, "src")
    assert merged["params"]["head"]["kernel"].shape == (4, 5) and (merged["params"]["norm"]["scale"] == 2).all()
    loaded["params"]["norm"]["scale"] = np.ones(8)
    with pytest.raises(ValueError, match="1 variables differ.*params/norm/scale"):
        merge_for_fine_tuning(fresh, loaded, "src")


def test_converted_weights_read_back_with_their_architecture(tmp_path):
    architecture = models.architecture_of(models.create("xcit_nano_12_p8", num_classes=3, depth=1))
    variables = {"params": {"head": {"bias": np.arange(3, dtype=np.float32)}}, "batch_stats": {}}
    save_converted(tmp_path / "new", variables, architecture)
    weights = read_weights(tmp_path / "new")
    assert weights.architecture == architecture and weights.architecture["dtype"] == "float32"
    assert models.from_architecture(models.architecture_from_json(weights.architecture)).depth == 1
    with pytest.raises(FileExistsError, match="already exists"):
        save_converted(tmp_path / "new", variables, architecture)
    with pytest.raises(FileNotFoundError, match="neither converted weights"):
        read_weights(tmp_path / "nowhere")
