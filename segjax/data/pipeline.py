"""tf.data pipelines: a TFDS builder -> this host's slice -> numpy batches.

Train (infinite, deterministic, resumable):
  host slice -> cache encoded -> shuffle (new order each epoch) -> repeat -> enumerate ->
  skip(start_step * batch) -> parallel decode + augment seeded by the element's counter -> batch.
Eval (finite, every host yields the same number of batches):
  host slice -> decode -> pad to size -> + invalid filler examples -> batch.

Batches are dicts of numpy arrays: 'image' float32 [b, h, w, 3] (normalised), 'label' int32
[b, h, w] (255 = ignore) and, for eval, 'valid' bool [b].
"""

import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import transforms
from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

Batch = dict[str, np.ndarray]


def _read_encoded(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """The split's {'image', 'label'} as encoded bytes, in a fixed order."""
    skip = tfds.decode.SkipDecoding()
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={'image': skip, 'label': skip}
    )
    return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def _decode(builder: tfds.core.DatasetBuilder, encoded: dict) -> transforms.Example:
    """Encoded bytes -> {'image': uint8 [H, W, 3], 'label': uint8 [H, W]}."""
    features = builder.info.features
    image = features['image'].decode_example(encoded['image'])
    label = features['label'].decode_example(encoded['label'])
    return {'image': image, 'label': label[..., 0]}


def _to_model_inputs(
    example: transforms.Example, mean: Sequence[float], std: Sequence[float]
) -> transforms.Example:
    out = {**example, 'image': transforms.normalize(example['image'], mean, std)}
    out['label'] = tf.cast(example['label'], tf.int32)
    return out


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def train_batches(
    builder: tfds.core.DatasetBuilder,
    *,
    split: str,
    local_batch_size: int,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (1.0, 1.0),
    flip: bool = True,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> Iterator[Batch]:
    """Infinite augmented batches of this host's slice; from batch `start_step` on when resuming."""
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=True
    )
    num_examples = builder.info.splits[host_split].num_examples
    # Built afresh on every call, so the seeded shuffle replays the same epoch orders.
    ds = _read_encoded(builder, host_split).cache()
    ds = ds.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True).repeat()
    # Skipping encoded bytes is cheap; the counter keeps each element's augmentation seed.
    ds = ds.enumerate().skip(start_step * local_batch_size)
    host_seed = tf.constant([seed, process_index], tf.int64)

    def augment(index: tf.Tensor, encoded: dict) -> transforms.Example:
        key = tf.random.experimental.stateless_fold_in(host_seed, index)
        scale_key, crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        example = _decode(builder, encoded)
        if tuple(scale_range) != (1.0, 1.0):
            min_ratio, max_ratio = scale_range
            example = transforms.random_scale(
                example, scale_key, min_ratio=min_ratio, max_ratio=max_ratio
            )
        height, width = crop_size
        example = transforms.random_crop_or_pad(
            example, crop_key, height=height, width=width, ignore_index=ignore_index
        )
        if flip:
            example = transforms.random_flip(example, flip_key)
        return _to_model_inputs(example, mean, std)

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _deterministic(ds).as_numpy_iterator()


def num_eval_batches(
    builder: tfds.core.DatasetBuilder, split: str, local_batch_size: int, process_count: int
) -> int:
    """Batches every host yields for `split`: enough for the largest host slice."""
    num_examples = builder.info.splits[split].num_examples
    return math.ceil(math.ceil(num_examples / process_count) / local_batch_size)


def _filler_examples(count: int, height: int, width: int, ignore_index: int) -> tf.data.Dataset:
    """`count` invalid model inputs: zero image, all-ignore label, valid False."""
    filler = {
        'image': tf.zeros([height, width, 3], tf.float32),
        'label': tf.fill([height, width], ignore_index),
        'valid': tf.constant(False),
    }
    return tf.data.Dataset.from_tensors(filler).repeat(count)


def _eval_image_size(
    builder: tfds.core.DatasetBuilder, pad_size: tuple[int, int] | None
) -> tuple[int, int]:
    if pad_size is not None:
        return pad_size
    height, width, _ = builder.info.features['image'].shape
    if height is None or width is None:
        raise ValueError('Images of this dataset vary in size: pass pad_size to batch them.')
    return height, width


def eval_batches(
    builder: tfds.core.DatasetBuilder,
    *,
    split: str,
    local_batch_size: int,
    pad_size: tuple[int, int] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> Iterator[Batch]:
    """This host's slice of `split` once, in order, then invalid filler examples so that every
    host yields exactly `num_eval_batches(...)` batches."""
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=False
    )
    num_real = builder.info.splits[host_split].num_examples
    num_batches = num_eval_batches(builder, split, local_batch_size, process_count)
    height, width = _eval_image_size(builder, pad_size)

    def preprocess(encoded: dict) -> transforms.Example:
        example = _decode(builder, encoded)
        if pad_size is not None:
            example = transforms.pad_to_size(
                example, height=height, width=width, ignore_index=ignore_index
            )
        return {**_to_model_inputs(example, mean, std), 'valid': tf.constant(True)}

    ds = _read_encoded(builder, host_split)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    num_filler = num_batches * local_batch_size - num_real
    ds = ds.concatenate(_filler_examples(num_filler, height, width, ignore_index))
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _deterministic(ds).as_numpy_iterator()
