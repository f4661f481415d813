"""Confusion matrix, Boundary IoU and derived metrics against values computed by hand and
against plain numpy/scipy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import ndimage

from segjax.metrics import (
    boundary_counts,
    boundary_dilation,
    confusion_matrix,
    format_table,
    summarize,
)

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


# ----------------------------------------------------------------------------------------------
# Boundary IoU.


def reference_inner_band(mask: np.ndarray, dilation: int) -> np.ndarray:
    """boundary_iou_api's mask_to_boundary, line by line in scipy: pad by one 0 pixel
    (cv2.copyMakeBorder), erode d times with a 3x3 square whose outside never erodes (cv2.erode's
    default border), crop, and keep the mask minus its erosion."""
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3), bool), iterations=dilation,
                                    border_value=1)[1:-1, 1:-1]
    return mask.astype(bool) & ~eroded


def reference_boundary_counts(pred, label, num_classes, dilation, ignore_index=255):
    """Per image and class: the inner bands of the class masks (pixels not evaluated belong to no
    mask), then intersection and union of the bands, summed over images."""
    intersection = np.zeros(num_classes, np.int64)
    union = np.zeros(num_classes, np.int64)
    for p, t in zip(pred.reshape(-1, *pred.shape[-2:]), label.reshape(-1, *label.shape[-2:]),
                    strict=True):
        evaluated = ((t != ignore_index) & (t >= 0) & (t < num_classes) & (p >= 0)
                     & (p < num_classes))
        for c in range(num_classes):
            truth = reference_inner_band((t == c) & evaluated, dilation)
            predicted = reference_inner_band((p == c) & evaluated, dilation)
            intersection[c] += np.sum(truth & predicted)
            union[c] += np.sum(truth | predicted)
    return intersection, union


def random_blobs(rng, shape, num_classes, sigma=2.0):
    """Label maps of smooth blobs: argmax over classes of smoothed noise."""
    noise = rng.normal(size=(*shape, num_classes))
    smooth = ndimage.gaussian_filter(noise, sigma=(0,) * (len(shape) - 2) + (sigma, sigma, 0))
    return smooth.argmax(-1).astype(np.int32)


def square_and_shifted_square():
    """8x8, class 1 a 6x6 square at rows/cols 1..6 (truth) and at cols 2..7 (prediction)."""
    label = np.zeros((8, 8), np.int32)
    label[1:7, 1:7] = 1
    pred = np.zeros((8, 8), np.int32)
    pred[1:7, 2:8] = 1
    return pred, label


def test_boundary_dilation_follows_the_reference():
    # max(1, round(0.02 * diagonal)): Cityscapes 1024x2048 (45.8), 512x512 (14.5), tiny (0.3).
    assert boundary_dilation(1024, 2048) == 46
    assert boundary_dilation(512, 512) == 14
    assert boundary_dilation(375, 500) == 12
    assert boundary_dilation(13, 11) == 1
    assert boundary_dilation(30, 40, ratio=0.1) == 5
    with pytest.raises(ValueError, match='ratio must be > 0'):
        boundary_dilation(10, 10, ratio=0.0)


def test_golden_boundary_counts_square_vs_shifted_square():
    pred, label = square_and_shifted_square()
    counts = boundary_counts(pred, label, 2, dilation=1)
    # Class 1, d=1: each square's band is its ring of 36 - 16 = 20 pixels (the shifted square
    # touches the image border, which is a contour); the rings share rows 1 and 6 at cols 2..6:
    # 10 pixels. Class 0: every background pixel is within 1 of the border or of the square, in
    # truth (28) and prediction (28); both are 0 on rows 0 and 7 and col 0: 16 + 6 = 22.
    np.testing.assert_array_equal(counts['boundary_intersection'], [22, 10])
    np.testing.assert_array_equal(counts['boundary_union'], [28 + 28 - 22, 20 + 20 - 10])
    s = summarize(confusion_matrix(pred, label, 2), **counts)
    assert_close(s['per_class_boundary_iou'], [22 / 34, 1 / 3])
    assert_close(s['boundary_miou'], (22 / 34 + 1 / 3) / 2)
    # With d=2 the class-1 bands are the squares minus their 2x2 centres (rows 3..4, cols 3..4
    # and cols 4..5): 32 each. They share the squares' overlap (rows 1..6, cols 2..6: 30) but
    # rows 3..4 at cols 3..5, where one of them is centre: 24.
    counts = boundary_counts(pred, label, 2, dilation=2)
    assert int(counts['boundary_intersection'][1]) == 24
    assert int(counts['boundary_union'][1]) == 32 + 32 - 24


def test_perfect_prediction_has_boundary_iou_one():
    label = random_blobs(np.random.default_rng(3), (2, 20, 30), 4)
    counts = boundary_counts(label, label, 4, dilation=3)
    np.testing.assert_array_equal(counts['boundary_intersection'], counts['boundary_union'])
    assert_close(summarize(confusion_matrix(label, label, 4), **counts)['boundary_miou'], 1.0)


@pytest.mark.parametrize('dilation', [1, 2, 3, 5, 40])
def test_boundary_counts_match_the_reference_on_random_blobs(dilation):
    rng = np.random.default_rng(dilation)
    label = random_blobs(rng, (3, 23, 37), 5)
    label[0, 5:12, 8:20] = 255  # an ignored region
    label[1][rng.random((23, 37)) < 0.05] = 255  # scattered ignored pixels
    label[2, 0, :] = 7  # a label outside [0, C): not evaluated either
    pred = random_blobs(rng, (3, 23, 37), 5, sigma=3.0)
    counts = jax.jit(boundary_counts, static_argnames=('num_classes', 'dilation'))(
        pred, label, num_classes=5, dilation=dilation)
    intersection, union = reference_boundary_counts(pred, label, 5, dilation)
    np.testing.assert_array_equal(counts['boundary_intersection'], intersection)
    np.testing.assert_array_equal(counts['boundary_union'], union)
    assert counts['boundary_union'].dtype == jnp.int32


def test_default_dilation_matches_the_reference_at_realistic_size():
    rng = np.random.default_rng(4)
    label = random_blobs(rng, (1, 150, 200), 6, sigma=8.0)
    pred = random_blobs(rng, (1, 150, 200), 6, sigma=8.0)
    dilation = boundary_dilation(150, 200)  # 5
    counts = boundary_counts(pred, label, 6, dilation=dilation)
    intersection, union = reference_boundary_counts(pred, label, 6, dilation)
    np.testing.assert_array_equal(counts['boundary_intersection'], intersection)
    np.testing.assert_array_equal(counts['boundary_union'], union)


def test_boundary_counts_of_batches_sum_to_the_whole():
    rng = np.random.default_rng(5)
    label = random_blobs(rng, (4, 16, 20), 3)
    pred = random_blobs(rng, (4, 16, 20), 3)
    whole = boundary_counts(pred, label, 3, dilation=2)
    halves = [boundary_counts(pred[i:i + 2], label[i:i + 2], 3, dilation=2) for i in (0, 2)]
    for key in ('boundary_intersection', 'boundary_union'):
        np.testing.assert_array_equal(whole[key], halves[0][key] + halves[1][key])


def test_ignored_pixels_belong_to_no_mask_and_count_nowhere():
    # A 5x5 image of class 1 cut by an ignored column: two 5x2 truth masks, every pixel in their
    # d=1 band (20). The prediction (class 1 everywhere) is cut the same way, so it matches;
    # were it left whole, its band would be its 16-pixel ring and Boundary IoU 14/22.
    label = np.ones((5, 5), np.int32)
    label[:, 2] = 255
    pred = np.ones((5, 5), np.int32)
    counts = boundary_counts(pred, label, 2, dilation=1)
    np.testing.assert_array_equal(counts['boundary_intersection'], [0, 20])
    np.testing.assert_array_equal(counts['boundary_union'], [0, 20])
    # Whatever is predicted on ignored pixels changes nothing.
    pred[:, 2] = 0
    counts = boundary_counts(pred, label, 2, dilation=1)
    np.testing.assert_array_equal(counts['boundary_intersection'], [0, 20])
    np.testing.assert_array_equal(counts['boundary_union'], [0, 20])


def test_padding_with_ignore_or_masking_changes_no_count():
    # Ignored padding acts like the image border (a contour), as in the reference; so does a
    # False mask, e.g. the invalid filler examples of the last eval batch.
    rng = np.random.default_rng(6)
    label = random_blobs(rng, (2, 13, 11), 4)
    pred = random_blobs(rng, (2, 13, 11), 4)
    plain = boundary_counts(pred, label, 4, dilation=2)
    padded_label = np.full((3, 16, 24), 255, np.int32)
    padded_label[:2, :13, :11] = label
    padded_pred = rng.integers(0, 4, (3, 16, 24)).astype(np.int32)
    padded_pred[:2, :13, :11] = pred
    padded = boundary_counts(padded_pred, padded_label, 4, dilation=2)
    mask = np.zeros((3, 16, 24), bool)
    mask[:2, :13, :11] = True
    masked = boundary_counts(padded_pred, np.where(mask, padded_label, 0), 4, dilation=2,
                             mask=mask)
    for key in ('boundary_intersection', 'boundary_union'):
        np.testing.assert_array_equal(padded[key], plain[key])
        np.testing.assert_array_equal(masked[key], plain[key])


def test_boundary_iou_absent_class_is_nan_and_left_out_of_the_mean():
    pred, label = square_and_shifted_square()
    counts = boundary_counts(pred, label, 4, dilation=1)  # classes 2 and 3 appear nowhere
    s = summarize(confusion_matrix(pred, label, 4), **counts)
    assert_close(s['per_class_boundary_iou'], [22 / 34, 1 / 3, NAN, NAN])
    assert_close(s['boundary_miou'], (22 / 34 + 1 / 3) / 2)
    # Class 2 predicted but absent from truth: 0, and it counts in the mean.
    pred[0, 0] = 2
    s = summarize(confusion_matrix(pred, label, 4), **boundary_counts(pred, label, 4, dilation=1))
    assert s['per_class_boundary_iou'][2] == 0.0 and math.isnan(s['per_class_boundary_iou'][3])
    assert_close(s['boundary_miou'], np.nanmean(s['per_class_boundary_iou']))


def test_boundary_iou_is_optional_and_needs_both_counts():
    assert 'boundary_miou' not in summarize(GOLDEN_CM)
    assert 'BIoU' not in format_table(summarize(GOLDEN_CM))
    with pytest.raises(ValueError, match='needs both'):
        summarize(GOLDEN_CM, boundary_intersection=np.zeros(4))
    with pytest.raises(ValueError, match=r'shape \(4,\)'):
        summarize(GOLDEN_CM, boundary_intersection=np.zeros(3), boundary_union=np.ones(3))
    with pytest.raises(ValueError, match='intersection <= union'):
        summarize(GOLDEN_CM, boundary_intersection=np.full(4, 2), boundary_union=np.ones(4))
    with pytest.raises(ValueError, match='one shape'):
        boundary_counts(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), 3, dilation=1)


def test_format_table_shows_boundary_iou():
    pred, label = square_and_shifted_square()
    summary = summarize(confusion_matrix(pred, label, 2),
                        **boundary_counts(pred, label, 2, dilation=1))
    table = format_table(summary, ['background', 'square'])
    assert 'BIoU' in table.splitlines()[0]
    assert table.splitlines()[3].split()[-1] == '33.33'  # the square's Boundary IoU in %
    assert 'boundary mIoU' in table and f'{100 * summary["boundary_miou"]:.2f}' in table


def test_boundary_counts_sharded_over_8_devices_match_the_reference():
    if jax.device_count() < 8:
        pytest.skip('needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)')
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P('data'))
    rng = np.random.default_rng(7)
    label = random_blobs(rng, (16, 12, 10), 3)
    label[rng.random(label.shape) < 0.05] = 255
    pred = random_blobs(rng, (16, 12, 10), 3)
    counts = jax.jit(boundary_counts, static_argnames=('num_classes', 'dilation'))(
        jax.device_put(pred, sharding), jax.device_put(label, sharding), num_classes=3,
        dilation=2)
    intersection, union = reference_boundary_counts(pred, label, 3, 2)
    np.testing.assert_array_equal(np.asarray(counts['boundary_intersection']), intersection)
    np.testing.assert_array_equal(np.asarray(counts['boundary_union']), union)
