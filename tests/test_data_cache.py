"""The data cache (qkv_vit/data/cache.py) and the sources that fill it: entries keyed by what identifies their
content, built in temporaries that never outlive their builder, checked for damage when opened, and a full or
read-only cache disk reported as one StorageError with the fix."""

import errno
import fcntl
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from qkv_vit import data
from qkv_vit.data import cache, folders, image_folder
from qkv_vit.data.testing import write_image_folder, write_tar
from qkv_vit.errors import StorageError
from qkv_vit.interrupts import Interrupted

FOLDER = {"train": {"ant": 3, "bee": 3}, "test": {"ant": 1, "bee": 1}}


def memory_config(path, cache_dir):
    config = data.get_config("none", source="image_folder", pipeline="in_memory")
    config.path, config.cache_dir = str(path), str(cache_dir)
    return config


def temporaries(cache_dir):
    return sorted(p.name for p in cache_dir.rglob(f"{cache.TEMPORARY_PREFIX}*"))


# ---- keys ----


def test_archives_alike_in_name_size_and_time_but_not_in_place_or_content_have_their_own_keys(tmp_path):
    first, second = tmp_path / "fold1" / "images.tar", tmp_path / "fold2" / "images.tar"
    for archive, byte in ((first, b"a"), (second, b"b")):
        archive.parent.mkdir()
        archive.write_bytes(byte * 4096)
        os.utime(archive, ns=(10**18, 10**18))
    assert folders.tar_key(first) != folders.tar_key(second)
    before = folders.tar_key(first)
    first.write_bytes(b"c" * 4096)  # replaced in place by another archive of the same size, then the same mtime
    os.utime(first, ns=(10**18, 10**18))
    assert folders.tar_key(first) != before


def test_two_archives_of_one_name_size_and_time_train_on_their_own_images(tmp_path):
    """Two folds packed as fold?/images.tar, of equal size and mtime: each gets its own classes and images."""
    for fold, classes in (("fold1", ("ant", "bee")), ("fold2", ("cat", "dog"))):
        write_image_folder(
            tmp_path / fold / "images", {"train": dict.fromkeys(classes, 2), "test": dict.fromkeys(classes, 1)}
        )
        write_tar(tmp_path / fold / "images", tmp_path / fold / "images.tar")
        os.utime(tmp_path / fold / "images.tar", ns=(10**18, 10**18))
    sizes = {(tmp_path / fold / "images.tar").stat().st_size for fold in ("fold1", "fold2")}
    assert len(sizes) == 1  # the case that collided: name, size and mtime alike
    first = image_folder.prepare_image_folder(tmp_path / "fold1" / "images.tar", tmp_path / "cache")
    second = image_folder.prepare_image_folder(tmp_path / "fold2" / "images.tar", tmp_path / "cache")
    assert (first.class_names, second.class_names) == (["ant", "bee"], ["cat", "dog"])
    memory = [data.open_source(memory_config(tmp_path / f"fold{n}" / "images.tar", tmp_path / "cache")) for n in (1, 2)]
    assert [source.info.class_names for source in memory] == [["ant", "bee"], ["cat", "dog"]]


# ---- temporaries ----


def test_a_build_removes_its_temporary_however_it_ends_and_a_killed_builders_is_removed_later(tmp_path, caplog):
    entry = tmp_path / "cache" / "in_memory" / "entry"
    with pytest.raises(Interrupted):  # SIGTERM/SIGINT through main.py's handler
        with cache.building(entry, "testing") as temporary:
            (temporary / "half").write_text("x")
            raise Interrupted(15)
    assert temporaries(tmp_path / "cache") == []
    killed = entry.parent / f"{cache.TEMPORARY_PREFIX}entry-dead"  # a builder killed by SIGKILL: its lock is free
    killed.mkdir()
    (killed / cache.OWNER).write_text("12345\n")  # the pid its builder wrote once it held the lock
    live = entry.parent / f"{cache.TEMPORARY_PREFIX}entry-live"  # another process building right now
    live.mkdir()
    just_made = entry.parent / f"{cache.TEMPORARY_PREFIX}entry-new"  # made, its owner file not yet locked
    just_made.mkdir()
    (just_made / cache.OWNER).write_text("")
    with open(live / cache.OWNER, "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        owner.write("1\n")
        owner.flush()
        with caplog.at_level(logging.WARNING), cache.building(entry, "testing"):
            pass
        assert temporaries(tmp_path / "cache") == [live.name, just_made.name]
    assert f"Removing {killed}: a data cache entry left unfinished by a process that was killed" in caplog.text


# ---- storage ----


def test_a_full_disk_while_decoding_is_one_storage_error_with_the_fix_and_leaves_nothing(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "images", FOLDER)
    real_save = np.save

    def half_then_full(file, array, *args, **kwargs):
        with open(file, "wb") as f:
            f.write(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(np, "save", half_then_full)
    config = memory_config(tmp_path / "images", tmp_path / "cache")
    with pytest.raises(StorageError) as raised:
        data.open_source(config)
    message = str(raised.value)
    assert message.startswith(f"Writing the data cache failed while decoding {tmp_path / 'images'}: ")
    assert f"No space left on device in {tmp_path / 'cache' / 'in_memory'}" in message
    assert "--config.data.cache_dir=DIR (or the environment variable QKV_VIT_CACHE=DIR)" in message
    assert temporaries(tmp_path / "cache") == [] and list((tmp_path / "cache" / "in_memory").iterdir()) == []
    monkeypatch.setattr(np, "save", real_save)
    assert data.open_source(config).info.train_examples == 6


def test_a_read_only_cache_while_converting_is_the_same_error_from_inside_tensorflow(tmp_path, monkeypatch):
    import tensorflow as tf

    write_image_folder(tmp_path / "images", FOLDER)

    def read_only(folder, work, bad_files):
        raise tf.errors.PermissionDeniedError(None, None, f"{work}/x.tfrecord; Read-only file system")

    monkeypatch.setattr(image_folder, "_build", read_only)
    with pytest.raises(StorageError, match=r"while converting .*: Read-only file system in .*QKV_VIT_CACHE=DIR"):
        image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache")
    assert temporaries(tmp_path / "cache") == []


# ---- damage ----


def test_a_decoded_entry_cut_short_is_found_when_opened_and_decoded_again(tmp_path, caplog):
    write_image_folder(tmp_path / "images", FOLDER)
    config = memory_config(tmp_path / "images", tmp_path / "cache")
    expected = np.array(data.open_source(config).splits["train"].images)
    (entry,) = (tmp_path / "cache" / "in_memory").iterdir()
    sizes = json.loads((entry / cache.SIZES).read_text())
    assert sizes["train.images.npy"] == (entry / "train.images.npy").stat().st_size
    with open(entry / "train.images.npy", "r+b") as f:  # an interrupted copy of the cache
        f.truncate(sizes["train.images.npy"] // 2)
    with caplog.at_level(logging.WARNING):
        source = data.open_source(config)
    assert f"The data cache entry {entry} is damaged (train.images.npy has" in caplog.text
    assert "decoding" in caplog.text and np.array_equal(source.splits["train"].images, expected)


def test_a_converted_entry_with_a_tfrecord_cut_short_is_converted_again(tmp_path, caplog):
    write_image_folder(tmp_path / "images", FOLDER)
    first = image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache")
    (record,) = [p for p in first.tfds_dir.rglob("*train.tfrecord*")]
    with open(record, "r+b") as f:
        f.truncate(record.stat().st_size - 10)
    with caplog.at_level(logging.WARNING):
        again = image_folder.prepare_image_folder(tmp_path / "images", tmp_path / "cache")
    assert "is damaged (" in caplog.text and "converting" in caplog.text
    assert again.num_examples == first.num_examples and cache.damage(again.label_map_file.parent) is None
    config = data.get_config("none", source="image_folder")
    config.path, config.cache_dir = str(tmp_path / "images"), str(tmp_path / "cache")
    batches = data.open_source(config).eval_batches(4, "train", process_index=0, process_count=1)
    assert sum(int(batch["mask"].sum()) for batch in batches) == 6


# ---- a signal during the conversion, on the command line ----

SIGNAL_IN_BUILD = textwrap.dedent("""
    import os, runpy, signal, sys, time
    from qkv_vit.data import image_folder
    def build(folder, work, bad_files):
        (work / "half-written").write_text("x")
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
        time.sleep(60)
    image_folder._build = build
    sys.argv = ["qkv_vit.main", *sys.argv[1:]]
    runpy.run_module("qkv_vit.main", run_name="__main__")
""")


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_conversion_stops_with_143_one_line_and_no_temporary(tmp_path, signal_name):
    write_image_folder(tmp_path / "images", FOLDER)
    command = [
        sys.executable,
        "-c",
        SIGNAL_IN_BUILD,
        f"--config=configs/cifar10.py:runlocal,path={tmp_path / 'images'}",
    ]
    command += [f"--workdir={tmp_path / 'run'}", f"--config.data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SIGNAL": signal_name}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr
    assert f"Stopped by {signal_name} outside the train loop" in result.stderr.splitlines()[-1]
    assert temporaries(tmp_path / "cache") == [] and not list((tmp_path / "cache" / "image_folder").iterdir())
