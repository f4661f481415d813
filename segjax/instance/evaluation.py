"""COCO box and mask AP of a Mask R-CNN state over a whole split, streamed batch by batch.

Each example of the split is resized to training's size (`instance_transforms.resized_size`)
in float, as `segjax.predict` and torchvision do, normalised and zero-padded to one (height,
width), run through the jitted eval forward in batches (the last one padded with invalid
rows); its detections are scaled back and their 28x28 mask probabilities pasted at the
ORIGINAL image size, where they meet the example's own annotations in
`coco_eval.CocoEvaluator` (pycocotools). Only RLEs are kept between batches.

    metrics = coco_metrics_over_split(state, builder, config, mesh, model=model,
                                      min_size=64, max_size=64)
    # {'bbox/AP', 'bbox/AP50', 'bbox/AP75', 'bbox/APs', 'bbox/APm', 'bbox/APl', 'segm/...'}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

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


def padded_batches(examples: Iterator[dict], batch_size: int) -> Iterator[tuple[dict, list]]:
    """(model batch {'image', 'image_size', 'valid'} of exactly batch_size rows, the examples in
    it): the last batch is padded with zero images of valid=False."""
    chunk: list[dict] = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == batch_size:
            yield _stack(chunk, batch_size), chunk
            chunk = []
    if chunk:
        yield _stack(chunk, batch_size), chunk


def _stack(chunk: list[dict], batch_size: int) -> dict:
    fill = batch_size - len(chunk)
    images = np.stack([e['image'] for e in chunk])
    sizes = np.stack([e['image_size'] for e in chunk]).astype(np.int32)
    # Padding rows: a zero image whose "unpadded" size is the whole canvas (any valid size).
    images = np.concatenate([images, np.zeros((fill, *images.shape[1:]), images.dtype)])
    sizes = np.concatenate([sizes, np.tile(np.int32(images.shape[1:3]), (fill, 1))])
    return {'image': images, 'image_size': sizes,
            'valid': np.arange(batch_size) < len(chunk)}


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


def coco_metrics_over_split(state, builder, config: ml_collections.ConfigDict, mesh, *,
                            detect_fn, min_size: int, max_size: int) -> dict[str, float]:
    """{'bbox/AP', ..., 'segm/APl'} of `state`'s params/batch_stats on config.data.eval_split.

    detect_fn: jitted (variables, images, image_sizes) -> `detect`'s dict (built once by the
    trainer, so evaluations during training reuse its compilation)."""
    if jax.process_count() > 1:
        raise config_lib.ConfigError(
            'COCO evaluation of an instance experiment runs in one process (pycocotools needs '
            'every detection in one place; gathering them across hosts is not written yet): '
            'evaluate the checkpoint with python -m segjax.evaluate on one host')
    height, width = pad_size(config)
    examples = eval_examples(builder, split=config.data.eval_split, min_size=min_size,
                             max_size=max_size, height=height, width=width,
                             mean=tuple(config.data.mean), std=tuple(config.data.std))
    batch_size = sharding.local_batch_size(config.eval_batch_size, 'eval_batch_size')
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    evaluator = coco_eval.CocoEvaluator(config.data.num_classes)
    image_id = 0
    for batch, chunk in padded_batches(examples, batch_size):
        inputs = sharding.to_global({'image': batch['image'], 'image_size': batch['image_size']},
                                    mesh)
        # One process (checked above): every row of the global outputs is this process's.
        outputs = jax.device_get(detect_fn(variables, inputs['image'], inputs['image_size']))
        for row, example in enumerate(chunk):
            image_id += 1
            evaluator.add_ground_truth(image_id, example['instances'], example['original_size'])
            detections = coco_eval.detections_at_original_size(
                {k: v[row] for k, v in outputs.items()}, batch['image_size'][row],
                example['original_size'])
            evaluator.add_detections(image_id, **detections)
    if image_id == 0:
        raise ValueError(f'config.data.eval_split={config.data.eval_split!r} has no examples '
                         'to evaluate')
    return evaluator.summarize()
