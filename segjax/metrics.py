"""Segmentation metrics: a confusion matrix on device, every reported number derived in numpy.

The confusion matrix is the only thing accumulated during evaluation. It is a sum of counts, so
matrices from batches, devices and hosts are simply added; everything reported (mIoU, accuracy,
Dice, precision, recall, fwIoU) is computed once from the summed matrix by `summarize`.

Rule for absent classes (one rule, used everywhere, as in mmsegmentation and the Cityscapes
evaluator): a metric whose denominator is zero is NaN, and NaN entries are left out of the means.
So a class absent from both ground truth and prediction has NaN IoU/Dice and does not count in
mIoU/mDice; a class present in ground truth but never predicted (or predicted but absent from
ground truth) has IoU 0 and does count.
"""

from __future__ import annotations

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


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is zero (the absent-class rule)."""
    out = np.full(np.shape(numerator), np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN (without numpy's RuntimeWarning) when all are NaN."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float('nan')


def summarize(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
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

    Args:
      cm: [C, C] confusion matrix (any integer or float dtype; computed in float64).
      class_names: optional C names, returned under 'class_names'.

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
    if class_names is not None:
        summary['class_names'] = list(class_names)
    return summary


def _percent(value: float) -> str:
    return '-' if np.isnan(value) else f'{100 * value:.2f}'


def format_table(summary: dict, class_names: Sequence[str] | None = None) -> str:
    """A plain-text per-class table (IoU, accuracy, Dice in %) followed by the summary metrics.

    `class_names` defaults to summary['class_names'], then to the class indices. NaN shows as '-'.
    """
    num_classes = len(summary['per_class_iou'])
    if class_names is None:
        class_names = summary.get('class_names') or [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f'{len(class_names)} class names for {num_classes} classes')

    width = max(len('class'), *(len(str(name)) for name in class_names))
    lines = [f'{"class":<{width}}  {"IoU":>7}  {"Acc":>7}  {"Dice":>7}']
    lines.append('-' * len(lines[0]))
    for c, name in enumerate(class_names):
        iou = _percent(summary['per_class_iou'][c])
        acc = _percent(summary['per_class_accuracy'][c])
        dice = _percent(summary['per_class_dice'][c])
        lines.append(f'{str(name):<{width}}  {iou:>7}  {acc:>7}  {dice:>7}')
    lines.append('')
    for key, title in [
        ('miou', 'mIoU'),
        ('mean_accuracy', 'mean accuracy'),
        ('pixel_accuracy', 'pixel accuracy'),
        ('mdice', 'mDice'),
        ('mean_precision', 'mean precision'),
        ('mean_recall', 'mean recall'),
        ('fwiou', 'fwIoU'),
    ]:
        lines.append(f'{title:<15} {_percent(summary[key]):>7}')
    return '\n'.join(lines)
