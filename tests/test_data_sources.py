"""Sources: the offline digits, tfds by name, image folders and tars (cache, label map), and clear errors."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from qkv_vit import data
from qkv_vit.data import cache, image_folder, sources
from qkv_vit.data.testing import write_image_folder, write_tar

SMALL_FOLDER = {"train": {"dog": 3, "cat": 4, "ant": 2}, "test": {"cat": 2, "dog": 1, "ant": 1}}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def digits_config(cache_dir, **overrides):
    config = data.get_config("none")
    config.cache_dir = str(cache_dir)
    config.update(overrides)
    return config


def folder_config(path, cache_dir, **overrides):
    config = data.get_config("none", source="image_folder")
    config.path, config.cache_dir = str(path), str(cache_dir)
    config.update(overrides)
    return config


# ---- the offline default ----


def test_offline_digits_default(cache_dir):
    info = data.open_source(digits_config(cache_dir)).info
    num_train, num_eval, num_classes, names = (
        info.train_examples,
        info.eval_examples,
        info.num_classes,
        info.class_names,
    )
    assert (num_train, num_eval, num_classes) == (1437, 360, 10)
    assert names == [str(d) for d in range(10)]
    assert data.get_config().source == "digits"


def test_digits_are_prepared_once_and_readable_through_the_tfds_source(cache_dir):
    data.open_source(digits_config(cache_dir))
    info_file = next((Path(cache_dir) / "tfds" / "sklearn_digits").rglob("dataset_info.json"))
    stamp = info_file.stat().st_mtime_ns
    data.open_source(digits_config(cache_dir))
    assert info_file.stat().st_mtime_ns == stamp
    # The same prepared data through the generic tfds path, as ImageNet would be read.
    config = data.get_config("none", source="tfds", name="sklearn_digits")
    config.data_dir = str(Path(cache_dir) / "tfds")
    source = sources.prepare_source(config)
    assert (source.train_split, source.eval_split) == ("train", "test")
    assert sum(source.label_counts("train")) == 1437


def test_preparing_offline_data_never_says_it_downloads(tmp_path, capsys, caplog):
    """tfds prints "Downloading and preparing dataset" for every builder; ours download nothing and say so."""
    with caplog.at_level("INFO"):
        data.open_source(digits_config(tmp_path / "cache"))
        write_image_folder(tmp_path / "folder", SMALL_FOLDER)
        data.open_source(folder_config(tmp_path / "folder", tmp_path / "cache"))
    printed = capsys.readouterr()
    assert "ownload" not in printed.out + printed.err
    assert "ownload" not in caplog.text
    preparing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Preparing")]
    assert len(preparing) == 2 and all("offline" in message for message in preparing)


# ---- image folders and tars ----


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar.gz"])
def test_image_folder_is_prepared_with_sorted_classes_and_label_map(tmp_path, as_tar):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    path = write_tar(tmp_path / "images", tmp_path / "images.tar.gz") if as_tar else tmp_path / "images"
    source = sources.prepare_source(folder_config(path, tmp_path / "cache"))
    assert source.class_names == ["ant", "cat", "dog"]
    assert (source.num_examples("train"), source.num_examples("test")) == (9, 4)
    assert source.label_counts("train") == [2, 4, 3]
    label_map_file = next((tmp_path / "cache").rglob("label_map.json"))
    label_map = json.loads(label_map_file.read_text())
    assert label_map["label_map"] == {"ant": 0, "cat": 1, "dog": 2}
    assert label_map["num_examples"] == {"train": 9, "test": 4}
    assert not (label_map_file.parent / "extracted").exists()  # extracted files are dropped once converted
    assert not list((tmp_path / "cache" / "image_folder").glob(".tmp-*"))


def test_tar_is_prepared_once_and_reused(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    archive = write_tar(tmp_path / "images", tmp_path / "images.tar")
    first = image_folder.prepare_image_folder(archive, tmp_path / "cache")
    monkeypatch.setattr(image_folder, "_build", lambda *args, **kwargs: pytest.fail("rebuilt a cached entry"))
    assert image_folder.prepare_image_folder(archive, tmp_path / "cache") == first


def test_a_killed_preparation_leaves_nothing_that_later_runs_trust(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    archive = write_tar(tmp_path / "images", tmp_path / "images.tar")
    real_build = image_folder._build

    def dies_half_way(folder, work, *args, **kwargs):
        assert (folder.root / "train" / "cat").is_dir()  # extraction happened
        raise KeyboardInterrupt

    monkeypatch.setattr(image_folder, "_build", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        image_folder.prepare_image_folder(archive, tmp_path / "cache")
    assert list((tmp_path / "cache" / "image_folder").iterdir()) == []
    monkeypatch.setattr(image_folder, "_build", real_build)
    assert image_folder.prepare_image_folder(archive, tmp_path / "cache").num_examples == {"train": 9, "test": 4}


def test_folder_changes_invalidate_the_cache(tmp_path):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    first = image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache")
    write_image_folder(tmp_path / "images", {"train": {"bee": 2}})
    second = image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache")
    assert second.tfds_dir != first.tfds_dir
    assert second.class_names == ["ant", "bee", "cat", "dog"] and second.num_examples["train"] == 11


@pytest.mark.parametrize("bad_file,content", [("notes.txt", b"hello"), ("broken.jpg", b"not a jpeg at all")])
def test_a_file_that_is_not_an_image_is_skipped_and_counted_or_an_error(tmp_path, bad_file, content):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    (tmp_path / "images" / "train" / "cat" / bad_file).write_bytes(content)
    prepared = image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache", bad_files="skip")
    assert prepared.num_skipped == 1 and prepared.skipped_files == [f"train/cat/{bad_file}"]
    assert prepared.num_examples["train"] == 9
    with pytest.raises(data.DataConfigError, match=bad_file):
        image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache2", bad_files="error")
    assert list((tmp_path / "cache2" / "image_folder").iterdir()) == []


def jpeg_bytes(size=24):
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def tiff_bytes():
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    return buffer.getvalue()


UNDECODABLE = {  # what PIL accepts (verify() or open()) but the pipeline's TensorFlow decoder does not
    "cut.jpg": jpeg_bytes()[: len(jpeg_bytes()) // 2],  # a download or copy cut short
    "almost.jpeg": jpeg_bytes()[:-2],  # only the end-of-image marker missing
    "scan.png": tiff_bytes(),  # another format under an image extension
}


@pytest.mark.parametrize("split", ["train", "test"])
def test_files_the_pipeline_cannot_decode_are_skipped_at_conversion_or_named(tmp_path, split):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    for name, content in UNDECODABLE.items():
        (tmp_path / "images" / split / "cat" / name).write_bytes(content)
    prepared = image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache", bad_files="skip")
    assert prepared.num_skipped == 3 and prepared.skipped_files == sorted(f"{split}/cat/{n}" for n in UNDECODABLE)
    assert prepared.num_examples == {"train": 9, "test": 4}
    with pytest.raises(
        data.DataConfigError,
        match=rf"images/{split}/cat/\w+\.\w+ is not an image the input pipeline can "
        r"decode \(set bad_files='skip'",
    ):
        image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache2", bad_files="error")


def test_a_class_or_split_left_without_a_decodable_image_is_an_error(tmp_path):
    write_image_folder(tmp_path / "images", {"train": {"a": 3, "b": 3}})
    (tmp_path / "images" / "test" / "a").mkdir(parents=True)
    (tmp_path / "images" / "test" / "a" / "cut.jpg").write_bytes(UNDECODABLE["cut.jpg"])
    with pytest.raises(
        data.DataConfigError,
        match=r"Class folder .*images/test/a holds no image the input pipeline "
        r"can decode \(every file was skipped\)",
    ):
        image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache")
    assert list((tmp_path / "cache" / "image_folder").iterdir()) == []


def test_bad_files_error_is_an_error_for_a_folder_converted_with_skip(tmp_path):
    """The cache entry of a "skip" conversion does not hide the bad files from a later run with "error"."""
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    (tmp_path / "images" / "train" / "cat" / "cut.jpg").write_bytes(UNDECODABLE["cut.jpg"])
    assert image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache").num_skipped == 1
    with pytest.raises(
        data.DataConfigError,
        match=r"images: train/cat/cut.jpg is not an image the input pipeline "
        r"can decode \(1 such files were skipped",
    ):
        image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache", bad_files="error")


def test_a_split_with_no_examples_is_an_error(cache_dir):
    with pytest.raises(
        data.DataConfigError, match=r"Split 'test\[:0\]' of the offline digits data set has no examples"
    ):
        sources.prepare_source(digits_config(cache_dir, eval_split="test[:0]"))


def test_a_damaged_archive_is_one_error(tmp_path):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    archive = write_tar(tmp_path / "images", tmp_path / "images.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    (tmp_path / "zip.tar").write_bytes(b"PK\x03\x04 not a tar")
    for path in (cut, tmp_path / "zip.tar"):
        with pytest.raises(
            data.DataConfigError,
            match=rf"{path} cannot be extracted \(.*\): it is damaged, cut short "
            r"or not a tar archive",
        ):
            image_folder.prepare_image_folder(path, tmp_path / "cache")


def test_every_kept_file_decodes_through_the_pipeline(tmp_path):
    """What conversion keeps, the train and eval pipelines read to the end without an error."""
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    for split in ("train", "test"):
        (tmp_path / "images" / split / "cat" / "cut.jpg").write_bytes(UNDECODABLE["cut.jpg"])
        (tmp_path / "images" / split / "dog" / "real.jpg").write_bytes(jpeg_bytes())
    config = folder_config(tmp_path / "images", tmp_path / "cache")
    config.image_size = 8
    train = data.open_source(config).train_batches(10, seed=0, process_index=0, process_count=1, local_device_count=1)
    assert next(train)["image"].shape == (10, 8, 8, 3)
    evaluation = data.open_source(config).eval_batches(5, process_index=0, process_count=1, local_device_count=1)
    assert sum(batch["mask"].sum() for batch in evaluation) == 5


def mac_archive(tmp_path, name="mac.tar.gz"):
    """images/... packed as macOS's archiver does: __MACOSX/images/.../._<file> AppleDouble twins beside it."""
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted((tmp_path / "images").rglob("*")):
            member = f"images/{file.relative_to(tmp_path / 'images').as_posix()}"
            tar.add(file, arcname=member, recursive=False)
            if file.is_file():
                twin = tarfile.TarInfo(f"__MACOSX/{member.rsplit('/', 1)[0]}/._{file.name}")
                payload = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
                twin.size = len(payload)
                tar.addfile(twin, io.BytesIO(payload))
    return archive


def test_archive_and_folder_clutter_is_not_data(tmp_path):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    plain = image_folder.prepare_image_folder(
        write_tar(tmp_path / "images", tmp_path / "plain.tar.gz"), tmp_path / "cache"
    )
    (tmp_path / "images" / "train" / "cat" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "images" / "train" / "@eaDir" / "cat").mkdir(parents=True)  # Synology's thumbnail folders
    (tmp_path / "images" / "train" / "dog" / "Desktop.ini").write_text("[.ShellClassInfo]")
    (tmp_path / "images" / "train" / "dog" / "thumbs.db").write_bytes(b"\0")
    (tmp_path / "images" / "train" / "dog" / "Icon\r").write_bytes(b"")  # a macOS folder icon
    (tmp_path / "images" / "test" / "cat" / "0000.png:Zone.Identifier").write_text("[ZoneTransfer]")  # WSL copies
    for path in (mac_archive(tmp_path), tmp_path / "images"):
        prepared = image_folder.prepare_image_folder(path, tmp_path / "cache")
        assert (prepared.class_names, prepared.num_examples, prepared.num_skipped) == (
            plain.class_names,
            plain.num_examples,
            0,
        ), path


def test_an_error_inside_an_archive_names_the_archive_and_member_not_a_temporary_path(tmp_path):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    (tmp_path / "images" / "train" / "zebra").mkdir()
    archive = mac_archive(tmp_path)
    with pytest.raises(data.DataConfigError) as raised:
        image_folder.prepare_image_folder(archive, tmp_path / "cache")
    assert str(raised.value).startswith(f"Empty class folder {archive} (archive member images/train/zebra): ")
    assert ".tmp-" not in str(raised.value)


def test_hidden_files_are_ignored(tmp_path):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    (tmp_path / "images" / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "images" / "train" / "cat" / "._0000.png").write_bytes(b"\0")
    assert image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache").num_skipped == 0


# ---- clear errors before heavy work ----


def test_error_missing_path(tmp_path):
    with pytest.raises(data.DataConfigError, match="does not exist"):
        sources.prepare_source(folder_config(tmp_path / "nowhere", tmp_path / "cache"))


def test_error_empty_class_folder(tmp_path):
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    (tmp_path / "images" / "train" / "zebra").mkdir()
    with pytest.raises(data.DataConfigError, match=r"Empty class folder .*zebra"):
        sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache"))


def test_error_folder_without_class_folders(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(data.DataConfigError, match="no class folders"):
        sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache"))


def test_error_wrong_split_name_lists_the_valid_ones(tmp_path, cache_dir):
    with pytest.raises(data.DataConfigError, match=r"'validation'.*\['train', 'test'\]"):
        sources.prepare_source(digits_config(cache_dir, eval_split="validation"))
    write_image_folder(tmp_path / "images", SMALL_FOLDER)
    with pytest.raises(data.DataConfigError, match=r"(?i)choose one of its splits"):
        sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache", train_split="training"))


@pytest.mark.parametrize("held_out", ["valid", "val", "validation", "eval", "dev", "Test", "VALID"])
def test_the_usual_held_out_split_names_are_found(tmp_path, held_out):
    write_image_folder(
        tmp_path / "images", {"Train" if held_out.isupper() else "train": {"a": 3, "b": 3}, held_out: {"a": 1, "b": 1}}
    )
    source = sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache"))
    assert source.eval_split == held_out and source.num_examples(source.eval_split) == 2


def test_test_is_preferred_and_the_config_decides(tmp_path):
    write_image_folder(tmp_path / "images", {"train": {"a": 3}, "val": {"a": 2}, "test": {"a": 1}})
    assert sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache")).eval_split == "test"
    chosen = sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache", eval_split="val"))
    assert chosen.eval_split == "val"


def test_without_a_held_out_split_the_eval_split_must_be_asked_for(tmp_path):
    """Never a silent evaluation on the training images."""
    write_image_folder(tmp_path / "images", {"train": {"a": 3, "b": 3}, "extra": {"a": 1}})
    with pytest.raises(
        data.DataConfigError,
        match=r"has no held-out split to evaluate on: its splits are "
        r"\['extra', 'train'\], and none is called test, .*, dev\. Set "
        r"data.eval_split: .* or data.eval_split='train' to evaluate on the "
        r"training images",
    ):
        sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache"))
    asked = sources.prepare_source(folder_config(tmp_path / "images", tmp_path / "cache", eval_split="train"))
    assert (asked.train_split, asked.eval_split) == ("train", "train")


def test_subsplits_are_accepted(cache_dir):
    source = sources.prepare_source(digits_config(cache_dir, train_split="train[:80%]", eval_split="train[80%:]"))
    assert source.num_examples(source.train_split) + source.num_examples(source.eval_split) == 1437


def test_error_unknown_source_and_unknown_tfds_name(cache_dir):
    with pytest.raises(
        data.DataConfigError,
        match=r"source must be one of \['digits', 'tfds', 'image_folder'\], got 'folder'",
    ):
        sources.prepare_source(digits_config(cache_dir, source="folder"))
    config = data.get_config("none", source="tfds", name="no_such_data_set")
    with pytest.raises(data.DataConfigError, match="no_such_data_set"):
        sources.prepare_source(config)


def test_where_the_data_come_from_is_apart_from_how_batches_are_made():
    config = data.get_config("none", source="in_memory")
    with pytest.raises(
        data.DataConfigError,
        match=r"source must be one of .*got 'in_memory': change it to .* how batches are made is pipeline",
    ):
        data.open_source(config)
    config = data.get_config("none", source="tfds", name="cifar10", pipeline="in_memory")
    with pytest.raises(data.DataConfigError, match=r'a tfds data set is read by tf.data: set pipeline="tf_data"'):
        data.open_source(config)
    config = data.get_config("none", pipeline="arrays")
    with pytest.raises(data.DataConfigError, match=r"pipeline must be one of \['tf_data', 'in_memory'\]"):
        data.open_source(config)
    assert isinstance(data.open_source(data.get_config("none", pipeline="in_memory")), data.ArraySource)


def test_prepare_builds_a_tfds_data_set_and_says_what_is_missing(tmp_path, capsys):
    from qkv_vit.data import prepare

    assert prepare.main(["sklearn_digits", "--data_dir", str(tmp_path)]) == 0
    assert "sklearn_digits is prepared" in capsys.readouterr().out
    config = data.get_config("none", source="tfds", name="sklearn_digits")
    config.data_dir = str(tmp_path)
    assert data.open_source(config).info.train_examples == 1437
    manual = tmp_path / "manual"
    assert prepare.main(["imagenet2012", "--data_dir", str(tmp_path), "--manual_dir", str(manual)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: preparing 'imagenet2012'") and str(manual) in error and "\n" not in error
    assert prepare.main(["imagenet2013", "--data_dir", str(tmp_path)]) == 2
    assert "Dataset imagenet2013 not found" in capsys.readouterr().err


def test_prepare_writes_an_image_folder_the_in_memory_pipeline_reads(tmp_path, capsys):
    from qkv_vit.data import prepare

    folder = tmp_path / "digits"
    (tmp_path / "digits.partial" / "train").mkdir(parents=True)  # an earlier attempt cut short: written again
    assert prepare.main(["sklearn_digits", "--data_dir", str(tmp_path / "tfds"), "--image_folder", str(folder)]) == 0
    assert f"{folder}: train 1,437, test 360 images written" in capsys.readouterr().out
    assert not (tmp_path / "digits.partial").exists()
    assert sorted(p.name for p in (folder / "train").iterdir()) == [str(digit) for digit in range(10)]
    config = data.get_config("none", source="image_folder", pipeline="in_memory")
    config.update(path=str(folder), image_size=8, cache_dir=str(tmp_path / "cache"))
    source = data.open_source(config)
    assert source.info.train_examples == 1437 and source.info.num_classes == 10
    tfds_config = data.get_config("none", source="tfds", name="sklearn_digits")
    tfds_config.update(data_dir=str(tmp_path / "tfds"), image_size=8)
    ours = next(iter(data.open_source(config).eval_batches(360)))  # the same pixels as tfds's arrays (PNG)
    theirs = next(iter(data.open_source(tfds_config).eval_batches(360)))
    assert sorted(map(bytes, ours["image"])) == sorted(map(bytes, theirs["image"]))
    (folder / "train" / "0").rename(folder / "train" / "zero")  # a folder that exists is kept as it is
    assert prepare.main(["sklearn_digits", "--data_dir", str(tmp_path / "tfds"), "--image_folder", str(folder)]) == 0
    assert "already there, kept" in capsys.readouterr().out and (folder / "train" / "zero").exists()


def test_a_missing_image_folder_is_an_error_that_says_how_to_make_one(tmp_path):
    config = data.get_config("none", source="image_folder", pipeline="in_memory")
    config.update(path=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(data.DataConfigError, match=r"does not exist: give data.path a folder of") as error:
        data.open_source(config)
    assert "python -m qkv_vit.data.prepare cifar10 --image_folder PATH" in str(error.value)


@pytest.mark.parametrize(
    "name,command",
    [
        ("cifar10", "python -m qkv_vit.data.prepare cifar10 --data_dir {d}"),
        ("stl10", "python -m qkv_vit.data.prepare stl10 --data_dir {d}"),
        (
            "imagenet2012",
            "python -m qkv_vit.data.prepare imagenet2012 --data_dir {d} --manual_dir {d}/downloads/manual",
        ),
    ],
)
def test_error_unprepared_tfds_data_set_shows_the_command(tmp_path, name, command):
    config = data.get_config("xcit", source="tfds", name=name)
    config.data_dir = str(tmp_path)
    with pytest.raises(data.DataConfigError, match="not prepared") as error:
        sources.prepare_source(config)
    assert command.format(d=tmp_path) in str(error.value)
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").iterdir())  # downloaded nothing


def test_error_batch_size_not_divisible(cache_dir):
    config = digits_config(cache_dir)
    with pytest.raises(data.DataConfigError, match="not divisible by the process count 4"):
        data.open_source(config).train_batches(30, process_index=0, process_count=4, local_device_count=1, seed=0)
    with pytest.raises(data.DataConfigError, match="not divisible by the 4 local devices"):
        data.open_source(config).eval_batches(30, process_index=0, process_count=1, local_device_count=4)
    fix = (
        r"larger than the 1437 train examples .*: give a global batch of at most 1437 \(--config.global_batch_size=1437"
    )
    with pytest.raises(data.DataConfigError, match=fix):
        data.open_source(config).train_batches(4096, process_index=0, process_count=1, local_device_count=1, seed=0)
    config.pipeline = "in_memory"
    with pytest.raises(data.DataConfigError, match=fix):
        next(
            data.open_source(config).train_batches(4096, process_index=0, process_count=1, local_device_count=1, seed=0)
        )


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("bad_files", "ignore", "bad_files"),
        ("repeated_augmentation", 0, "repeated_augmentation"),
        ("num_classes", 5, "num_classes=5"),
    ],
)
def test_error_bad_config_values(cache_dir, field, value, message):
    with pytest.raises(data.DataConfigError, match=message):
        sources.prepare_source(digits_config(cache_dir, **{field: value}))


def test_error_bad_augment_values():
    config = data.get_config("xcit")
    config.augment.erasing_prob = 1.5
    with pytest.raises(data.DataConfigError, match="erasing_prob"):
        data.validate_config(config)
    with pytest.raises(data.DataConfigError, match="preset"):
        data.get_config("heavy")


def test_presets_carry_the_recipes():
    xcit = data.get_config("xcit")
    assert (xcit.image_size, xcit.repeated_augmentation, xcit.crop_pct) == (224, 3, 1.0)
    assert (xcit.augment.randaugment_layers, xcit.augment.randaugment_magnitude) == (2, 9.0)
    assert (xcit.augment.erasing_prob, xcit.augment.mixup_alpha, xcit.augment.cutmix_alpha) == (0.25, 0.8, 1.0)
    assert xcit.augment.label_smoothing == 0.1 and xcit.augment.crop_scale == (0.08, 1.0)
    assert data.get_config("transfer").augment.erasing_prob == 0.0
    small = data.get_config("small")
    assert small.image_size == 32 and small.augment.randaugment_magnitude < 9


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QKV_VIT_CACHE", os.fspath(tmp_path))
    assert cache.default_cache_dir() == tmp_path


@pytest.mark.parametrize("pipeline", ["tf_data", "in_memory"])
def test_fewer_classes_than_the_data_set_has_is_an_error_on_either_pipeline(cache_dir, pipeline):
    config = digits_config(cache_dir)
    config.update(pipeline=pipeline, num_classes=5)
    with pytest.raises(data.DataConfigError, match=r"num_classes=5 is less than the 10 classes of the offline digits"):
        data.open_source(config)


def test_only_image_classification_data_sets_are_written_as_image_folders():
    from types import SimpleNamespace

    import tensorflow_datasets as tfds

    from qkv_vit.data import prepare

    def builder(**features):
        return SimpleNamespace(name="x", info=SimpleNamespace(features=tfds.features.FeaturesDict(features)))

    image = tfds.features.Image(shape=(8, 8, 3))
    assert prepare.class_names(builder(image=image, label=tfds.features.ClassLabel(names=["a", "b"]))) == ["a", "b"]
    with pytest.raises(ValueError, match="not an image-classification data set .*: use --image_folder only"):
        prepare.class_names(builder(image=image, caption=tfds.features.Text()))
