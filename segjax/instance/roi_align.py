"""RoIAlign (He et al. 2017) and the FPN level mapping of torchvision's `MultiScaleRoIAlign`.

Features are NHWC; boxes are per image, [B, R, 4] in image coordinates (R fixed, padding boxes
allowed: their outputs are well-defined garbage for the caller to mask). The sampling follows
torchvision's CPU kernel (`torchvision.ops.roi_align`) step for step: each of the
output_h x output_w bins averages grid_h x grid_w bilinear samples; a sample more than one pixel
outside the feature map counts as 0; samples between -1 and 0 are clamped to the border; with
aligned=False a box is at least 1 x 1 feature pixel.

All levels of a pyramid are sampled in one gather: the maps are flattened into one table and
each box indexes its own level's rows, so the cost does not grow with the number of levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from segjax.instance.boxes import box_area


def _sample_axis(start: jax.Array, bin_size: jax.Array, grid: jax.Array, pooled: int,
                 max_grid: int, size: jax.Array):
    """Sample positions along one axis, per box [K]: (low, high) indices [K, pooled, max_grid],
    their weights, and which samples count (inside the map's -1 margin and the box's grid)."""
    bins = jnp.arange(pooled, dtype=jnp.float32)[None, :, None]
    steps = jnp.arange(max_grid, dtype=jnp.float32)[None, None, :]
    k = (slice(None), None, None)
    # The kernel's expression order: start + p * bin + (i + .5) * bin / grid.
    position = start[k] + bins * bin_size[k] + (steps + 0.5) * bin_size[k] / grid[k]
    size_f = size.astype(jnp.float32)[k]
    counts = (position >= -1.0) & (position <= size_f) & (steps < grid[k])
    position = jnp.maximum(position, 0.0)
    low = jnp.floor(position).astype(jnp.int32)
    last = size[k] - 1
    at_edge = low >= last
    low = jnp.where(at_edge, last, low)
    high = jnp.where(at_edge, last, low + 1)
    position = jnp.where(at_edge, low.astype(jnp.float32), position)
    frac = position - low
    return low, high, 1.0 - frac, frac, counts


def _roi_align_table(table: jax.Array, row_offset: jax.Array, heights: jax.Array,
                     widths: jax.Array, scales: jax.Array, boxes: jax.Array,
                     output_size: tuple[int, int], sampling_ratio: int, aligned: bool,
                     max_grid: int) -> jax.Array:
    """RoIAlign of K boxes [K, 4], box k reading the [heights[k], widths[k], C] map stored
    row-major at table[row_offset[k]:] with spatial scale scales[k]; returns [K, oh, ow, C]."""
    pooled_h, pooled_w = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * scales - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = grid_w = jnp.full(boxes.shape[:1], float(sampling_ratio), jnp.float32)
    else:
        grid_h, grid_w = jnp.ceil(roi_h / pooled_h), jnp.ceil(roi_w / pooled_w)
    y_low, y_high, y_hi_w, y_lo_w, y_ok = _sample_axis(y1, bin_h, grid_h, pooled_h, max_grid,
                                                      heights)
    x_low, x_high, x_hi_w, x_lo_w, x_ok = _sample_axis(x1, bin_w, grid_w, pooled_w, max_grid,
                                                      widths)
    # Broadcast to [K, ph, iy, pw, ix]: y terms on axes 1-2, x terms on axes 3-4.
    ys = (slice(None), slice(None), slice(None), None, None)
    xs = (slice(None), None, None, slice(None), slice(None))
    base = row_offset[:, None, None, None, None]
    row_w = widths[:, None, None, None, None]
    valid = (y_ok[ys] & x_ok[xs]).astype(table.dtype)

    def corner(y_index, x_index, y_weight, x_weight):
        weight = (y_weight[ys] * x_weight[xs]) * valid
        values = jnp.take(table, base + y_index[ys] * row_w + x_index[xs], axis=0)
        return weight[..., None] * values

    total = (corner(y_low, x_low, y_hi_w, x_hi_w) + corner(y_low, x_high, y_hi_w, x_lo_w)
             + corner(y_high, x_low, y_lo_w, x_hi_w) + corner(y_high, x_high, y_lo_w, x_lo_w))
    count = jnp.maximum(grid_h * grid_w, 1.0)[:, None, None, None]
    return total.sum(axis=(2, 4)) / count


def _check_grid(sampling_ratio: int, max_grid: int | None) -> int:
    if sampling_ratio > 0:
        return sampling_ratio
    if max_grid is None or max_grid < 1:
        raise ValueError('roi_align: sampling_ratio <= 0 (adaptive: ceil(box size / output '
                         'size) samples per bin) needs a static bound max_grid >= 1 under '
                         f'jit, got max_grid={max_grid}')
    return max_grid


def roi_align(features: jax.Array, boxes: jax.Array, output_size: tuple[int, int], *,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              max_grid: int | None = None) -> jax.Array:
    """`torchvision.ops.roi_align` on NHWC features: [B, R, oh, ow, C] for boxes [B, R, 4]
    (x1, y1, x2, y2 in input coordinates; box r of image b reads features[b]).

    sampling_ratio > 0 samples that many points per bin and axis; <= 0 adapts to the box as
    torchvision (ceil(box size / output size)), which under jit needs `max_grid`, a static upper
    bound on those counts: bins of boxes needing more get only max_grid (then results differ).
    """
    grid = _check_grid(sampling_ratio, max_grid)
    batch, height, width, channels = features.shape
    rois = boxes.shape[1]
    flat_boxes = boxes.reshape(batch * rois, 4).astype(jnp.float32)
    image = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), rois)
    count = batch * rois
    out = _roi_align_table(
        features.reshape(-1, channels), image * (height * width),
        jnp.full(count, height, jnp.int32), jnp.full(count, width, jnp.int32),
        jnp.full(count, spatial_scale, jnp.float32), flat_boxes, tuple(output_size),
        sampling_ratio, aligned, grid)
    return out.reshape(batch, rois, *output_size, channels)


def infer_level_scales(feature_sizes: Sequence[tuple[int, int]],
                       image_size: tuple[int, int]) -> list[float]:
    """Each level's spatial scale as torchvision's MultiScaleRoIAlign infers it:
    2 ** round(log2(feature height / image height)) (image_size: the largest image, unpadded).
    """
    return [2.0 ** round(math.log2(h / image_size[0])) for h, _ in feature_sizes]


def fpn_levels(boxes: jax.Array, k_min: int, k_max: int, *, canonical_scale: float = 224.0,
               canonical_level: int = 4, eps: float = 1e-6) -> jax.Array:
    """Pyramid level index (0 = k_min) of each box [...]: Eqn. 1 of the FPN paper,
    floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps) clamped to
    [k_min, k_max] - k_min, as torchvision's LevelMapper. Empty boxes go to level 0."""
    scale = jnp.sqrt(box_area(boxes))
    level = jnp.floor(canonical_level + jnp.log2(scale / canonical_scale) + jnp.float32(eps))
    return (jnp.clip(level, k_min, k_max) - k_min).astype(jnp.int32)


def multiscale_roi_align(features: Sequence[jax.Array], boxes: jax.Array,
                         image_size: tuple[int, int], output_size: tuple[int, int], *,
                         sampling_ratio: int = 2, canonical_scale: float = 224.0,
                         canonical_level: int = 4, aligned: bool = False,
                         max_grid: int | None = None) -> jax.Array:
    """torchvision's `MultiScaleRoIAlign` over FPN maps `features` ([B, h_l, w_l, C], finest
    first, e.g. P2..P5): each box [B, R, 4] is pooled from the level `fpn_levels` picks, with
    that level's inferred scale. `image_size` (H, W): the largest unpadded image of the batch.
    Mask R-CNN: output (7, 7) for the box head, (14, 14) for the mask head, sampling ratio 2.
    Returns [B, R, oh, ow, C].
    """
    grid = _check_grid(sampling_ratio, max_grid)
    batch, rois = boxes.shape[:2]
    channels = features[0].shape[-1]
    sizes = [tuple(f.shape[1:3]) for f in features]
    scales = infer_level_scales(sizes, image_size)
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    if len(features) == 1:
        levels = jnp.zeros((batch, rois), jnp.int32)
    else:
        levels = fpn_levels(boxes.astype(jnp.float32), k_min, k_max,
                            canonical_scale=canonical_scale, canonical_level=canonical_level)
    level_rows = [batch * h * w for h, w in sizes]
    starts = jnp.asarray([sum(level_rows[:i]) for i in range(len(sizes))], jnp.int32)
    level_h = jnp.asarray([h for h, _ in sizes], jnp.int32)[levels]
    level_w = jnp.asarray([w for _, w in sizes], jnp.int32)[levels]
    image = jnp.arange(batch, dtype=jnp.int32)[:, None]
    row_offset = starts[levels] + image * level_h * level_w
    table = jnp.concatenate([f.reshape(-1, channels) for f in features], axis=0)
    out = _roi_align_table(
        table, row_offset.reshape(-1), level_h.reshape(-1), level_w.reshape(-1),
        jnp.asarray(scales, jnp.float32)[levels].reshape(-1),
        boxes.reshape(-1, 4).astype(jnp.float32), tuple(output_size), sampling_ratio, aligned,
        grid)
    return out.reshape(batch, rois, *output_size, channels)
