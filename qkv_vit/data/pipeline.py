"""Train and eval batches for one process of a (possibly multi-host) job, as dicts of numpy arrays.

Train: each process reads its own `tfds.split_for_jax_process` part of the train split. Epoch e of
process p shuffles its files and examples with seeds drawn from (seed, e, p), and example i of the
epoch is augmented with the stateless seed (seed(e, p), i). So the stream is a pure function of the
seed, and a job resumed at step k skips the encoded records of the batches it already consumed
(cheap: nothing is decoded) and then yields exactly the batches k, k+1, ... of a fresh stream.

Eval: every process gets the same number of batches; the last ones are padded with zero images
whose "mask" is 0, so each example of the split is counted exactly once, whatever the batch size.

Images leave as uint8 after the per-image augmentation (crop, flip, RandAugment, colour jitter): the
trainer's step normalizes, erases and mixes them on the device (qkv_vit.train.finishing), so the host
ships a quarter of float32's bytes and does no per-pixel float work. tf.data runs on a private thread pool
with one thread per op, as big_vision configures it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from qkv_vit.data import augment as augment_lib
from qkv_vit.data._tensorflow import tf
from qkv_vit.data.errors import batch_too_large
from qkv_vit.data.info import DatasetInfo
from qkv_vit.data.protocol import Batch, DataSource, Stream
from qkv_vit.data.sources import LABEL_SET_SIZE, PreparedSource, prepare_source

_EPOCH_OVERLAP = 8  # batches before an epoch ends at which the next epoch's pipeline starts warming up
# The seed streams of an epoch (_derive_seed): fixed numbers, so a stream's batches stay those of earlier versions.
EXAMPLE_STREAM, SHUFFLE_STREAM = 0, 2


@dataclasses.dataclass(frozen=True)
class TFDataSource(DataSource):
    """A DataSource whose batches tf.data makes on the host, from a prepared tfds builder (`sources.PreparedSource`:
    a tfds data set, an image folder or archive converted once, or the digits). Each process drops its last partial
    train batch."""

    prepared: PreparedSource
    config: ml_collections.ConfigDict  # config.data
    info: DatasetInfo

    def _steps_per_epoch(self, local_batch: int, process_count: int) -> int:
        return _train_steps(self.prepared, local_batch, 0, process_count)[1]

    def _train_batches(self, stream: Stream) -> Iterator[Batch]:
        """Augmented per image (crop, flip, RandAugment, colour jitter) for the device to finish."""
        split, steps = _train_steps(self.prepared, stream.local_batch, stream.process_index, stream.process_count)
        augment = _train_augmentation(self.config)

        def make_epoch(epoch: int, skip_batches: int) -> tf.data.Dataset:
            seeds = [
                _derive_seed(stream.seed, epoch, stream.process_index, purpose)
                for purpose in (EXAMPLE_STREAM, SHUFFLE_STREAM)
            ]
            return _train_epoch(
                self.prepared, self.config, split, stream.local_batch, steps, augment, seeds, skip_batches
            )

        return _endless(make_epoch, steps, stream.start_step)

    def _eval_batches(self, split: str, local_batch: int, process_index: int, process_count: int) -> EvalBatches:
        prepared, config = self.prepared, self.config
        prepared.check_split(split)
        parts = [
            tfds.split_for_jax_process(split, process_index=index, process_count=process_count)
            for index in range(process_count)
        ]
        # Every process runs as many batches as the largest part needs, so collective ops stay in step.
        num_batches = math.ceil(max(prepared.num_examples(part) for part in parts) / local_batch)
        preprocess = augment_lib.eval_preprocess(config)
        examples = prepared.read(parts[process_index], label_sets=True).map(
            lambda example: {**example, "image": preprocess(example["image"]), "mask": tf.constant(1.0)},
            num_parallel_calls=_parallel(config),
            deterministic=True,
        )
        size = config.image_size
        pad = {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0), "mask": tf.constant(0.0)}
        if prepared.label_set_feature is not None:  # ImageNet ReaL's relabelling (sources.LABEL_SET_FEATURES)
            pad["label_set"] = tf.fill([LABEL_SET_SIZE], -1)
        padding = tf.data.Dataset.from_tensors(pad).repeat()
        batches = examples.concatenate(padding).take(num_batches * local_batch).batch(local_batch)
        dataset = _with_options(batches.prefetch(config.prefetch))
        return EvalBatches(dataset, num_batches, prepared.num_examples(parts[process_index]))


def open_tf_data(config: ml_collections.ConfigDict) -> TFDataSource:
    """config.data's data set, prepared (a tfds data set, an image folder converted once, the digits) and served by
    tf.data; DataConfigError with the fix if it cannot be read."""
    prepared = prepare_source(config)
    return TFDataSource(prepared, config, prepared.info(config.num_classes))


def _train_steps(
    source: PreparedSource, local_batch: int, process_index: int, process_count: int
) -> tuple[tfds.typing.SplitArg, int]:
    # drop_remainder: every process gets floor(N / process_count) examples, so all run the same steps.
    split = tfds.split_for_jax_process(
        source.train_split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    steps = source.num_examples(split) // local_batch
    if steps == 0:
        examples = source.num_examples(split)
        where = f"each of the {process_count} processes reads from {source.description}"
        raise batch_too_large(f"Per-process batch size {local_batch}", examples, where, examples * process_count)
    return split, steps


def _derive_seed(seed: int, epoch: int, process_index: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one (epoch, process, purpose); 63 bits fit tf.int64."""
    state = np.random.SeedSequence([seed, epoch, process_index, stream]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _parallel(config: ml_collections.ConfigDict) -> int:
    return tf.data.AUTOTUNE if config.num_parallel_calls < 0 else config.num_parallel_calls


def _train_augmentation(config: ml_collections.ConfigDict) -> Callable:
    """The per-image augmentation, traced once and reused by every epoch's pipeline."""
    decoded = config.repeated_augmentation > 1  # see _train_epoch: each image is decoded once for its copies
    image_spec = tf.TensorSpec([None, None, 3], tf.uint8) if decoded else tf.TensorSpec([], tf.string)
    return tf.function(
        augment_lib.train_preprocess(config, decoded=decoded),
        input_signature=[image_spec, tf.TensorSpec([2], tf.int64)],
    )


def _train_epoch(
    prepared: PreparedSource,
    config: ml_collections.ConfigDict,
    split,
    local_batch: int,
    steps: int,
    augment: Callable,
    seeds: list[int],
    skip_batches: int,
) -> tf.data.Dataset:
    example_seed, shuffle_seed = seeds
    records = prepared.read(split, shuffle_seed=shuffle_seed)
    if config.shuffle_buffer > 1:
        records = records.shuffle(config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    records = _positions(records, config, steps * local_batch, skip_batches * local_batch)

    # The closure only calls an already-traced tf.function: nothing for AutoGraph to convert (and it warns).
    @tf.autograph.experimental.do_not_convert
    def augment_example(index: tf.Tensor, example: dict) -> dict:
        seed = tf.stack([tf.constant(example_seed, tf.int64), index])
        return {"image": augment(example["image"], seed), "label": example["label"], "position": index}

    batches = records.map(augment_example, num_parallel_calls=_parallel(config), deterministic=True)
    batches = batches.batch(local_batch, drop_remainder=True).map(
        functools.partial(_spread_copies, repeats=config.repeated_augmentation)
    )
    return _with_options(batches.prefetch(config.prefetch))


def _positions(records: tf.data.Dataset, config: ml_collections.ConfigDict, total: int, first: int) -> tf.data.Dataset:
    """(position in the epoch, example) for positions first .. total - 1 of the epoch's stream.

    Repeated augmentation (Hoffer et al.; DeiT/XCiT) puts each image `repeated_augmentation` times in a row, so
    in the same batch with different augmentations; the epoch keeps its length and sees fewer images. Each image
    is then decoded once for all its copies (1.15x the images/s of decoding per copy with 500x375 JPEGs,
    benchmarks/README.md), after the skipped records of a resumed epoch, which stay encoded.
    """
    repeats = config.repeated_augmentation
    if repeats == 1:
        return records.take(total).enumerate().skip(first)
    records = records.take(-(-total // repeats)).enumerate().skip(first // repeats)

    def decode(index: tf.Tensor, example: dict) -> tuple[tf.Tensor, dict]:
        return index, {"image": augment_lib.decode(example["image"]), "label": example["label"]}

    def copies(index: tf.Tensor, example: dict) -> tf.data.Dataset:
        positions = tf.data.Dataset.range(repeats).map(lambda copy: index * repeats + copy)
        return tf.data.Dataset.zip(positions, tf.data.Dataset.from_tensors(example).repeat(repeats))

    decoded = records.map(decode, num_parallel_calls=_parallel(config), deterministic=True)
    return decoded.flat_map(copies).skip(first % repeats).take(total - first)


def _spread_copies(batch: dict, repeats: int) -> dict:
    """The batch ordered by (copy, image) instead of (image, copy): the repeated-augmentation copies of an image,
    next to each other in the stream, end up a whole round of images apart. So each device's shard, each ghost
    BatchNorm group and each mixing pair holds distinct images where the batch allows, as XCiT's RASampler
    spreads an image's copies over different GPUs."""
    positions = batch.pop("position")
    if repeats == 1:
        return batch
    order = tf.argsort((positions % repeats) * 2**40 + positions // repeats, stable=True)
    return {key: tf.gather(value, order) for key, value in batch.items()}


def _with_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True  # same seed, same batches, whatever the thread timing
    # big_vision's settings: the pipeline's own thread pool, and no op that spreads itself over several threads
    # (parallelism comes from the parallel maps, which AUTOTUNE sizes within the pool).
    options.threading.private_threadpool_size = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )  # the cores this process may use (a SLURM task's, say), not the host's
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options)


def _endless(make_epoch: Callable[[int, int], tf.data.Dataset], steps: int, start_step: int) -> Iterator[Batch]:
    epoch, skip = divmod(start_step, steps)
    # Creating a tf.data iterator instantiates the augmentation graph (about a second on a small CPU),
    # so the next epoch's iterator is made in a background thread while this epoch's last batches go.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkv_vit_data")
    try:
        current = iter(tfds.as_numpy(make_epoch(epoch, skip)))
        while True:
            following = None
            for position in range(skip, steps):
                if following is None and steps - position <= _EPOCH_OVERLAP:
                    following = pool.submit(lambda e=epoch + 1: iter(tfds.as_numpy(make_epoch(e, 0))))
                yield next(current)
            current, epoch, skip = following.result(), epoch + 1, 0
    finally:
        pool.shutdown(wait=False)


class EvalBatches:
    """Eval batches of one process: re-iterable, each pass covers its part of the split once."""

    def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int):
        self.dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # real (unpadded) examples of this process

    def __iter__(self) -> Iterator[Batch]:
        return iter(tfds.as_numpy(self.dataset))

    def __len__(self) -> int:
        return self.num_batches
