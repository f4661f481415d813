"""COCO box and mask AP of a Mask R-CNN state over a whole split, streamed batch by batch.

Each example of the split is resized to training's size (`instance_transforms.resized_size`)
in float, as `segjax.predict` and torchvision do, normalised and zero-padded to one (height,
width), run through the jitted eval forward in batches (the last one padded with invalid
rows); its detections are scaled back and their 28x28 mask probabilities pasted at the
ORIGINAL image size, where they meet the example's own annotations in
`coco_eval.CocoEvaluator` (pycocotools). Only RLEs are kept between batches.

On several processes each evaluates its own slice of the split (tfds.split_for_jax_process),
numbering images as one process would (their positions in the split), running the forward as
many times as the largest slice needs (the shorter ones padded with all-invalid batches: the
jitted forward is a collective); then every process's images and detections are all-gathered
(JSON bytes) and every process runs pycocotools on the union: the metrics equal the
one-process metrics exactly.

    metrics = coco_metrics_over_split(state, builder, config, mesh, detect_fn=detect_fn,
                                      min_size=64, max_size=64)
    # {'bbox/AP', 'bbox/AP50', 'bbox/AP75', 'bbox/APs', 'bbox/APm', 'bbox/APl', 'segm/...'}
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from segjax import config as config_lib
from segjax import sharding
from segjax.data import instance_transforms
from segjax.instance import coco_eval

# The keys of the eval forward's output that the evaluation reads (the pasted 'masks' are
# skipped: masks are pasted on the host at each image's original size instead).
OUTPUT_KEYS = ('boxes', 'scores', 'labels', 'valid', 'mask_probs')


def normalise(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """uint8 or float [..., 3] -> float32 (image - mean) / std, the mean/std on the 0..255 scale."""
    return (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(
        std, tf.float32)


def model_inputs(image: tf.Tensor, *, min_size: int, max_size: int, height: int, width: int,
                 mean: Sequence[float], std: Sequence[float]) -> dict[str, tf.Tensor]:
    """One uint8 image -> {'image' float32 [height, width, 3] resized (aspect kept), normalised,
    zero-padded bottom/right; 'image_size' int32 [2] its size before padding}."""
    size = instance_transforms.resized_size(tf.shape(image)[:2], min_size=min_size,
                                            max_size=max_size)
    # In float, not rounded back to uint8: the same input as segjax.predict and torchvision.
    resized = tf.image.resize(image, size, method='bilinear')
    check = tf.debugging.assert_less_equal(
        size, tf.constant([height, width]),
        message=f'a resized eval image is larger than the pad size ({height}, {width}) '
                '(config.data.eval_pad_size or config.data.crop_size); raise it or lower max_size')
    with tf.control_dependencies([check]):
        padded = tf.pad(normalise(resized, mean, std),
                        [[0, height - size[0]], [0, width - size[1]], [0, 0]])
    return {'image': tf.ensure_shape(padded, [height, width, 3]), 'image_size': size}


def eval_examples(builder, *, split: str, process_index: int = 0, process_count: int = 1,
                  **input_options) -> Iterator[dict]:
    """This process's slice of `split` in order: {'image', 'image_size' (model inputs),
    'original_size' [2], 'instances' (the example's own annotations, numpy)}."""
    host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                            process_count=process_count, drop_remainder=False)
    ds = builder.as_dataset(split=host_split, shuffle_files=False)

    def prepare(example: dict) -> dict:
        return {**model_inputs(example['image'], **input_options),
                'original_size': tf.shape(example['image'])[:2],
                'instances': example['instances']}

    options = tf.data.Options()
    options.deterministic = True
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def process_slices(builder, split: str, process_count: int) -> list[np.ndarray]:
    """Per process, the positions (0-based, in the one-process read order of `split`) of the
    examples its slice (tfds.split_for_jax_process, drop_remainder=False) reads, in its order.

    tfds splits each '+'-joined part of a split evenly on its own, so a process's slice of
    'a+b' is its share of a, then its share of b: contiguous only for a one-part split."""
    positions: list[list[np.ndarray]] = [[] for _ in range(process_count)]
    offset = 0
    for part in (p.strip() for p in split.split('+')):
        start = offset
        for process, share in enumerate(tfds.even_splits(part, n=process_count,
                                                         drop_remainder=False)):
            size = builder.info.splits[share].num_examples
            positions[process].append(np.arange(start, start + size))
            start += size
        offset += builder.info.splits[part].num_examples
    slices = [np.concatenate(p) for p in positions]
    for process, positions_of in enumerate(slices):
        host_split = tfds.split_for_jax_process(split, process_index=process,
                                                process_count=process_count, drop_remainder=False)
        if len(positions_of) != builder.info.splits[host_split].num_examples:
            raise ValueError(f'split {split!r}: process {process} of {process_count} reads '
                             f'{builder.info.splits[host_split].num_examples} examples, expected '
                             f'{len(positions_of)} from an even split of each part (has tfds '
                             'changed how split_for_jax_process divides a split?)')
    return slices


def padded_batches(examples: Iterator[dict], batch_size: int, num_batches: int,
                   canvas: tuple[int, int]) -> Iterator[tuple[dict, list]]:
    """Exactly num_batches (model batch {'image', 'image_size', 'valid'} of batch_size rows, the
    examples in it): rows past the last example are zero images of valid=False, whole batches
    of them once the examples run out (every process runs the forward as often as the others)."""
    examples = iter(examples)
    for _ in range(num_batches):
        chunk = list(itertools.islice(examples, batch_size))
        yield _stack(chunk, batch_size, canvas), chunk
    if next(examples, None) is not None:
        raise ValueError(f'more eval examples than {num_batches} batches of {batch_size} hold')


def _stack(chunk: list[dict], batch_size: int, canvas: tuple[int, int]) -> dict:
    images = np.zeros((batch_size, *canvas, 3), np.float32)
    # Padding rows: a zero image whose "unpadded" size is the whole canvas (any valid size).
    sizes = np.tile(np.int32(canvas), (batch_size, 1))
    for row, example in enumerate(chunk):
        images[row], sizes[row] = example['image'], example['image_size']
    return {'image': images, 'image_size': sizes, 'valid': np.arange(batch_size) < len(chunk)}


def this_process_rows(outputs: dict, mesh) -> dict[str, np.ndarray]:
    """The rows of the forward's batch-sharded outputs that this process fed, as numpy."""
    if jax.process_count() == 1:
        return jax.device_get(outputs)  # every row of the global outputs is this process's
    return {key: sharding.to_local(value, mesh) for key, value in outputs.items()}


def allgather_json(value) -> list:
    """`value` (JSON-able) of every process, in process order: its UTF-8 JSON all-gathered as
    bytes, each padded to the longest (JAX gathers arrays of one shape)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    if len(data) >= 2**31:  # the lengths travel as int32 (JAX without x64)
        raise ValueError(f'{len(data):,} bytes of JSON to gather from process '
                         f'{jax.process_index()}: expected under 2 GiB')
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(row[:length].tobytes()) for row, length in zip(gathered, lengths,
                                                                       strict=True)]


def detect(variables: dict, images: jax.Array, image_sizes: jax.Array, *, model) -> dict:
    """The eval forward without the full-canvas mask paste: OUTPUT_KEYS, batched."""
    outputs = model.clone(paste_masks=False).apply(variables, images, image_sizes)
    return {key: outputs[key] for key in OUTPUT_KEYS}


def pad_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """The eval canvas: config.data.eval_pad_size, else config.data.crop_size (multiples of 32)."""
    size = tuple(config.data.eval_pad_size or config.data.crop_size)
    if len(size) != 2 or any(int(s) % 32 for s in size):
        raise config_lib.ConfigError(
            f'config.data.eval_pad_size / crop_size = {size}: Mask R-CNN needs (height, width) '
            'multiples of 32')
    return int(size[0]), int(size[1])


def coco_evaluator_over_split(state, builder, config: ml_collections.ConfigDict, mesh, *,
                              detect_fn, min_size: int, max_size: int) -> coco_eval.CocoEvaluator:
    """A CocoEvaluator holding every image of config.data.eval_split with `state`'s detections,
    on every process (see `coco_metrics_over_split`)."""
    height, width = pad_size(config)
    split = config.data.eval_split
    process_index, process_count = jax.process_index(), jax.process_count()
    slices = process_slices(builder, split, process_count)
    if not sum(map(len, slices)):
        raise ValueError(f'config.data.eval_split={split!r} has no examples to evaluate')
    batch_size = sharding.local_batch_size(config.eval_batch_size, 'eval_batch_size')
    # The jitted forward is a collective: every process runs it as often as the longest slice.
    num_batches = max(-(-len(positions) // batch_size) for positions in slices)
    examples: Iterator[dict] = iter(())  # tfds cannot read an empty slice (more processes
    if len(slices[process_index]):       # than examples): such a process runs padding only
        examples = eval_examples(builder, split=split, process_index=process_index,
                                 process_count=process_count, min_size=min_size,
                                 max_size=max_size, height=height, width=width,
                                 mean=tuple(config.data.mean), std=tuple(config.data.std))
    # Ids as one process numbers the split (1, 2, ... in read order), so the metrics are equal.
    image_ids = iter((slices[process_index] + 1).tolist())
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    evaluator = coco_eval.CocoEvaluator(config.data.num_classes)
    for batch, chunk in padded_batches(examples, batch_size, num_batches, (height, width)):
        inputs = sharding.to_global({'image': batch['image'], 'image_size': batch['image_size']},
                                    mesh)
        outputs = this_process_rows(
            detect_fn(variables, inputs['image'], inputs['image_size']), mesh)
        for row, example in enumerate(chunk):
            image_id = next(image_ids)
            evaluator.add_ground_truth(image_id, example['instances'], example['original_size'])
            detections = coco_eval.detections_at_original_size(
                {k: v[row] for k, v in outputs.items()}, batch['image_size'][row],
                example['original_size'])
            evaluator.add_detections(image_id, **detections)
    if next(image_ids, None) is not None:
        raise ValueError(f'config.data.eval_split={split!r}: process {process_index} read fewer '
                         f'examples than the {len(slices[process_index])} its slice holds')
    if process_count == 1:
        return evaluator
    return coco_eval.CocoEvaluator.merged(config.data.num_classes,
                                          allgather_json(evaluator.export()))


def coco_metrics_over_split(state, builder, config: ml_collections.ConfigDict, mesh, *,
                            detect_fn, min_size: int, max_size: int) -> dict[str, float]:
    """{'bbox/AP', ..., 'segm/APl'} of `state`'s params/batch_stats on config.data.eval_split,
    the same on every process and for any number of processes.

    detect_fn: jitted (variables, images, image_sizes) -> `detect`'s dict (built once by the
    trainer, so evaluations during training reuse its compilation)."""
    return coco_evaluator_over_split(state, builder, config, mesh, detect_fn=detect_fn,
                                     min_size=min_size, max_size=max_size).summarize()
