"""Eval-mode detection post-processing of Mask R-CNN with fixed shapes: torchvision's
`RoIHeads.postprocess_detections`, `maskrcnn_inference` and `paste_masks_in_image`.

Detections (per image): softmax over classes; each proposal decoded once per class with the
(10, 10, 5, 5) box coder; clipped to the image; background dropped; every (proposal, class)
pair a candidate; candidates kept if score > `score_threshold` and both sides >= 1e-2; NMS at
`nms_threshold` within each class; the best `max_detections` kept by decreasing score. The
result is `max_detections` rows plus a validity mask.

NMS runs per class over all proposals with no candidate cap, so the kept set is torchvision's
exactly (its CPU path for more than 1000 candidates, `_batched_nms_vanilla`, is the same
per-class NMS). IoU rows are computed inside the greedy loop ([classes, proposals] per step, no
[N, N] matrix), and the loop stops after the largest per-class candidate count, so a trained
model with few candidates pays for few steps.

Masks are pasted in JAX with static shapes: each detection's bilinear resize + paste is one
separable interpolation, rows [H, M+2] @ mask [M+2, M+2] @ columns [M+2, W], with zero weights
outside the (expanded, integer) box and outside the image. Output: [..., H, W] probabilities
per detection, as torchvision's (threshold at 0.5 for binary masks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from segjax.instance.boxes import (
    ROI_BOX_WEIGHTS,
    box_area,
    clip_boxes_to_image,
    decode_boxes,
    large_enough,
)

# torchvision's RoIHeads test-time defaults for Mask R-CNN.
SCORE_THRESHOLD = 0.05
NMS_THRESHOLD = 0.5
DETECTIONS_PER_IMAGE = 100
MIN_BOX_SIZE = 1e-2


def _iou_with(box: jax.Array, boxes: jax.Array) -> jax.Array:
    """IoU [K, N] of one box per class [K, 4] with every box of its class [K, N, 4], in
    torchvision's nms kernel's arithmetic (areas from each box's own coordinates)."""
    top_left = jnp.maximum(box[:, None, :2], boxes[..., :2])
    bottom_right = jnp.minimum(box[:, None, 2:], boxes[..., 2:])
    size = jnp.maximum(bottom_right - top_left, 0.0)
    inter = size[..., 0] * size[..., 1]
    return inter / (box_area(box)[:, None] + box_area(boxes) - inter)


def nms_per_class(boxes: jax.Array, scores: jax.Array, candidates: jax.Array,
                  iou_threshold: float) -> jax.Array:
    """Keep mask [K, N] of greedy NMS run separately in each of K classes over N boxes.

    boxes [K, N, 4], scores [K, N], candidates [K, N] bool (only candidates are kept or
    suppress). Same rule as `segjax.instance.nms.nms` (score order, ties by lower index, IoU >
    threshold suppresses), all classes advancing together one rank per step.
    """
    classes, count = scores.shape
    # Candidates first, by decreasing score (stable); the rest after them.
    order = jnp.argsort(jnp.where(candidates, -scores, jnp.inf), axis=1, stable=True)
    sorted_boxes = jnp.take_along_axis(boxes, order[..., None], axis=1)
    sorted_candidates = jnp.take_along_axis(candidates, order, axis=1)
    steps = jnp.max(jnp.sum(candidates, axis=1))
    positions = jnp.arange(count)

    def visit(state):
        i, keep, suppressed = state
        kept = sorted_candidates[:, i] & ~suppressed[:, i]
        overlap = _iou_with(sorted_boxes[:, i], sorted_boxes) > iou_threshold
        suppressed = suppressed | (kept[:, None] & overlap & (positions > i))
        return i + 1, keep.at[:, i].set(kept), suppressed

    _, keep_sorted, _ = lax.while_loop(
        lambda state: state[0] < steps, visit,
        (jnp.int32(0), jnp.zeros((classes, count), bool), jnp.zeros((classes, count), bool)))
    # Back to the original order of each class's boxes.
    rows = jnp.arange(classes)[:, None]
    return jnp.zeros((classes, count), bool).at[rows, order].set(keep_sorted)


def detect(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
           proposal_valid: jax.Array, image_size: jax.Array, *,
           score_threshold: float = SCORE_THRESHOLD, nms_threshold: float = NMS_THRESHOLD,
           max_detections: int = DETECTIONS_PER_IMAGE,
           box_weights: tuple[float, float, float, float] = ROI_BOX_WEIGHTS
           ) -> dict[str, jax.Array]:
    """One image's detections from the box head: torchvision's `postprocess_detections`.

    class_logits [P, C] (class 0 = background), box_deltas [P, C, 4], proposals [P, 4] with
    proposal_valid [P] (padding rows never detect), image_size (height, width) before padding.
    Returns {'boxes' [D, 4], 'scores' [D], 'labels' [D] int32 (1..C-1), 'valid' [D]} with
    D = max_detections, by decreasing score; invalid rows hold zeros.
    """
    num_classes = class_logits.shape[-1]
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]
    boxes = decode_boxes(box_deltas.astype(jnp.float32)[:, 1:], proposals[:, None, :],
                         box_weights)
    boxes = clip_boxes_to_image(boxes, image_size[0], image_size[1])
    candidates = (proposal_valid[:, None] & (scores > score_threshold)
                  & large_enough(boxes, MIN_BOX_SIZE))
    keep = nms_per_class(boxes.transpose(1, 0, 2), scores.T, candidates.T, nms_threshold).T
    # Flattened (proposal, class) as torchvision's candidate order; top_k breaks ties by index.
    ranked = jnp.where(keep, scores, -jnp.inf).reshape(-1)
    best, index = lax.top_k(ranked, min(max_detections, ranked.shape[0]))
    valid = best > -jnp.inf
    if max_detections > ranked.shape[0]:
        pad = max_detections - ranked.shape[0]
        index = jnp.concatenate([index, jnp.zeros(pad, index.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros(pad, bool)])
    labels = index % (num_classes - 1) + 1
    return {'boxes': jnp.where(valid[:, None], boxes.reshape(-1, 4)[index], 0.0),
            'scores': jnp.where(valid, scores.reshape(-1)[index], 0.0),
            'labels': jnp.where(valid, labels, 0).astype(jnp.int32),
            'valid': valid}


def class_masks(mask_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Probabilities [..., M, M] of each detection's own class: sigmoid of mask_logits
    [..., M, M, C] at `labels` [...] (torchvision's `maskrcnn_inference`)."""
    chosen = jnp.take_along_axis(mask_logits, labels[..., None, None, None], axis=-1)
    return jax.nn.sigmoid(chosen[..., 0].astype(jnp.float32))


def expand_boxes(boxes: jax.Array, scale: float) -> jax.Array:
    """Boxes [..., 4] scaled by `scale` about their centres (torchvision's expand_boxes)."""
    half_w = (boxes[..., 2] - boxes[..., 0]) * 0.5 * jnp.float32(scale)
    half_h = (boxes[..., 3] - boxes[..., 1]) * 0.5 * jnp.float32(scale)
    centre_x = (boxes[..., 2] + boxes[..., 0]) * 0.5
    centre_y = (boxes[..., 3] + boxes[..., 1]) * 0.5
    return jnp.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w,
                      centre_y + half_h], axis=-1)


def _paste_weights(start: jax.Array, end: jax.Array, limit: jax.Array, source: int,
                   canvas: int) -> jax.Array:
    """[canvas, source] weights that resize `source` samples bilinearly (align_corners=False,
    as F.interpolate) onto the integer span start..end (inclusive, length >= 1) of a canvas
    axis, zero outside the span and at or past `limit` (the image's size on that axis)."""
    length = jnp.maximum(end - start + 1, 1)
    pixel = jnp.arange(canvas)
    offset = pixel - start
    # F.interpolate's source index: ratio * (dst + 0.5) - 0.5, floored at 0, in float32.
    ratio = jnp.float32(source) / length.astype(jnp.float32)
    real = jnp.maximum(ratio * (offset.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    low = jnp.clip(real.astype(jnp.int32), 0, source - 1)
    high = jnp.where(low < source - 1, low + 1, low)
    frac = jnp.clip(real - low.astype(jnp.float32), 0.0, 1.0)
    weights = ((1.0 - frac)[:, None] * jax.nn.one_hot(low, source)
               + frac[:, None] * jax.nn.one_hot(high, source))
    inside = (offset >= 0) & (offset < length) & (pixel < limit)
    return jnp.where(inside[:, None], weights, 0.0)


def paste_masks_in_image(masks: jax.Array, boxes: jax.Array, image_size: jax.Array,
                         canvas_size: tuple[int, int], padding: int = 1) -> jax.Array:
    """Masks [D, M, M] (probabilities) drawn into the image at their boxes [D, 4]:
    torchvision's `paste_masks_in_image` on a static canvas.

    As there: each mask is zero-padded by `padding` and its box enlarged by (M + 2 padding) / M
    so the border lands where the box edge was, box corners truncated to integers, the padded
    mask resized bilinearly to the box's (x2 - x1 + 1) x (y2 - y1 + 1) pixels and pasted, cut
    to the image. image_size: (height, width) of the image (may be traced); canvas_size:
    static (H, W) >= it, e.g. the padded batch size; pixels outside the image stay 0.
    Returns [D, H, W] float32.
    """
    size = masks.shape[-1]
    padded = jnp.pad(masks.astype(jnp.float32), ((0, 0), (padding, padding), (padding, padding)))
    corners = expand_boxes(boxes.astype(jnp.float32), (size + 2 * padding) / size)
    corners = corners.astype(jnp.int32)  # truncation toward zero, as torch's .to(int64)
    source = size + 2 * padding

    def paste(mask: jax.Array, box: jax.Array) -> jax.Array:
        rows = _paste_weights(box[1], box[3], image_size[0], source, canvas_size[0])
        cols = _paste_weights(box[0], box[2], image_size[1], source, canvas_size[1])
        hi = lax.Precision.HIGHEST  # bilinear weights, not a learned matmul: keep f32 on TPU
        return jnp.dot(jnp.dot(rows, mask, precision=hi), cols.T, precision=hi)

    return jax.vmap(paste)(padded, corners)

