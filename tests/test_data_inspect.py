"""The count / throughput command: human-readable lines, then one JSON line with every result."""

import json

import pytest

from qkv_vit.data import inspect
from qkv_vit.data.testing import write_image_folder


def test_inspect_digits_prints_counts_and_throughput(tmp_path, capsys):
    result = inspect.main(["--cache-dir", str(tmp_path), "--image-size", "16", "--batch-size", "16", "--batches", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result
    assert result["num_examples"] == {"train": 1437, "test": 360}
    assert sum(result["class_counts"]["train"].values()) == 1437 and len(result["class_counts"]["test"]) == 10
    assert result["images_per_second"] > 0 and result["image_size"] == 16 and result["preset"] == "xcit"
    assert any("images/s" in line for line in lines)


def test_inspect_image_folder(tmp_path, capsys):
    write_image_folder(tmp_path / "images", {"train": {"a": 5, "b": 3}, "val": {"a": 1, "b": 2}})
    result = inspect.main(
        [
            "--source",
            "image_folder",
            "--path",
            str(tmp_path / "images"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--preset",
            "small",
            "--batch-size",
            "4",
            "--batches",
            "1",
        ]
    )
    assert result["class_counts"] == {"train": {"a": 5, "b": 3}, "val": {"a": 1, "b": 2}}


def test_inspect_reports_a_bad_config_on_stderr(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inspect.main(["--source", "image_folder", "--path", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
