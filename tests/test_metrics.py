"""Confusion matrix and derived metrics against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from segjax.metrics import confusion_matrix, format_table, summarize

# Tiny example, 4 classes (class 3 appears in neither ground truth nor prediction).
# The last two pixels are excluded: label 255 (ignore) and label 7 (outside [0, 4)).
LABEL = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 255, 7])
PRED = np.array([0, 0, 0, 1, 1, 1, 0, 2, 1, 2, 0])
# Valid (truth, prediction) pairs: (0,0) x3, (0,1), (1,1) x2, (1,0), (2,2), (2,1).
GOLDEN_CM = np.array([
    [3, 1, 0, 0],
    [1, 2, 0, 0],
    [0, 1, 1, 0],
    [0, 0, 0, 0],
])
NAN = float('nan')


def reference_cm(pred, label, num_classes, ignore_index=255):
    """Plain numpy loop, the obviously-correct reference."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for t, p in zip(np.ravel(label), np.ravel(pred), strict=True):
        if t != ignore_index and 0 <= t < num_classes and 0 <= p < num_classes:
            cm[t, p] += 1
    return cm


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float), rtol=1e-12)


def test_golden_confusion_matrix():
    cm = confusion_matrix(jnp.asarray(PRED), jnp.asarray(LABEL), 4)
    assert cm.dtype == jnp.int32 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, GOLDEN_CM)


def test_ignore_and_out_of_range_labels_are_excluded():
    # Same valid pixels plus many more ignored / out-of-range ones: the matrix must not move.
    label = np.concatenate([LABEL, [255, 255, 4, 9, -1]])
    pred = np.concatenate([PRED, [0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(confusion_matrix(pred, label, 4), GOLDEN_CM)
    # A different ignore_index: 255 is now just out of range, and label 2 is ignored.
    cm = confusion_matrix(PRED, LABEL, 4, ignore_index=2)
    expected = GOLDEN_CM.copy()
    expected[2] = 0
    np.testing.assert_array_equal(cm, expected)


def test_mask_excludes_pixels():
    mask = np.ones_like(LABEL, bool)
    mask[:3] = False  # drops three (0, 0) pixels
    expected = GOLDEN_CM.copy()
    expected[0, 0] = 0
    np.testing.assert_array_equal(confusion_matrix(PRED, LABEL, 4, mask=mask), expected)


def test_uint8_inputs():
    cm = confusion_matrix(PRED.astype(np.uint8), LABEL.astype(np.uint8), 4)
    np.testing.assert_array_equal(cm, GOLDEN_CM)


def test_golden_summary():
    s = summarize(GOLDEN_CM, class_names=['a', 'b', 'c', 'd'])
    # TP = diag = [3, 2, 1, 0]; GT = row sums = [4, 3, 2, 0]; P = column sums = [4, 4, 1, 0]; N = 9.
    # IoU = TP / (GT + P - TP): 3/5, 2/5, 1/2, 0/0 -> NaN.
    assert_close(s['per_class_iou'], [0.6, 0.4, 0.5, NAN])
    # mIoU = nanmean = (0.6 + 0.4 + 0.5) / 3 = 0.5.
    assert_close(s['miou'], 0.5)
    # Dice = 2TP / (GT + P): 6/8, 4/7, 2/3, NaN.
    assert_close(s['per_class_dice'], [0.75, 4 / 7, 2 / 3, NAN])
    assert_close(s['mdice'], (0.75 + 4 / 7 + 2 / 3) / 3)
    # Accuracy = recall = TP / GT: 3/4, 2/3, 1/2, NaN (class 3 absent from GT).
    assert_close(s['per_class_accuracy'], [0.75, 2 / 3, 0.5, NAN])
    assert_close(s['recall'], [0.75, 2 / 3, 0.5, NAN])
    # mean accuracy = (3/4 + 2/3 + 1/2) / 3 = (9/12 + 8/12 + 6/12) / 3 = 23/36.
    assert_close(s['mean_accuracy'], 23 / 36)
    assert_close(s['mean_recall'], 23 / 36)
    # Precision = TP / P: 3/4, 2/4, 1/1, NaN (class 3 never predicted); mean = 2.25 / 3 = 0.75.
    assert_close(s['precision'], [0.75, 0.5, 1.0, NAN])
    assert_close(s['mean_precision'], 0.75)
    # Pixel accuracy = (3 + 2 + 1) / 9 = 2/3.
    assert_close(s['pixel_accuracy'], 2 / 3)
    # fwIoU = 4/9 * 0.6 + 3/9 * 0.4 + 2/9 * 0.5 = (2.4 + 1.2 + 1.0) / 9 = 4.6 / 9.
    assert_close(s['fwiou'], 4.6 / 9)
    assert s['class_names'] == ['a', 'b', 'c', 'd']
    # JSON-friendly: Python floats and lists.
    assert isinstance(s['miou'], float) and isinstance(s['per_class_iou'], list)


def test_absent_class_is_nan_and_excluded_from_means():
    s = summarize(GOLDEN_CM)
    assert math.isnan(s['per_class_iou'][3]) and math.isnan(s['per_class_dice'][3])
    # The means equal those of the 3x3 matrix without class 3.
    s3 = summarize(GOLDEN_CM[:3, :3])
    for key in ['miou', 'mdice', 'mean_accuracy', 'mean_precision', 'fwiou', 'pixel_accuracy']:
        assert_close(s[key], s3[key])


def test_class_in_gt_never_predicted_has_zero_iou():
    # Class 1 is in GT once but never predicted; class 2 is predicted once but absent from GT.
    cm = np.array([
        [2, 0, 1],
        [1, 0, 0],
        [0, 0, 0],
    ])
    s = summarize(cm)
    # IoU: class 0 = 2 / (3 + 3 - 2) = 1/2; class 1 = 0 / (1 + 0 - 0) = 0; class 2 = 0 / 1 = 0.
    assert_close(s['per_class_iou'], [0.5, 0.0, 0.0])
    assert_close(s['miou'], 0.5 / 3)
    # Class 1 never predicted -> precision NaN; class 2 absent from GT -> accuracy NaN.
    assert_close(s['precision'], [2 / 3, NAN, 0.0])
    assert_close(s['per_class_accuracy'], [2 / 3, 0.0, NAN])
    assert_close(s['mean_accuracy'], 1 / 3)
    assert_close(s['mean_precision'], 1 / 3)
    # fwIoU counts classes present in GT only: 3/4 * 1/2 + 1/4 * 0 = 3/8.
    assert_close(s['fwiou'], 3 / 8)


def test_empty_matrix_gives_nan_without_warnings():
    with np.errstate(all='raise'):
        s = summarize(np.zeros((2, 2), np.int32))
    assert math.isnan(s['miou']) and math.isnan(s['pixel_accuracy']) and math.isnan(s['fwiou'])


def test_summarize_rejects_bad_inputs():
    with pytest.raises(ValueError, match='square'):
        summarize(np.zeros((2, 3)))
    with pytest.raises(ValueError, match='class names'):
        summarize(np.zeros((2, 2)), class_names=['only one'])


def test_halves_sum_to_whole():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, size=(4, 16, 16))  # 5 is out of range for C = 5
    label[rng.random(label.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=(4, 16, 16))
    whole = confusion_matrix(pred, label, 5)
    halves = confusion_matrix(pred[:2], label[:2], 5) + confusion_matrix(pred[2:], label[2:], 5)
    np.testing.assert_array_equal(whole, halves)
    np.testing.assert_array_equal(whole, reference_cm(pred, label, 5))


def test_jit_matches_reference():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 7, size=(2, 9, 11))
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, 6, size=(2, 9, 11))
    jitted = jax.jit(confusion_matrix, static_argnames=('num_classes', 'ignore_index'))
    cm = jitted(jnp.asarray(pred), jnp.asarray(label), num_classes=6)
    np.testing.assert_array_equal(cm, reference_cm(pred, label, 6))


def test_sharded_over_8_devices_matches_reference():
    if jax.device_count() < 8:
        pytest.skip('needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)')
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P('data'))
    rng = np.random.default_rng(2)
    label = rng.integers(0, 5, size=(16, 8, 8)).astype(np.int32)
    label[rng.random(label.shape) < 0.15] = 255
    pred = rng.integers(0, 4, size=(16, 8, 8)).astype(np.int32)
    jitted = jax.jit(confusion_matrix, static_argnames=('num_classes', 'ignore_index'))
    cm = jitted(jax.device_put(pred, sharding), jax.device_put(label, sharding), num_classes=4)
    np.testing.assert_array_equal(np.asarray(cm), reference_cm(pred, label, 4))


def test_format_table():
    names = ['background', 'aeroplane', 'bicycle', 'bird']
    table = format_table(summarize(GOLDEN_CM), names)
    for name in names:
        assert name in table
    # IoU of class 0 is 60.00 %, class 3 is NaN -> '-', mIoU 50.00.
    assert '60.00' in table and '-' in table and '50.00' in table
    assert 'mIoU' in table and 'fwIoU' in table
    # Without names, the summary's names (or indices) are used.
    assert 'bird' in format_table(summarize(GOLDEN_CM, names))
