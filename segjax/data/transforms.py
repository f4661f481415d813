"""Pure TF transforms on examples {'image': uint8 [H, W, 3], 'label': uint8 [H, W]}.

Random transforms are stateless: each takes a `seed` int32 [2] tensor, so the same seed gives the
same output whatever order tf.data runs them in. Images are resampled bilinearly, labels always
nearest-neighbour; pixels that a geometric transform brings in from outside the image are 0 in
the image and `ignore_index` in the label, so no transform ever invents a class.

The training recipe (mmsegmentation's, in the order the pipeline applies it): `map_labels`
(dataset label ids -> training ids) -> `random_scale` (ratio of a base size) ->
`random_crop_or_pad` (with `cat_max_ratio`) -> `random_flip` -> `random_rotate` ->
`photometric_distortion` -> `normalize`; the first three fused as `random_scale_crop`, which
computes only the crop window.
"""

import math
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


def _resize(example: Example, size: tf.Tensor) -> Example:
    """Image bilinear (rounded back to uint8), label nearest, to `size` int32 [2] = (h, w)."""
    image = tf.image.resize(example['image'], size, method='bilinear')
    label = tf.image.resize(example['label'][..., None], size, method='nearest')
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return {**example, 'image': image, 'label': label[..., 0]}


def _fit_factor(hw: tf.Tensor, base_size: Sequence[int]) -> tf.Tensor:
    """The largest factor keeping the aspect ratio with the long edge <= max(base_size) and the
    short edge <= min(base_size) (mmcv's `rescale_size` with keep_ratio=True)."""
    long_edge, short_edge = float(max(base_size)), float(min(base_size))
    return tf.minimum(long_edge / tf.reduce_max(hw), short_edge / tf.reduce_min(hw))


# ----------------------------------------------------------------------------------------------
# Labels.


def label_lookup_table(label_map: Sequence[int]) -> tf.Tensor:
    """A 256-entry uint8 lookup table (index = stored label value) as a constant tensor."""
    table = [int(v) for v in label_map]
    if len(table) != 256 or not all(0 <= v <= 255 for v in table):
        raise ValueError('label_map must have 256 entries, each in 0..255 (index = stored label '
                         f'value, entry = training label), got {len(table)} entries')
    return tf.constant(table, tf.uint8)


def map_labels(example: Example, table: tf.Tensor | Sequence[int]) -> Example:
    """Replaces every label value v by table[v] (e.g. Cityscapes labelIds -> trainIds)."""
    if not isinstance(table, tf.Tensor):
        table = label_lookup_table(table)
    return {**example, 'label': tf.gather(table, tf.cast(example['label'], tf.int32))}


def check_label_values(example: Example, *, num_classes: int, ignore_index: int = 255) -> Example:
    """Fails (InvalidArgumentError) if a label value is neither a class < num_classes nor
    ignore_index: a label set the model does not know is never silently trained on."""
    label = tf.cast(example['label'], tf.int32)
    bad = (label >= num_classes) & (label != ignore_index)
    assertion = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(bad)),
        [f'label values outside 0..{num_classes - 1} (and not ignore_index={ignore_index}); '
         'does this data set need a label_map? First offending values:',
         tf.boolean_mask(label, bad)[:8]],
        summarize=8)
    with tf.control_dependencies([assertion]):
        return {**example, 'label': tf.identity(example['label'])}


# ----------------------------------------------------------------------------------------------
# Geometry.


def random_scale(
    example: Example,
    seed: tf.Tensor,
    *,
    min_ratio: float,
    max_ratio: float,
    base_size: Sequence[int] | None = None,
) -> Example:
    """Resizes by a ratio drawn uniformly from [min_ratio, max_ratio] (image bilinear).

    Without `base_size` the ratio is of the image's own size. With base_size = (long, short)
    (mmsegmentation's `scale`, e.g. (2048, 512) for VOC, (2048, 1024) for Cityscapes), the image
    is first fitted, aspect ratio kept, into long x short, and the ratio is of that size.
    """
    ratio = tf.random.stateless_uniform([], seed, minval=min_ratio, maxval=max_ratio)
    hw = tf.cast(tf.shape(example['label']), tf.float32)
    if base_size is not None:
        ratio = ratio * _fit_factor(hw, base_size)
    size = tf.maximum(tf.cast(tf.round(hw * ratio), tf.int32), 1)
    return _resize(example, size)


def resize_keep_ratio(example: Example, *, base_size: Sequence[int]) -> Example:
    """Deterministic resize into base_size = (long, short), aspect ratio kept (eval)."""
    hw = tf.cast(tf.shape(example['label']), tf.float32)
    size = tf.maximum(tf.cast(tf.round(hw * _fit_factor(hw, base_size)), tf.int32), 1)
    return _resize(example, size)


def pad_to_size(example: Example, *, height: int, width: int, ignore_index: int = 255) -> Example:
    """Pads bottom/right to at least [height, width]: image with 0, label with ignore_index."""
    hw = tf.shape(example['label'])
    pad_h, pad_w = tf.maximum(height - hw[0], 0), tf.maximum(width - hw[1], 0)
    paddings = [[0, pad_h], [0, pad_w]]
    image = tf.pad(example['image'], paddings + [[0, 0]])
    label = tf.pad(example['label'], paddings, constant_values=ignore_index)
    return {**example, 'image': image, 'label': label}


def max_class_share(label: tf.Tensor, ignore_index: int = 255) -> tf.Tensor:
    """Pixels of the most frequent class / all non-ignored pixels (1.0 when none is valid)."""
    counts = tf.math.bincount(tf.reshape(tf.cast(label, tf.int32), [-1]), minlength=256,
                              maxlength=256, dtype=tf.int32)
    counts = tf.where(tf.range(256) == ignore_index, 0, counts)
    total = tf.reduce_sum(counts)
    share = tf.cast(tf.reduce_max(counts), tf.float32) / tf.cast(tf.maximum(total, 1), tf.float32)
    return tf.where(total > 0, share, 1.0)


def _choose_offset(
    seed: tf.Tensor,
    margin: tf.Tensor,
    label_window,
    *,
    cat_max_ratio: float,
    ignore_index: int,
    max_tries: int,
) -> tf.Tensor:
    """A window offset (y, x), each uniform in [0, margin]; with cat_max_ratio < 1, the first of
    up to `max_tries` draws whose label window (from `label_window(offset)`) has no class
    covering cat_max_ratio or more of its non-ignored pixels, else the draw where the largest
    class covers the least."""

    def draw(i: tf.Tensor) -> tf.Tensor:
        key_h, key_w = tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, i), 2))
        offset_h = tf.random.stateless_uniform([], key_h, 0, margin[0] + 1, dtype=tf.int32)
        offset_w = tf.random.stateless_uniform([], key_w, 0, margin[1] + 1, dtype=tf.int32)
        return tf.stack([offset_h, offset_w])

    if cat_max_ratio >= 1.0:
        return draw(tf.constant(0))

    def body(i, _, best_offset, best_share):
        offset = draw(i)
        share = max_class_share(label_window(offset), ignore_index)
        best_offset = tf.where(share < best_share, offset, best_offset)
        return i + 1, share < cat_max_ratio, best_offset, tf.minimum(share, best_share)

    _, _, offset, _ = tf.while_loop(
        lambda i, done, *_: (i < max_tries) & tf.logical_not(done),
        body,
        (tf.constant(0), tf.constant(False), tf.zeros([2], tf.int32), tf.constant(math.inf)))
    return offset


def random_crop_or_pad(
    example: Example,
    seed: tf.Tensor,
    *,
    height: int,
    width: int,
    ignore_index: int = 255,
    cat_max_ratio: float = 1.0,
    max_tries: int = 10,
) -> Example:
    """Pads (bottom/right, label with ignore_index) when smaller, then crops [height, width].

    With cat_max_ratio < 1 (mmsegmentation's RandomCrop, 0.75 in its recipes), up to `max_tries`
    random windows are drawn and the first one in which no single class covers `cat_max_ratio`
    or more of the non-ignored pixels is taken; if none qualifies, the window where the largest
    class covers the least is (mmsegmentation would take an unchecked random one).
    """
    if cat_max_ratio >= 1.0:
        padded = pad_to_size(example, height=height, width=width, ignore_index=ignore_index)
        stacked = tf.image.stateless_random_crop(_stack(padded), [height, width, 4], seed)
        return _unstack(stacked, example)
    # Crop the part inside the image, then pad: the same as pad-then-crop, without copying.
    hw = tf.shape(example['label'])
    size = tf.minimum(hw, [height, width])
    offset = _choose_offset(
        seed, tf.maximum(hw - [height, width], 0),
        lambda offset: tf.slice(example['label'], offset, size),
        cat_max_ratio=cat_max_ratio, ignore_index=ignore_index, max_tries=max_tries)
    window = {**example, 'image': tf.slice(example['image'], tf.concat([offset, [0]], 0),
                                           tf.concat([size, [3]], 0)),
              'label': tf.slice(example['label'], offset, size)}
    return pad_to_size(window, height=height, width=width, ignore_index=ignore_index)


def random_scale_crop(
    example: Example,
    scale_seed: tf.Tensor,
    crop_seed: tf.Tensor,
    *,
    min_ratio: float,
    max_ratio: float,
    base_size: Sequence[int] | None,
    height: int,
    width: int,
    ignore_index: int = 255,
    cat_max_ratio: float = 1.0,
    max_tries: int = 10,
    label_map: tf.Tensor | Sequence[int] | None = None,
) -> Example:
    """`map_labels`, `random_scale` then `random_crop_or_pad`, computing only the crop window.

    The same resampling (half-pixel centres: bilinear image, nearest label, labels exactly as
    tf.image.resize's nearest), but a 2048x1024 image scaled by 2 is never materialised: label
    windows are gathered from source rows and columns (and mapped there), the image window is
    bilinearly sampled from its source region with crop_and_resize.
    """
    table = None
    if label_map is not None:
        table = label_map if isinstance(label_map, tf.Tensor) else label_lookup_table(label_map)
    ratio = tf.random.stateless_uniform([], scale_seed, minval=min_ratio, maxval=max_ratio)
    in_hw = tf.shape(example['label'])
    in_hwf = tf.cast(in_hw, tf.float32)
    if base_size is not None:
        ratio = ratio * _fit_factor(in_hwf, base_size)
    out_hw = tf.maximum(tf.cast(tf.round(in_hwf * ratio), tf.int32), 1)
    scale = in_hwf / tf.cast(out_hw, tf.float32)  # source pixels per output pixel, per axis
    size = tf.minimum(out_hw, [height, width])  # the window's part inside the scaled image

    def source_index(start: tf.Tensor, axis: int) -> tf.Tensor:
        position = (tf.cast(start + tf.range(size[axis]), tf.float32) + 0.5) * scale[axis]
        return tf.minimum(tf.cast(tf.floor(position), tf.int32), in_hw[axis] - 1)

    def label_window(offset: tf.Tensor) -> tf.Tensor:
        rows = tf.gather(example['label'], source_index(offset[0], 0), axis=0)
        window = tf.gather(rows, source_index(offset[1], 1), axis=1)
        return window if table is None else tf.gather(table, tf.cast(window, tf.int32))

    offset = _choose_offset(
        crop_seed, tf.maximum(out_hw - [height, width], 0), label_window,
        cat_max_ratio=cat_max_ratio, ignore_index=ignore_index, max_tries=max_tries)
    # Source coordinates of the window's first and last pixel centres; tf.image.resize clamps
    # them to the image, which sampling a region padded by one replicated pixel reproduces.
    first = (tf.cast(offset, tf.float32) + 0.5) * scale - 0.5
    last = (tf.cast(offset + size, tf.float32) - 0.5) * scale - 0.5
    start = tf.clip_by_value(tf.cast(tf.floor(first), tf.int32), 0, in_hw - 1)
    stop = tf.clip_by_value(tf.cast(tf.math.ceil(last), tf.int32), 0, in_hw - 1) + 1
    region = tf.slice(example['image'], tf.concat([start, [0]], 0),
                      tf.concat([stop - start, [3]], 0))
    region = tf.concat([region[:1], region, region[-1:]], 0)
    region = tf.concat([region[:, :1], region, region[:, -1:]], 1)
    extent = tf.cast(tf.shape(region)[:2], tf.float32) - 1.0
    origin = tf.cast(start, tf.float32) - 1.0  # source coordinate of the region's pixel 0
    box = tf.concat([(first - origin) / extent, (last - origin) / extent], 0)[None]
    image = tf.image.crop_and_resize(region[None], box, [0], size, method='bilinear')[0]
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    window = {**example, 'image': image, 'label': label_window(offset)}
    return pad_to_size(window, height=height, width=width, ignore_index=ignore_index)


def random_flip(example: Example, seed: tf.Tensor) -> Example:
    """Flips image and label left-right together with probability 1/2 (the same coin as
    tf.image.stateless_random_flip_left_right, without stacking them into one tensor)."""
    flip = tf.random.stateless_uniform([], seed, minval=0, maxval=1.0) < 0.5
    image, label = tf.cond(
        flip,
        lambda: (tf.reverse(example['image'], [1]), tf.reverse(example['label'], [1])),
        lambda: (example['image'], example['label']))
    return {**example, 'image': image, 'label': label}


def rotate(example: Example, degrees: tf.Tensor | float, *, ignore_index: int = 255) -> Example:
    """Rotates about the image centre, same size: image bilinear with 0 outside, label nearest
    with ignore_index outside."""
    angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    hw = tf.shape(example['label'])
    h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Output pixel (x, y) samples the input at R (p - c) + c.
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                          sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])[None]

    def warp(x: tf.Tensor, interpolation: str, fill: float) -> tf.Tensor:
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None], transforms=transform, output_shape=hw, fill_value=fill,
            interpolation=interpolation, fill_mode='CONSTANT')[0]

    image = warp(tf.cast(example['image'], tf.float32), 'BILINEAR', 0.0)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    label = warp(example['label'][..., None], 'NEAREST', float(ignore_index))[..., 0]
    return {**example, 'image': image, 'label': label}


def random_rotate(
    example: Example, seed: tf.Tensor, *, max_degrees: float, ignore_index: int = 255
) -> Example:
    """Rotates by an angle drawn uniformly from [-max_degrees, max_degrees] (see `rotate`)."""
    degrees = tf.random.stateless_uniform([], seed, minval=-max_degrees, maxval=max_degrees)
    return rotate(example, degrees, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------
# Photometry (image only).


def photometric_distortion(
    example: Example,
    seed: tf.Tensor,
    *,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> Example:
    """mmsegmentation's PhotoMetricDistortion; each step is applied with probability 1/2.

    brightness (add uniform(-delta, delta)), then contrast (multiply by uniform(range)) either
    here or last, saturation (scale HSV saturation by uniform(range)), hue (shift by an integer
    in [-hue_delta, hue_delta) on OpenCV's 0-180 hue scale). Values are clipped to 0-255 after
    every step; the label is untouched.
    """
    keys = tf.unstack(tf.random.experimental.stateless_split(seed, 9))

    def coin(key: tf.Tensor) -> tf.Tensor:
        return tf.random.stateless_uniform([], key) < 0.5

    def uniform(key: tf.Tensor, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([], key, minval=low, maxval=high)

    def maybe(key: tf.Tensor, image: tf.Tensor, fn) -> tf.Tensor:
        return tf.cond(coin(key), lambda: tf.clip_by_value(fn(image), 0.0, 255.0), lambda: image)

    def contrast(image: tf.Tensor) -> tf.Tensor:
        return maybe(keys[2], image, lambda x: x * uniform(keys[3], *contrast_range))

    image = tf.cast(example['image'], tf.float32)
    image = maybe(keys[0], image,
                  lambda x: x + uniform(keys[1], -brightness_delta, brightness_delta))
    contrast_first = coin(keys[8])
    image = tf.cond(contrast_first, lambda: contrast(image), lambda: image)
    image = maybe(keys[4], image, lambda x: 255.0 * tf.image.adjust_saturation(
        x / 255.0, uniform(keys[5], *saturation_range)))
    shift = tf.random.stateless_uniform([], keys[7], -hue_delta, hue_delta, dtype=tf.int32)
    image = maybe(keys[6], image, lambda x: 255.0 * tf.image.adjust_hue(
        x / 255.0, tf.cast(shift, tf.float32) / 180.0))
    image = tf.cond(contrast_first, lambda: image, lambda: contrast(image))
    return {**example, 'image': tf.cast(tf.round(image), tf.uint8)}


def normalize(
    image: tf.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tf.Tensor:
    """uint8 image -> float32 (image - mean) / std, with mean and std in 0-255 units."""
    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std
