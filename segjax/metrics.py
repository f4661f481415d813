"""Segmentation metrics: counts on device, every reported number derived in numpy.

Evaluation accumulates two kinds of counts, both plain sums, so counts from batches, devices and
hosts are simply added: the confusion matrix, from which mIoU, accuracy, Dice, precision, recall
and fwIoU derive, and the per-class Boundary IoU counts (`boundary_counts`), from which Boundary
IoU derives. Everything reported is computed once from the summed counts by `summarize`.

Rule for absent classes (one rule, used everywhere, as in mmsegmentation and the Cityscapes
evaluator): a metric whose denominator is zero is NaN, and NaN entries are left out of the means.
So a class absent from both ground truth and prediction has NaN IoU/Dice and does not count in
mIoU/mDice; a class present in ground truth but never predicted (or predicted but absent from
ground truth) has IoU 0 and does count. Boundary IoU follows the same rule (NaN where the union
of the bands is 0, which happens exactly when the class is absent from both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    ignore_index: int = 255,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Counts of (ground truth, prediction) pairs: int32 [C, C], rows = truth, columns = prediction.

    Args:
      pred: integer class predictions, any shape (e.g. [B, H, W]).
      label: integer ground truth, same shape as `pred`.
      num_classes: C.
      ignore_index: label value whose pixels are not counted.
      mask: optional boolean array of the same shape; False pixels are not counted (e.g. the
        padding of the last evaluation batch).

    Pixels are excluded when label == ignore_index, label is outside [0, C), pred is outside
    [0, C) or mask is False. Jit-safe (no Python branching on values) and works on sharded inputs;
    XLA reduces the per-shard counts. int32 holds 2**31 - 1 pixels per cell, enough for a
    dataset like Cityscapes val (~1e9 pixels in total); sum in numpy int64 across hosts/epochs.
    """
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    valid &= (pred >= 0) & (pred < num_classes)
    if mask is not None:  # a static choice on whether a mask was given, not on its values
        valid &= jnp.asarray(mask, bool)
    # Excluded pixels are sent to bin 0 with weight 0, so every index is in range.
    index = jnp.where(valid, label * num_classes + pred, 0)
    counts = jnp.bincount(
        index.reshape(-1), weights=valid.reshape(-1).astype(jnp.int32), length=num_classes**2
    )
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


# Boundary IoU's band width as a fraction of the image diagonal (the paper's and
# boundary_iou_api's default).
BOUNDARY_DILATION_RATIO = 0.02


def boundary_dilation(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """The band width d in pixels: max(1, round(ratio * image diagonal)), as boundary_iou_api.

    Python's round (half to even), like the reference's `int(round(...))`.
    """
    if not ratio > 0:
        raise ValueError(f'boundary dilation ratio must be > 0, got {ratio!r}')
    if height < 1 or width < 1:
        raise ValueError(f'image size must be positive, got {height}x{width}')
    return max(1, int(round(ratio * math.sqrt(height**2 + width**2))))


def _sliding_extreme(values: jax.Array, size: int, axis: int, extreme) -> jax.Array:
    """`extreme` (jnp.maximum or jnp.minimum) over each run of `size` consecutive elements
    along `axis` ('VALID': the axis shrinks by size - 1), in O(log size) passes: extremes over
    runs of 1, 2, 4, ... elements, then two overlapping power-of-two runs that cover `size`.
    On CPU 4x faster than lax.reduce_window, which costs O(size) per element."""
    count = values.shape[axis] - size + 1
    run = 1
    while run * 2 <= size:
        kept = values.shape[axis] - run
        values = extreme(jax.lax.slice_in_dim(values, 0, kept, axis=axis),
                         jax.lax.slice_in_dim(values, run, run + kept, axis=axis))
        run *= 2
    return extreme(jax.lax.slice_in_dim(values, 0, count, axis=axis),
                   jax.lax.slice_in_dim(values, size - run, size - run + count, axis=axis))


def boundary_bands(classes: jax.Array, dilation: int) -> jax.Array:
    """[B, H, W] bool: pixels with a pixel of another value within chessboard distance d.

    `classes` holds a class index >= 0 per evaluated pixel and -1 where a pixel is not evaluated.
    For a pixel of class c this is exactly the reference's inner band G_d ∩ G of the class-c
    mask (boundary_iou_api's `mask_to_boundary`: the mask minus its erosion by a 3x3 square d
    times, with the image padded by one pixel of 0, so the image border is a contour): d 3x3
    erosions equal one (2d+1) x (2d+1) erosion, and the pixel survives it iff its window holds
    class c only, i.e. the window's max equals its min. The label map is padded with -1 (not
    any class), so one pass covers every class with no one-hot [B, H, W, C] masks.
    """
    padded = jnp.pad(classes, ((0, 0), (dilation, dilation), (dilation, dilation)),
                     constant_values=-1)
    size = 2 * dilation + 1  # a square window: rows, then columns
    highest = _sliding_extreme(_sliding_extreme(padded, size, 1, jnp.maximum), size, 2, jnp.maximum)
    lowest = _sliding_extreme(_sliding_extreme(padded, size, 1, jnp.minimum), size, 2, jnp.minimum)
    return highest != lowest


def boundary_counts(
    pred: jax.Array,
    label: jax.Array,
    num_classes: int,
    ignore_index: int = 255,
    *,
    dilation: int,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Boundary IoU counts per class (Cheng et al., CVPR 2021): int32 [C] each, summable.

    With G the ground-truth mask of class c, P the predicted one and X_d the pixels of X within
    chessboard distance d of X's contour (X_d ∩ X, the inner band, see `boundary_bands`):

      'boundary_intersection'[c] = |(G_d ∩ G) ∩ (P_d ∩ P)|
      'boundary_union'[c]        = |(G_d ∩ G) ∪ (P_d ∩ P)|

    and Boundary IoU_c = intersection / union of the counts summed over a split (`summarize`).

    Args:
      pred: integer class predictions [..., H, W].
      label: integer ground truth, same shape.
      num_classes: C.
      ignore_index: label value whose pixels are not evaluated.
      dilation: d in pixels (static), e.g. `boundary_dilation(H, W)`.
      mask: optional boolean array of the same shape; False pixels are not evaluated.

    Pixels not evaluated (the same ones `confusion_matrix` excludes: ignore label, labels or
    predictions outside [0, C), mask False) belong to neither G nor P of any class, in both the
    bands and the counts: like the image border, they delimit masks, so padding an image with
    ignore pixels (or a batch with invalid examples) changes no count.
    """
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    if pred.shape != label.shape or pred.ndim < 2:
        raise ValueError(f'pred {pred.shape} and label {label.shape} must have one shape '
                         '[..., H, W]')
    if dilation < 1:
        raise ValueError(f'boundary dilation must be >= 1 pixel, got {dilation!r}')
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    valid &= (pred >= 0) & (pred < num_classes)
    if mask is not None:  # a static choice on whether a mask was given, not on its values
        valid &= jnp.asarray(mask, bool)
    height, width = label.shape[-2:]
    label = jnp.where(valid, label, -1).reshape(-1, height, width)
    pred = jnp.where(valid, pred, -1).reshape(-1, height, width)
    truth_band = boundary_bands(label, dilation) & (label >= 0)
    pred_band = boundary_bands(pred, dilation) & (pred >= 0)
    both = truth_band & pred_band & (label == pred)

    # One bincount for the three per-class counts: bins [0, C) truth band, [C, 2C) predicted
    # band, [2C, 3C) both; excluded pixels go to bin 0 with weight 0.
    index = jnp.stack([jnp.where(truth_band, label, 0),
                       jnp.where(pred_band, pred + num_classes, 0),
                       jnp.where(both, label + 2 * num_classes, 0)])
    weights = jnp.stack([truth_band, pred_band, both]).astype(jnp.int32)
    counts = jnp.bincount(index.reshape(-1), weights=weights.reshape(-1),
                          length=3 * num_classes).astype(jnp.int32).reshape(3, num_classes)
    truth_count, pred_count, intersection = counts
    return {'boundary_intersection': intersection,
            'boundary_union': truth_count + pred_count - intersection}


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is zero (the absent-class rule)."""
    out = np.full(np.shape(numerator), np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (without numpy's RuntimeWarning) when all are NaN."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float('nan')


def summarize(cm: np.ndarray, class_names: Sequence[str] | None = None, *,
              boundary_intersection: np.ndarray | None = None,
              boundary_union: np.ndarray | None = None) -> dict:
    """Every reported metric from a summed confusion matrix (rows = truth, columns = prediction).

    With TP_c = cm[c, c], GT_c = sum_j cm[c, j] (row sum), P_c = sum_i cm[i, c] (column sum),
    FP_c = P_c - TP_c, FN_c = GT_c - TP_c and N = sum(cm):

      IoU_c       = TP_c / (TP_c + FP_c + FN_c)          NaN if the class is in neither GT nor pred
      Dice_c      = 2 TP_c / (2 TP_c + FP_c + FN_c)      (= F1_c) NaN under the same condition
      accuracy_c  = recall_c = TP_c / GT_c               NaN if the class is absent from GT
      precision_c = TP_c / P_c                           NaN if the class is never predicted
      pixel_accuracy = sum_c TP_c / N
      miou, mdice, mean_accuracy, mean_recall, mean_precision = nanmean of the per-class values
      fwiou = sum_c (GT_c / N) * IoU_c over classes present in GT

    and, given the summed `boundary_counts` (both or neither):

      boundary_iou_c = boundary_intersection_c / boundary_union_c    NaN if the union is 0
      boundary_miou  = nanmean of boundary_iou_c  (keys 'per_class_boundary_iou', 'boundary_miou')

    Args:
      cm: [C, C] confusion matrix (any integer or float dtype; computed in float64).
      class_names: optional C names, returned under 'class_names'.
      boundary_intersection, boundary_union: optional [C] Boundary IoU counts.

    Returns:
      A dict of Python floats (means) and lists of length C (per-class values, NaN allowed), so it
      can be written as JSON directly.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f'confusion matrix must be square [C, C], got shape {cm.shape}')
    num_classes = cm.shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for {num_classes} classes')
    boundary = _boundary_iou(boundary_intersection, boundary_union, num_classes)

    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    total = cm.sum()
    union = gt + predicted - tp  # TP + FP + FN

    iou = _divide(tp, union)
    dice = _divide(2 * tp, gt + predicted)
    recall = _divide(tp, gt)
    precision = _divide(tp, predicted)
    present = gt > 0
    # Classes absent from GT have zero frequency; summing over present ones avoids 0 * NaN.
    fwiou = float(np.sum(gt[present] / total * iou[present])) if total > 0 else float('nan')

    summary = {
        'miou': _nanmean(iou),
        'per_class_iou': iou.tolist(),
        'pixel_accuracy': float(tp.sum() / total) if total > 0 else float('nan'),
        'mean_accuracy': _nanmean(recall),
        'per_class_accuracy': recall.tolist(),
        'mdice': _nanmean(dice),
        'per_class_dice': dice.tolist(),
        'precision': precision.tolist(),
        'recall': recall.tolist(),
        'mean_precision': _nanmean(precision),
        'mean_recall': _nanmean(recall),
        'fwiou': fwiou,
    }
    if boundary is not None:
        summary['boundary_miou'] = _nanmean(boundary)
        summary['per_class_boundary_iou'] = boundary.tolist()
    if class_names is not None:
        summary['class_names'] = list(class_names)
    return summary


def _boundary_iou(intersection: np.ndarray | None, union: np.ndarray | None,
                  num_classes: int) -> np.ndarray | None:
    """Per-class Boundary IoU from summed counts (NaN where the union is 0), None without counts."""
    if intersection is None and union is None:
        return None
    if intersection is None or union is None:
        raise ValueError('Boundary IoU needs both boundary_intersection and boundary_union')
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    if intersection.shape != (num_classes,) or union.shape != (num_classes,):
        raise ValueError(f'boundary counts must have shape ({num_classes},), got intersection '
                         f'{intersection.shape} and union {union.shape}')
    if np.any(intersection < 0) or np.any(intersection > union):
        raise ValueError('boundary counts must satisfy 0 <= intersection <= union; got '
                         f'intersection {intersection.tolist()}, union {union.tolist()}')
    return _divide(intersection, union)


def _percent(value: float) -> str:
    return '-' if np.isnan(value) else f'{100 * value:.2f}'


def format_table(summary: dict, class_names: Sequence[str] | None = None) -> str:
    """A plain-text per-class table (IoU, accuracy, Dice and, when the summary has it, Boundary
    IoU, in %) followed by the summary metrics.

    `class_names` defaults to summary['class_names'], then to the class indices. NaN shows as '-'.
    """
    num_classes = len(summary['per_class_iou'])
    if class_names is None:
        class_names = summary.get('class_names') or [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for {num_classes} classes')

    columns = [('IoU', 'per_class_iou'), ('Acc', 'per_class_accuracy'),
               ('Dice', 'per_class_dice')]
    if 'per_class_boundary_iou' in summary:
        columns.append(('BIoU', 'per_class_boundary_iou'))
    width = max(len('class'), *(len(str(name)) for name in class_names))
    lines = [f'{"class":<{width}}' + ''.join(f'  {title:>7}' for title, _ in columns)]
    lines.append('-' * len(lines[0]))
    for c, name in enumerate(class_names):
        lines.append(f'{str(name):<{width}}' + ''.join(
            f'  {_percent(summary[key][c]):>7}' for _, key in columns))
    lines.append('')
    for key, title in [
        ('miou', 'mIoU'),
        ('mean_accuracy', 'mean accuracy'),
        ('pixel_accuracy', 'pixel accuracy'),
        ('mdice', 'mDice'),
        ('mean_precision', 'mean precision'),
        ('mean_recall', 'mean recall'),
        ('fwiou', 'fwIoU'),
        ('boundary_miou', 'boundary mIoU'),
    ]:
        if key in summary:
            lines.append(f'{title:<15} {_percent(summary[key]):>7}')
    return '\n'.join(lines)
