"""Mask R-CNN's training targets and losses, as torchvision's RPN and RoI heads compute them.

Everything has static shapes: ground truth is padded to G instances per image with a validity
mask, sampled sets are masks over all anchors / proposals. Each step mirrors torchvision:
- RPN (`rpn_targets`, `rpn_loss`): anchors matched at IoU 0.7 / 0.3 with low-quality matches,
  256 sampled per image (half positive at most); objectness BCE-with-logits averaged over the
  sampled anchors of the batch, smooth-L1 (beta 1/9) of the positives' deltas summed and divided
  by the number sampled (`RegionProposalNetwork.compute_loss`).
- RoI heads (`add_gt_proposals`, `roi_targets`, `fastrcnn_loss`): ground-truth boxes appended to
  the proposals, matched at IoU 0.5 (no low-quality matches), 512 sampled per image (a quarter
  positive at most); cross-entropy over the sampled RoIs, smooth-L1 (beta 1/9) on the gt class's
  deltas of the positives summed / number sampled (`fastrcnn_loss`).
- Masks (`project_masks_on_boxes`, `maskrcnn_loss`): the matched gt mask RoIAligned onto each
  positive proposal at 28 x 28 (scale 1, adaptive sampling, aligned=False), BCE-with-logits of
  the gt class's mask logits, averaged over positives and pixels.
Each batch-level mean divides by the batch's count, as torchvision concatenates images first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from segjax.instance.boxes import ROI_BOX_WEIGHTS, RPN_BOX_WEIGHTS, box_iou, encode_boxes
from segjax.instance.matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, match
from segjax.instance.roi_align import _sample_axis

SMOOTH_L1_BETA = 1 / 9


def smooth_l1(x: jax.Array, beta: float = SMOOTH_L1_BETA) -> jax.Array:
    """Elementwise Huber-like loss of x = prediction - target (torch's F.smooth_l1_loss):
    0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta."""
    size = jnp.abs(x)
    return jnp.where(size < beta, 0.5 * size ** 2 / beta, size - 0.5 * beta)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of sigmoid(logits) against targets in [0, 1],
    max(x, 0) - x t + log(1 + exp(-|x|)): torch's F.binary_cross_entropy_with_logits."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of `values` where `mask`, over the mask's count (0 when nothing is selected)."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# ------------------------------------------------------------------------------------------
# RPN.

def rpn_targets(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, *,
                high_threshold: float = 0.7, low_threshold: float = 0.3
                ) -> tuple[jax.Array, jax.Array]:
    """One image's (labels [N] int32: 1 object, 0 background, -1 ignored; regression targets
    [N, 4]) for anchors [N, 4] and ground truth gt_boxes [G, 4] / gt_valid [G]:
    torchvision's assign_targets_to_anchors + BoxCoder((1, 1, 1, 1)).encode. Targets of
    anchors that are not positive are zeros (they never enter a loss)."""
    matches = match(box_iou(gt_boxes, anchors), high_threshold, low_threshold,
                    allow_low_quality_matches=True, gt_valid=gt_valid)
    labels = jnp.where(matches >= 0, 1, jnp.where(matches == BETWEEN_THRESHOLDS, -1, 0))
    targets = encode_boxes(gt_boxes[jnp.maximum(matches, 0)], anchors, RPN_BOX_WEIGHTS)
    return labels.astype(jnp.int32), jnp.where((labels > 0)[:, None], targets, 0.0)


def rpn_loss(objectness: jax.Array, deltas: jax.Array, labels: jax.Array, targets: jax.Array,
             positive: jax.Array, negative: jax.Array) -> dict[str, jax.Array]:
    """{'loss_objectness', 'loss_rpn_box_reg'} for a batch: objectness [B, N] logits, deltas
    [B, N, 4], labels / targets from `rpn_targets` (stacked), positive / negative [B, N] the
    sampled masks (`sample_balanced`). torchvision's RegionProposalNetwork.compute_loss."""
    sampled = positive | negative
    count = jnp.maximum(jnp.sum(sampled), 1)
    box = jnp.sum(smooth_l1(deltas - targets), axis=-1)
    return {'loss_objectness': _mean(bce_with_logits(objectness, (labels > 0).astype(
                objectness.dtype)), sampled),
            'loss_rpn_box_reg': jnp.sum(jnp.where(positive, box, 0.0)) / count}


# ------------------------------------------------------------------------------------------
# RoI heads.

def add_gt_proposals(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                     gt_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Proposals [..., P + G, 4] and validity: the ground-truth boxes appended after the
    proposals (torchvision's add_gt_proposals), gradients stopped through the proposals (the
    RoI losses do not train the RPN through its boxes, as torchvision's detach)."""
    boxes = jnp.concatenate([lax.stop_gradient(proposals), gt_boxes.astype(proposals.dtype)],
                            axis=-2)
    return boxes, jnp.concatenate([proposal_valid, gt_valid], axis=-1)


def roi_targets(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_labels: jax.Array, gt_valid: jax.Array, *, high_threshold: float = 0.5,
                low_threshold: float = 0.5, weights: tuple[float, ...] = ROI_BOX_WEIGHTS
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One image's (matched gt index [R] (clamped to >= 0), labels [R] int32 (gt class, 0
    background, -1 ignored incl. invalid proposals), regression targets [R, 4] (zeros where not
    positive)): torchvision's assign_targets_to_proposals + BoxCoder(weights).encode."""
    matches = match(box_iou(gt_boxes, proposals), high_threshold, low_threshold,
                    gt_valid=gt_valid, valid=proposal_valid)
    matched = jnp.maximum(matches, 0)
    labels = jnp.where(matches == BELOW_LOW_THRESHOLD, 0,
                       jnp.where(matches == BETWEEN_THRESHOLDS, -1, gt_labels[matched]))
    targets = encode_boxes(gt_boxes[matched].astype(proposals.dtype), proposals, weights)
    return matched, labels.astype(jnp.int32), jnp.where((labels > 0)[:, None], targets, 0.0)


def fastrcnn_loss(class_logits: jax.Array, box_deltas: jax.Array, labels: jax.Array,
                  targets: jax.Array, sampled: jax.Array) -> dict[str, jax.Array]:
    """{'loss_classifier', 'loss_box_reg'}: class_logits [B, R, C], box_deltas [B, R, C, 4],
    labels [B, R] int, targets [B, R, 4], sampled [B, R] bool (the RoIs torchvision would keep;
    the rest is padding). Cross-entropy averaged over sampled RoIs; smooth-L1 of the gt class's
    deltas of sampled positives, summed / number sampled (torchvision's fastrcnn_loss)."""
    labels = jnp.maximum(labels, 0)
    log_probs = jax.nn.log_softmax(class_logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    class_deltas = jnp.take_along_axis(box_deltas, labels[..., None, None], axis=-2)[..., 0, :]
    box = jnp.sum(smooth_l1(class_deltas - targets), axis=-1)
    positive = sampled & (labels > 0)
    return {'loss_classifier': _mean(nll, sampled),
            'loss_box_reg': jnp.sum(jnp.where(positive, box, 0.0))
            / jnp.maximum(jnp.sum(sampled), 1)}


def _axis_matrix(start: jax.Array, end: jax.Array, size: jax.Array, length: int, pooled: int,
                 max_grid: int) -> tuple[jax.Array, jax.Array]:
    """RoIAlign along one axis as a matrix [pooled, length] (bilinear weights summed over each
    bin's samples, samples outside the -1 margin dropped) and the samples per bin; box bounds
    are scalars, `size` the map's true extent (<= length, the padded one)."""
    extent = jnp.maximum(end - start, 1.0)  # aligned=False: at least one pixel
    bin_size = extent / pooled
    grid = jnp.ceil(extent / pooled)  # adaptive sampling (sampling_ratio=-1)
    low, high, low_w, high_w, counts = _sample_axis(
        start[None], bin_size[None], grid[None], pooled, max_grid, size[None])
    bins = jnp.broadcast_to(jnp.arange(pooled)[:, None], low.shape[1:])
    counts = counts[0].astype(jnp.float32)
    matrix = jnp.zeros((pooled, length), jnp.float32)
    matrix = matrix.at[bins, low[0]].add(low_w[0] * counts)
    matrix = matrix.at[bins, high[0]].add(high_w[0] * counts)
    return matrix, grid


def mask_target_max_grid(mask_size: tuple[int, int], output_size: int) -> int:
    """The static sample-count bound for `project_masks_on_boxes`: enough for any box inside a
    mask of `mask_size` (boxes reaching further out get fewer samples than torchvision's)."""
    return max(1, math.ceil(max(mask_size) / output_size))


def project_masks_on_boxes(masks: jax.Array, boxes: jax.Array, matched: jax.Array,
                           mask_size: jax.Array, output_size: int = 28, *,
                           max_grid: int | None = None, chunk: int = 16) -> jax.Array:
    """Targets [R, M, M] float32: gt mask `matched[r]` of masks [G, H, W] (padded; the true
    extent is mask_size (h, w), may be traced) RoIAligned onto box r [R, 4] at M x M with scale
    1, adaptive sampling and aligned=False: torchvision's project_masks_on_boxes.

    Bilinear sampling is separable, so each target is rows [M, H] @ mask @ columns [W, M] with
    the sampling weights in the two matrices: no [M, M, grid, grid] gathers. Boxes go through
    `lax.map` in chunks of `chunk` so at most chunk masks are gathered at a time.
    """
    length_h, length_w = masks.shape[1:]
    max_grid = max_grid or mask_target_max_grid((length_h, length_w), output_size)
    size = jnp.asarray(mask_size, jnp.int32)

    def one(args):
        box, index = args
        rows, grid_h = _axis_matrix(box[1], box[3], size[0], length_h, output_size, max_grid)
        cols, grid_w = _axis_matrix(box[0], box[2], size[1], length_w, output_size, max_grid)
        mask = masks[index].astype(jnp.float32)
        pooled = jnp.matmul(jnp.matmul(rows, mask, precision=lax.Precision.HIGHEST), cols.T,
                            precision=lax.Precision.HIGHEST)
        return pooled / jnp.maximum(grid_h * grid_w, 1.0)

    return lax.map(one, (boxes.astype(jnp.float32), matched), batch_size=chunk)


def maskrcnn_loss(mask_logits: jax.Array, labels: jax.Array, targets: jax.Array,
                  positive: jax.Array) -> jax.Array:
    """BCE-with-logits of each positive RoI's gt-class mask logits against its target, averaged
    over positive RoIs and pixels; 0 without positives (torchvision's maskrcnn_loss).
    mask_logits [B, P, M, M, C], labels [B, P] int, targets [B, P, M, M], positive [B, P]."""
    chosen = jnp.take_along_axis(mask_logits, jnp.maximum(labels, 0)[..., None, None, None],
                                 axis=-1)[..., 0]
    pixels = jnp.broadcast_to(positive[..., None, None], targets.shape)
    return _mean(bce_with_logits(chosen, targets), pixels)
