"""tf.data pipelines: a TFDS builder -> this host's slice -> numpy batches.

Train (infinite, deterministic, resumable):
  host slice -> cache encoded -> shuffle (new order each epoch) -> repeat -> enumerate ->
  skip(start_step * batch) -> parallel decode + augment seeded by the element's counter -> batch.
  Augmentation (segjax.data.transforms, each step optional): label map -> random scale (of a
  base size) -> crop/pad (cat_max_ratio) -> flip -> rotation -> photometric -> normalise.
Eval (finite, every host yields the same number of batches):
  host slice -> decode -> label map -> (resize keeping the aspect ratio) -> pad to size ->
  + invalid filler examples -> batch.

A data set whose stored labels are not the training classes (Cityscapes labelIds) is mapped by
`label_map`, a 256-entry table (index = stored value, entry = class or ignore_index) applied in
the graph before augmentation (in the fused scale-and-crop of the recipe, on the crop window
only: the same result, cheaper). With `num_classes`, a label value that is neither a class nor
ignore_index after the map stops the pipeline with an error instead of being trained on (in
training it is checked on what reaches the model, the crop).

Batches are dicts of numpy arrays: 'image' float32 [b, h, w, 3] (normalised), 'label' int32
[b, h, w] (255 = ignore) and, for eval, 'valid' bool [b].

What is done to each example is a recipe (segjax.data.recipes, re-exported here: `TrainRecipe`,
`EvalRecipe`), built from config.data by `from_config` or by hand; which examples, how many and
in what order (split, batch size, seed, process) are the arguments of `train_batches` and
`eval_batches`:

  recipe = pipeline.TrainRecipe.from_config(config.data)   # or TrainRecipe(crop_size=(32, 32))
  batches = pipeline.train_batches(builder, recipe, split='train', local_batch_size=8, seed=0)

Semi-supervised training draws two train streams from one split: `labelled_split` picks the
labelled examples (a seeded share of the split), and `train_batches(examples=...)` reads only
those; the unlabelled stream (`with_labels=False`) never reads the stored labels and its batches
hold only 'image'.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import transforms
from segjax.data.recipes import EvalRecipe, TrainRecipe  # the arguments' types, re-exported

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------
# Reading and decoding.


def _read_encoded(
    builder: tfds.core.DatasetBuilder, split: str, keys: Sequence[str] = ('image', 'label')
) -> tf.data.Dataset:
    """The split's `keys` (of 'image', 'label') as encoded bytes, in a fixed order."""
    skip = tfds.decode.SkipDecoding()
    # No TFDS auto-cache: training caches explicitly, and a cached split read in part (the
    # first eval batch for summary images) makes tf.data warn on every evaluation.
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={'image': skip, 'label': skip},
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    return ds.map(lambda ex: {key: ex[key] for key in keys})


def _decode(builder: tfds.core.DatasetBuilder, encoded: dict) -> transforms.Example:
    """Encoded bytes -> {'image': uint8 [H, W, 3], 'label': uint8 [H, W]}."""
    features = builder.info.features
    image = features['image'].decode_example(encoded['image'])
    label = features['label'].decode_example(encoded['label'])
    return {'image': image, 'label': label[..., 0]}


def _decode_image(builder: tfds.core.DatasetBuilder, encoded: dict) -> transforms.Example:
    """Encoded image -> {'image': uint8 [H, W, 3], 'label': zeros uint8 [H, W]}: the stored label
    is never decoded; the zero label lets the same geometric transforms move the image."""
    image = builder.info.features['image'].decode_example(encoded['image'])
    return {'image': image, 'label': tf.zeros(tf.shape(image)[:2], tf.uint8)}


def _labels_for_training(
    example: transforms.Example,
    table: tf.Tensor | None,
    num_classes: int | None,
    ignore_index: int,
) -> transforms.Example:
    if table is not None:
        example = transforms.map_labels(example, table)
    if num_classes is not None:
        example = transforms.check_label_values(
            example, num_classes=num_classes, ignore_index=ignore_index)
    return example


def _table(label_map: Sequence[int] | None) -> tf.Tensor | None:
    return None if label_map is None else transforms.label_lookup_table(label_map)


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


def labelled_split(
    num_examples: int, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, unlabelled) example indices of a split of `num_examples`, each sorted int64.

    Disjoint and together 0..num_examples-1; labelled = the first round(fraction * num_examples)
    (halves up) of a permutation by numpy's Generator seeded with `seed`, so the same seed gives
    the same split. fraction = 1 leaves the unlabelled set empty.
    """
    if num_examples < 1:
        raise ValueError(
            f'labelled_split needs a split with examples, got num_examples={num_examples}')
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError('config.data.labelled_fraction must be in (0, 1] (the share of the train '
                         f'split whose labels are used), got {fraction!r}')
    num_labelled = math.floor(fraction * num_examples + 0.5)
    if num_labelled < 1:
        raise ValueError(
            f'config.data.labelled_fraction={fraction!r} labels none of the {num_examples} '
            f'examples: it must be at least {0.5 / num_examples:.3g} for one labelled example')
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[:num_labelled]), np.sort(order[num_labelled:])


def _process_share(
    examples: Sequence[int],
    *,
    split: str,
    num_examples: int,
    process_index: int,
    process_count: int,
    stream: str,
) -> np.ndarray:
    """This process's contiguous equal share of the sorted `examples`, the remainder dropped (as
    tfds.split_for_jax_process(drop_remainder=True) shares a whole split)."""
    indices = np.asarray(examples)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f'examples of the {stream} stream must be a flat sequence of integer '
                         f'indices into split {split!r}, got an array of {indices.dtype} '
                         f'{indices.shape}')
    indices = np.sort(indices)
    if indices.size and (indices[0] < 0 or indices[-1] >= num_examples):
        raise ValueError(f'examples of the {stream} stream must be indices in '
                         f'0..{num_examples - 1} (split {split!r}), got values '
                         f'{indices[0]}..{indices[-1]}')
    if np.any(indices[1:] == indices[:-1]):
        raise ValueError(f'examples of the {stream} stream repeat an index of split {split!r}: '
                         f'{np.unique(indices[1:][indices[1:] == indices[:-1]])[:10].tolist()}')
    per_process = indices.size // process_count
    if per_process == 0:
        raise ValueError(
            f'the {stream} stream is empty: {indices.size} examples of split {split!r} shared by '
            f'{process_count} process(es) leave none to process {process_index}'
            + ('' if stream == 'labelled' else
               ' (a labelled fraction of 1 leaves no unlabelled examples)'))
    return indices[process_index * per_process:(process_index + 1) * per_process]


def _host_examples(
    builder: tfds.core.DatasetBuilder,
    *,
    split: str,
    examples: Sequence[int] | None,
    process_index: int,
    process_count: int,
    with_labels: bool,
) -> tuple[tf.data.Dataset, int]:
    """This host's encoded examples (of the whole split, or of `examples`) and how many."""
    keys = ('image', 'label') if with_labels else ('image',)
    if examples is None:
        host_split = tfds.split_for_jax_process(
            split, process_index=process_index, process_count=process_count, drop_remainder=True
        )
        num_host_examples = builder.info.splits[host_split].num_examples
        return _read_encoded(builder, host_split, keys), num_host_examples
    num_examples = builder.info.splits[split].num_examples
    share = _process_share(
        examples, split=split, num_examples=num_examples, process_index=process_index,
        process_count=process_count, stream='labelled' if with_labels else 'unlabelled')
    keep = np.zeros(num_examples, bool)
    keep[share] = True
    keep = tf.constant(keep)
    # Indices are positions in the split's fixed read order; the filter keeps that order.
    ds = _read_encoded(builder, split, keys).enumerate().filter(lambda index, _: keep[index])
    return ds.map(lambda _, encoded: encoded), len(share)


def train_batches(
    builder: tfds.core.DatasetBuilder,
    recipe: TrainRecipe,
    *,
    split: str,
    local_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    examples: Sequence[int] | None = None,
    with_labels: bool = True,
) -> Iterator[Batch]:
    """Infinite batches of this host's slice augmented by `recipe`; from batch `start_step` on
    when resuming. The same arguments give the same batches (seed, process_index and each
    example's position in the stream seed its augmentation).

    examples: indices into `split` (its fixed TFDS order) to draw from instead of all of it (see
      `labelled_split`); each process takes an equal contiguous share of them, sorted, the
      remainder dropped. An empty share is an error naming the empty stream.
    with_labels: False (an unlabelled stream): stored labels are never read or decoded, the
      recipe's label_map and num_classes do not apply, crops are uniform (cat_max_ratio needs
      labels), and batches hold only 'image' -- with cat_max_ratio = 1, the same images as
      with_labels=True for the same examples and seed.
    """
    if not with_labels:  # nothing here may depend on the stored labels
        recipe = dataclasses.replace(recipe, label_map=None, num_classes=None, cat_max_ratio=1.0)
    ds, num_examples = _host_examples(
        builder, split=split, examples=examples, process_index=process_index,
        process_count=process_count, with_labels=with_labels)
    # Built afresh on every call, so the seeded shuffle replays the same epoch orders.
    ds = ds.cache()
    ds = ds.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True).repeat()
    # Skipping encoded bytes is cheap; the counter keeps each element's augmentation seed.
    ds = ds.enumerate().skip(start_step * local_batch_size)
    host_seed = tf.constant([seed, process_index], tf.int64)
    table = _table(recipe.label_map)
    height, width = recipe.crop_size
    min_ratio, max_ratio = recipe.scale_range
    ignore_index, num_classes = recipe.ignore_index, recipe.num_classes

    def augment(index: tf.Tensor, encoded: dict) -> transforms.Example:
        key = tf.random.experimental.stateless_fold_in(host_seed, index)
        scale_key, crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
        # Keys added later are folded in, so the three above (and today's batches) never change.
        rotate_key = tf.random.experimental.stateless_fold_in(key, 3)
        photometric_key = tf.random.experimental.stateless_fold_in(key, 4)
        example = _decode(builder, encoded) if with_labels else _decode_image(builder, encoded)
        if recipe.base_size is not None:  # map, scale and crop computing the window only
            example = transforms.random_scale_crop(
                example, scale_key, crop_key, min_ratio=min_ratio, max_ratio=max_ratio,
                base_size=recipe.base_size, height=height, width=width,
                ignore_index=ignore_index, cat_max_ratio=recipe.cat_max_ratio, label_map=table,
            )
        else:  # kept step by step, so that existing experiments reproduce bit for bit
            if table is not None:
                example = transforms.map_labels(example, table)
            if recipe.scale_range != (1.0, 1.0):
                example = transforms.random_scale(
                    example, scale_key, min_ratio=min_ratio, max_ratio=max_ratio
                )
            example = transforms.random_crop_or_pad(
                example, crop_key, height=height, width=width, ignore_index=ignore_index,
                cat_max_ratio=recipe.cat_max_ratio,
            )
        if num_classes is not None:  # what reaches the model; a window is cheaper to check
            example = transforms.check_label_values(
                example, num_classes=num_classes, ignore_index=ignore_index)
        if recipe.flip:
            example = transforms.random_flip(example, flip_key)
        if recipe.rotation:
            example = transforms.random_rotate(
                example, rotate_key, max_degrees=recipe.rotation, ignore_index=ignore_index
            )
        if recipe.photometric:
            example = transforms.photometric_distortion(example, photometric_key)
        inputs = _to_model_inputs(example, recipe.mean, recipe.std)
        return inputs if with_labels else {'image': inputs['image']}

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
        raise ValueError('Images of this dataset vary in size: set EvalRecipe.pad_size '
                         '(config.data.eval_pad_size) to batch them.')
    return height, width


def _check_fits(example: transforms.Example, height: int, width: int) -> transforms.Example:
    """Fails with a clear message when an image is larger than the eval pad size."""
    hw = tf.shape(example['label'])
    assertion = tf.debugging.Assert(
        (hw[0] <= height) & (hw[1] <= width),
        [f'an eval image is larger than pad_size=({height}, {width}); its size is', hw])
    with tf.control_dependencies([assertion]):
        return {**example, 'label': tf.identity(example['label'])}


def eval_batches(
    builder: tfds.core.DatasetBuilder,
    recipe: EvalRecipe,
    *,
    split: str,
    local_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """This host's slice of `split` once, in order, prepared by `recipe`, then invalid filler
    examples so that every host yields exactly `num_eval_batches(...)` batches.

    Each image is evaluated whole (or resized into the recipe's base_size) and padded to its
    pad_size with ignore_index, so padding never reaches the metrics.
    """
    host_split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count, drop_remainder=False
    )
    num_real = builder.info.splits[host_split].num_examples
    num_batches = num_eval_batches(builder, split, local_batch_size, process_count)
    height, width = _eval_image_size(builder, recipe.pad_size)
    table = _table(recipe.label_map)
    ignore_index = recipe.ignore_index

    def preprocess(encoded: dict) -> transforms.Example:
        example = _decode(builder, encoded)
        example = _labels_for_training(example, table, recipe.num_classes, ignore_index)
        if recipe.base_size is not None:
            example = transforms.resize_keep_ratio(example, base_size=recipe.base_size)
        if recipe.pad_size is not None:
            example = _check_fits(example, height, width)
            example = transforms.pad_to_size(
                example, height=height, width=width, ignore_index=ignore_index
            )
        return {**_to_model_inputs(example, recipe.mean, recipe.std), 'valid': tf.constant(True)}

    ds = _read_encoded(builder, host_split)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    num_filler = num_batches * local_batch_size - num_real
    ds = ds.concatenate(_filler_examples(num_filler, height, width, ignore_index))
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _deterministic(ds).as_numpy_iterator()
