"""Greedy non-maximum suppression with fixed-size outputs, jit-able.

`torchvision.ops.nms` returns a variable number of indices; here the boxes come with a validity
mask and the result is `max_output` indices plus a mask saying which of them are real. The
greedy rule is torchvision's exactly: visit boxes by decreasing score (ties: lower index first,
a stable sort), keep a box unless a kept box overlaps it with IoU > `iou_threshold` (strictly;
a nan IoU, from two empty boxes, suppresses nothing).

Cost: the [N, N] IoU matrix in memory and a loop of N steps over it (N = boxes given, e.g. the
RPN's pre-NMS candidates), so keep N to the few thousands Mask R-CNN uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from segjax.instance.boxes import box_iou


def _greedy_keep(iou: jax.Array, valid: jax.Array, iou_threshold: float) -> jax.Array:
    """Keep mask over boxes already sorted by decreasing score."""
    count = iou.shape[0]
    positions = jnp.arange(count)

    def visit(i, state):
        keep, suppressed = state
        kept = valid[i] & ~suppressed[i]
        # A kept box suppresses the later boxes it overlaps; earlier ones are already decided.
        suppressed = suppressed | (kept & (iou[i] > iou_threshold) & (positions > i))
        return keep.at[i].set(kept), suppressed

    keep, _ = lax.fori_loop(0, count, visit, (jnp.zeros(count, bool), jnp.zeros(count, bool)))
    return keep


def _first_kept(keep_sorted: jax.Array, order: jax.Array,
                max_output: int) -> tuple[jax.Array, jax.Array]:
    """The first `max_output` kept positions of the sorted list, as original indices + mask."""
    count = keep_sorted.shape[0]
    # Kept positions first, in score order; the rest after them (stable on position).
    rank = jnp.where(keep_sorted, jnp.arange(count), count + jnp.arange(count))
    positions = jnp.argsort(rank)[:max_output]
    valid = keep_sorted[positions]
    if max_output > count:
        pad = max_output - count
        positions = jnp.concatenate([positions, jnp.zeros(pad, positions.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros(pad, bool)])
    return jnp.where(valid, order[positions], 0), valid


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float, *,
        valid: jax.Array | None = None,
        max_output: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(indices [max_output] int32, valid [max_output] bool) of the boxes NMS keeps.

    boxes [N, 4] (x1, y1, x2, y2), scores [N], valid [N] (default: all): invalid boxes are
    neither kept nor suppress anything. Kept indices come by decreasing score, as
    `torchvision.ops.nms`; entries past the kept count have index 0 and valid False.
    `max_output` defaults to N (then nothing is ever cut off).
    """
    count = boxes.shape[0]
    max_output = count if max_output is None else max_output
    valid = jnp.ones(count, bool) if valid is None else valid
    order = jnp.argsort(scores, descending=True, stable=True)
    sorted_boxes = boxes[order]
    keep_sorted = _greedy_keep(box_iou(sorted_boxes, sorted_boxes), valid[order], iou_threshold)
    indices, kept = _first_kept(keep_sorted, order, max_output)
    return indices.astype(jnp.int32), kept


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array, iou_threshold: float,
                *, valid: jax.Array | None = None,
                max_output: int | None = None) -> tuple[jax.Array, jax.Array]:
    """NMS within each class (`classes` [N] ints) only: `torchvision.ops.batched_nms`.

    Boxes of different classes never overlap after shifting each class by
    class * (largest valid coordinate + 1), torchvision's coordinate trick, so one NMS does all
    classes. Returns as `nms`.
    """
    valid = jnp.ones(boxes.shape[0], bool) if valid is None else valid
    # The shift is taken over valid boxes only: padding may hold any coordinates.
    largest = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
    largest = jnp.where(jnp.any(valid), largest, 0.0)
    offsets = classes.astype(boxes.dtype) * (largest + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold, valid=valid,
               max_output=max_output)
