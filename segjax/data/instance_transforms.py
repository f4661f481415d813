"""Pure TF transforms for instance examples, ending in the fixed shapes `MaskRCNN` trains on.

An instance example is {'image' uint8 [H, W, 3], 'boxes' float32 [N, 4] (x1, y1, x2, y2 pixels),
'labels' int32 [N], 'masks' uint8 [N, H, W], 'is_crowd' bool [N]}; `from_tfds` makes one from a
segjax.data.instances (COCO-layout) example. The training recipe, torchvision's reference:
`from_tfds` -> `drop_crowd` -> `check_instance_labels` -> `resize_min_max` -> `random_flip`
-> `drop_degenerate_boxes` -> `pad_to_fixed` (images and masks to one size, instances to G rows
with 'valid'); `instance_train_transform` chains them.

Degenerate boxes: torchvision's GeneralizedRCNN raises in training on a box with x2 <= x1 or
y2 <= y1 and its reference data loader (coco_utils.ConvertCocoPolysToMask) filters those boxes
out first; here they are filtered out, as the data loader does, after resizing. Crowd
annotations are dropped for training as that loader does (COCO evaluation keeps them).
"""

import tensorflow as tf

Example = dict[str, tf.Tensor]
_PER_INSTANCE = ('boxes', 'labels', 'masks', 'is_crowd')


def from_tfds(example: Example) -> Example:
    """{'image', 'instances': {'bbox', 'label', 'mask', 'is_crowd'}} -> flat instance example."""
    instances = example['instances']
    return {
        'image': example['image'],
        'boxes': tf.cast(instances['bbox'], tf.float32),
        'labels': tf.cast(instances['label'], tf.int32),
        'masks': tf.cast(instances['mask'], tf.uint8),
        'is_crowd': tf.cast(instances['is_crowd'], tf.bool),
    }


def _keep(example: Example, keep: tf.Tensor) -> Example:
    """Only the instances where `keep` [N] is True."""
    return {**example, **{k: tf.boolean_mask(example[k], keep) for k in _PER_INSTANCE}}


def drop_crowd(example: Example) -> Example:
    """Removes crowd annotations (torchvision's reference trains on non-crowd instances only)."""
    return _keep(example, tf.logical_not(example['is_crowd']))


def check_instance_labels(example: Example, *, num_classes: int) -> Example:
    """Fails (InvalidArgumentError) if a label is outside 1..num_classes-1 (0 is background).

    Under jit a label >= num_classes gathers out of range and turns the RoI losses into nan, so
    the check happens here, where it can name the value.
    """
    labels = example['labels']
    bad = (labels < 1) | (labels >= num_classes)
    assertion = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [f'instance labels must be in 1..{num_classes - 1} (num_classes={num_classes}, 0 is '
         'background); offending values:', tf.boolean_mask(labels, bad)[:8]],
        summarize=8)
    with tf.control_dependencies([assertion]):
        return {**example, 'labels': tf.identity(labels)}


def resized_size(hw: tf.Tensor, *, min_size: int, max_size: int) -> tf.Tensor:
    """torchvision's GeneralizedRCNNTransform size: scale = min(min_size / short side,
    max_size / long side), size = floor(hw * scale) (int32 [2]). In float64 as torchvision's
    Python floats: float32 lands a pixel short for ~10 % of sizes (427x640 at 64/96: 63x95)."""
    hwf = tf.cast(hw, tf.float64)
    scale = tf.minimum(min_size / tf.reduce_min(hwf), max_size / tf.reduce_max(hwf))
    return tf.maximum(tf.cast(tf.floor(hwf * scale), tf.int32), 1)


def resize_min_max(example: Example, *, min_size: int, max_size: int) -> Example:
    """Resizes keeping the aspect ratio (see `resized_size`): image bilinear, masks nearest,
    boxes scaled by new size / old size per axis (torchvision's resize_boxes)."""
    hw = tf.shape(example['image'])[:2]
    size = resized_size(hw, min_size=min_size, max_size=max_size)
    image = tf.image.resize(example['image'], size, method='bilinear')
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    # Masks as a batch of one-channel images (N may be 0; zero channels would be refused).
    masks = tf.image.resize(example['masks'][..., None], size, method='nearest')[..., 0]
    ratio = tf.cast(size, tf.float32) / tf.cast(hw, tf.float32)  # (ry, rx)
    boxes = example['boxes'] * tf.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
    return {**example, 'image': image, 'masks': masks, 'boxes': boxes}


def flip_left_right(example: Example) -> Example:
    """Mirrors image and masks; boxes become (W - x2, y1, W - x1, y2)."""
    width = tf.cast(tf.shape(example['image'])[1], tf.float32)
    x1, y1, x2, y2 = tf.unstack(example['boxes'], axis=-1)
    return {**example, 'image': tf.reverse(example['image'], [1]),
            'masks': tf.reverse(example['masks'], [2]),
            'boxes': tf.stack([width - x2, y1, width - x1, y2], axis=-1)}


def random_flip(example: Example, seed: tf.Tensor) -> Example:
    """`flip_left_right` with probability 1/2 (stateless: the same seed, the same coin)."""
    flip = tf.random.stateless_uniform([], seed, minval=0, maxval=1.0) < 0.5
    return tf.cond(flip, lambda: flip_left_right(example), lambda: example)


def drop_degenerate_boxes(example: Example) -> Example:
    """Removes instances whose box has x2 <= x1 or y2 <= y1 (the reference loader's filter)."""
    x1, y1, x2, y2 = tf.unstack(example['boxes'], axis=-1)
    return _keep(example, (x2 > x1) & (y2 > y1))


def pad_to_fixed(example: Example, *, height: int, width: int, max_instances: int) -> Example:
    """Fixed shapes for the model: {'image' uint8 [height, width, 3] (zero-padded bottom/right),
    'image_size' int32 [2] (unpadded h, w), 'boxes' [G, 4], 'labels' int32 [G], 'masks' uint8
    [G, height, width], 'valid' bool [G]}, G = max_instances; padding rows are zero and invalid.
    Fails if the image is larger than height x width or has more than G instances."""
    hw = tf.shape(example['image'])[:2]
    count = tf.shape(example['labels'])[0]
    checks = [
        tf.debugging.assert_less_equal(
            hw, tf.constant([height, width]),
            message=f'image larger than the pad size ({height}, {width}); raise it or lower '
                    'max_size'),
        tf.debugging.assert_less_equal(
            count, max_instances,
            message=f'more instances than max_instances={max_instances}; raise max_instances'),
    ]
    with tf.control_dependencies(checks):
        pad_h, pad_w, pad_n = height - hw[0], width - hw[1], max_instances - count
    image = tf.pad(example['image'], [[0, pad_h], [0, pad_w], [0, 0]])
    masks = tf.pad(example['masks'], [[0, pad_n], [0, pad_h], [0, pad_w]])
    return {
        'image': tf.ensure_shape(image, [height, width, 3]),
        'image_size': tf.cast(hw, tf.int32),
        'boxes': tf.ensure_shape(tf.pad(example['boxes'], [[0, pad_n], [0, 0]]),
                                 [max_instances, 4]),
        'labels': tf.ensure_shape(tf.pad(example['labels'], [[0, pad_n]]), [max_instances]),
        'masks': tf.ensure_shape(masks, [max_instances, height, width]),
        'valid': tf.ensure_shape(tf.range(max_instances) < count, [max_instances]),
    }


def instance_train_transform(example: Example, seed: tf.Tensor, *, num_classes: int,
                             min_size: int, max_size: int, height: int, width: int,
                             max_instances: int, flip: bool = True) -> Example:
    """A segjax.data.instances example -> fixed-shape training example (module docstring)."""
    example = check_instance_labels(drop_crowd(from_tfds(example)), num_classes=num_classes)
    example = resize_min_max(example, min_size=min_size, max_size=max_size)
    if flip:
        example = random_flip(example, seed)
    example = drop_degenerate_boxes(example)
    return pad_to_fixed(example, height=height, width=width, max_instances=max_instances)
