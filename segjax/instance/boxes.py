"""Boxes as (x1, y1, x2, y2) float32 arrays [..., 4]: the box coder, IoU, clipping, sizes.

All formulas follow torchvision (`torchvision.models.detection._utils.BoxCoder`,
`torchvision.ops.box_iou`, `clip_boxes_to_image`, `remove_small_boxes`) operation for
operation, so results agree to float32 rounding (tests/test_instance_ops.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Faster R-CNN's weights: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# exp(dw) is capped at 1000/16 times the reference width: torchvision's bbox_xform_clip.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(targets: jax.Array, references: jax.Array,
                 weights: tuple[float, float, float, float] = RPN_BOX_WEIGHTS) -> jax.Array:
    """Deltas [..., 4] that turn `references` (anchors, proposals) into `targets` (ground truth).

    dx = wx (cx_t - cx_r) / w_r, dy likewise, dw = ww log(w_t / w_r), dh likewise: torchvision's
    `BoxCoder(weights).encode_single(targets, references)` (its `reference_boxes` are the
    targets, its `proposals` the references). Zero-size references give inf/nan, as there.
    """
    wx, wy, ww, wh = weights
    ref_x, ref_y, ref_w, ref_h = _centre_size(references)
    tgt_x, tgt_y, tgt_w, tgt_h = _centre_size(targets)
    return jnp.stack([wx * (tgt_x - ref_x) / ref_w, wy * (tgt_y - ref_y) / ref_h,
                      ww * jnp.log(tgt_w / ref_w), wh * jnp.log(tgt_h / ref_h)], axis=-1)


def decode_boxes(deltas: jax.Array, references: jax.Array,
                 weights: tuple[float, float, float, float] = RPN_BOX_WEIGHTS,
                 clip: float = BBOX_XFORM_CLIP) -> jax.Array:
    """Boxes [..., 4] from `deltas` [..., 4] applied to `references` [..., 4] (broadcast).

    The inverse of `encode_boxes`, with dw and dh capped at `clip` before exp so that a wild
    prediction cannot overflow: torchvision's `BoxCoder(weights).decode_single`.
    """
    wx, wy, ww, wh = weights
    ctr_x, ctr_y, widths, heights = _centre_size(references.astype(deltas.dtype))
    dw = jnp.minimum(deltas[..., 2] / ww, clip)
    dh = jnp.minimum(deltas[..., 3] / wh, clip)
    pred_x = deltas[..., 0] / wx * widths + ctr_x
    pred_y = deltas[..., 1] / wy * heights + ctr_y
    half_w = 0.5 * (jnp.exp(dw) * widths)
    half_h = 0.5 * (jnp.exp(dh) * heights)
    return jnp.stack([pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h],
                     axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """(x2 - x1) * (y2 - y1) of [..., 4] boxes (negative for inverted boxes, as torchvision)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Intersection over union [N, M] of [N, 4] and [M, 4] boxes (torchvision.ops.box_iou).

    Two empty boxes give 0/0 = nan, as torchvision; nan compares false with any threshold.
    """
    top_left = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    size = jnp.maximum(bottom_right - top_left, 0.0)
    inter = size[..., 0] * size[..., 1]
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / union


def clip_boxes_to_image(boxes: jax.Array, height: jax.Array | int,
                        width: jax.Array | int) -> jax.Array:
    """x clamped to [0, width], y to [0, height] (torchvision.ops.clip_boxes_to_image).

    `height` and `width` may be traced scalars (each image's size before padding)."""
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def large_enough(boxes: jax.Array, min_size: float) -> jax.Array:
    """Boolean [...]: width and height both >= min_size. torchvision's `remove_small_boxes`
    returns the indices where this holds; under jit the mask travels next to the boxes."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & (
        (boxes[..., 3] - boxes[..., 1]) >= min_size)
