"""Pure TF transforms on examples {'image': uint8 [H, W, 3], 'label': uint8 [H, W]}.

Random transforms are stateless: each takes a `seed` int32 [2] tensor, so the same seed gives the
same output whatever order tf.data runs them in. Labels are always resampled nearest-neighbour.
"""

from collections.abc import Sequence

import tensorflow as tf

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

Example = dict[str, tf.Tensor]


def _stack(example: Example) -> tf.Tensor:
    """Image and label as one uint8 [H, W, 4] tensor, so geometric ops move them together."""
    return tf.concat([example['image'], example['label'][..., None]], axis=-1)


def _unstack(stacked: tf.Tensor, example: Example) -> Example:
    return {**example, 'image': stacked[..., :3], 'label': stacked[..., 3]}


def random_scale(
    example: Example, seed: tf.Tensor, *, min_ratio: float, max_ratio: float
) -> Example:
    """Resizes by a ratio drawn uniformly from [min_ratio, max_ratio] (image bilinear)."""
    ratio = tf.random.stateless_uniform([], seed, minval=min_ratio, maxval=max_ratio)
    hw = tf.cast(tf.shape(example['label']), tf.float32)
    size = tf.cast(tf.round(hw * ratio), tf.int32)
    image = tf.image.resize(example['image'], size, method='bilinear')
    label = tf.image.resize(example['label'][..., None], size, method='nearest')
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return {**example, 'image': image, 'label': label[..., 0]}


def pad_to_size(example: Example, *, height: int, width: int, ignore_index: int = 255) -> Example:
    """Pads bottom/right to at least [height, width]: image with 0, label with ignore_index."""
    hw = tf.shape(example['label'])
    pad_h, pad_w = tf.maximum(height - hw[0], 0), tf.maximum(width - hw[1], 0)
    paddings = [[0, pad_h], [0, pad_w]]
    image = tf.pad(example['image'], paddings + [[0, 0]])
    label = tf.pad(example['label'], paddings, constant_values=ignore_index)
    return {**example, 'image': image, 'label': label}


def random_crop_or_pad(
    example: Example, seed: tf.Tensor, *, height: int, width: int, ignore_index: int = 255
) -> Example:
    """Pads (bottom/right, label with ignore_index) when smaller, then crops [height, width]."""
    padded = pad_to_size(example, height=height, width=width, ignore_index=ignore_index)
    stacked = tf.image.stateless_random_crop(_stack(padded), [height, width, 4], seed)
    return _unstack(stacked, example)


def random_flip(example: Example, seed: tf.Tensor) -> Example:
    """Flips image and label left-right together with probability 1/2."""
    stacked = tf.image.stateless_random_flip_left_right(_stack(example), seed)
    return _unstack(stacked, example)


def normalize(
    image: tf.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tf.Tensor:
    """uint8 image -> float32 (image - mean) / std, with mean and std in 0-255 units."""
    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std
