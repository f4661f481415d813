"""Augmentation properties of segjax.data.transforms: sizes, ignore padding, alignment of image
and label, cat_max_ratio, label maps, photometric distortion, and no invented label values."""

import numpy as np
import pytest
import tensorflow as tf

from segjax.data import transforms


def _seed(i: int) -> tf.Tensor:
    return tf.constant([i, 7], tf.int32)


def coded_example(height: int, width: int, label: np.ndarray | None = None) -> dict:
    """Image channels = (row, column, label): where a pixel came from is readable after any
    crop, flip or 90-degree rotation, and so is whether the label moved with it."""
    rows, cols = np.mgrid[:height, :width]
    if label is None:
        label = ((rows // 4 + cols // 5) % 3 * 2).astype(np.uint8)  # classes 0, 2, 4
    image = np.stack([rows, cols, label], -1).astype(np.uint8)
    return {'image': tf.constant(image), 'label': tf.constant(label.astype(np.uint8))}


def halves(height: int = 16, width: int = 64) -> np.ndarray:
    """Class 1 on the left half, class 2 on the right half."""
    label = np.ones((height, width), np.uint8)
    label[:, width // 2:] = 2
    return label


def _np(example: dict) -> tuple[np.ndarray, np.ndarray]:
    return example['image'].numpy(), example['label'].numpy()


def test_random_scale_of_a_base_size_keeps_aspect_and_label_values():
    example = coded_example(30, 40)
    sizes = set()
    for i in range(6):
        image, label = _np(transforms.random_scale(
            example, _seed(i), min_ratio=0.5, max_ratio=2.0, base_size=(80, 45)))
        height, width = label.shape
        # Fitted into long 80 x short 45 first (factor 1.5 -> 45x60), then scaled by 0.5..2.0.
        assert 0.5 * 45 - 1 <= height <= 2.0 * 45 + 1 and abs(width / height - 4 / 3) < 0.05
        assert image.shape == (height, width, 3) and set(np.unique(label)) <= {0, 2, 4}
        sizes.add((height, width))
    assert len(sizes) > 3


def test_resize_keep_ratio_fits_the_long_and_short_edges():
    label = transforms.resize_keep_ratio(coded_example(30, 40), base_size=(2048, 512))['label']
    assert label.shape == (512, 683)
    label = transforms.resize_keep_ratio(coded_example(50, 20), base_size=(100, 10))['label']
    assert label.shape == (25, 10)


@pytest.mark.parametrize('cat_max_ratio', [1.0, 0.75])
def test_crop_is_a_window_or_padding_with_ignore(cat_max_ratio):
    example = coded_example(20, 50)
    for i in range(5):
        image, label = _np(transforms.random_crop_or_pad(
            example, _seed(i), height=32, width=24, cat_max_ratio=cat_max_ratio))
        assert image.shape == (32, 24, 3) and label.shape == (32, 24)
        assert (label[20:] == 255).all() and (image[20:] == 0).all()  # padded rows
        x = image[0, 0, 1]
        np.testing.assert_array_equal(image[:20, :, 1], np.arange(x, x + 24)[None].repeat(20, 0))
        np.testing.assert_array_equal(image[:20, :, 0], np.arange(20)[:, None].repeat(24, 1))
        np.testing.assert_array_equal(label[:20], image[:20, :, 2])  # label moved with image


def test_cat_max_ratio_respected_when_possible():
    example = coded_example(16, 64, halves())
    shares = {}
    for ratio in (1.0, 0.75):
        shares[ratio] = []
        for i in range(20):
            _, label = _np(transforms.random_crop_or_pad(
                example, _seed(i), height=16, width=32, cat_max_ratio=ratio))
            shares[ratio].append(float(transforms.max_class_share(label)))
    # Without the constraint some crops are dominated by one class; with it none is.
    assert max(shares[1.0]) >= 0.75
    assert max(shares[0.75]) < 0.75


def test_cat_max_ratio_ignores_255_and_falls_back_when_impossible():
    label = halves()
    label[:, :16] = 255  # ignored pixels never count towards a class's share
    assert float(transforms.max_class_share(tf.constant(label))) == pytest.approx(32 / 48)
    single = coded_example(16, 64, np.full((16, 64), 3, np.uint8))
    image, out = _np(transforms.random_crop_or_pad(
        single, _seed(0), height=16, width=32, cat_max_ratio=0.75))
    assert out.shape == (16, 32) and (out == 3).all()  # no qualifying window: still a crop


def test_random_crop_is_deterministic_per_seed():
    example = coded_example(40, 60)
    a = _np(transforms.random_crop_or_pad(example, _seed(3), height=24, width=24,
                                          cat_max_ratio=0.75))
    b = _np(transforms.random_crop_or_pad(example, _seed(3), height=24, width=24,
                                          cat_max_ratio=0.75))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_flip_keeps_image_and_label_aligned():
    example = coded_example(12, 20)
    flips = 0
    for i in range(8):
        image, label = _np(transforms.random_flip(example, _seed(i)))
        np.testing.assert_array_equal(label, image[..., 2])
        flips += int(image[0, 0, 1] == 19)
    assert 0 < flips < 8


def test_rotate_by_90_degrees_is_exact_and_aligned():
    example = coded_example(15, 15)
    image, label = _np(transforms.rotate(example, 90.0))
    original_image, original_label = _np(example)
    candidates = [np.rot90(original_label, k) for k in (1, 3)]
    assert any(np.array_equal(label, c) for c in candidates)
    np.testing.assert_array_equal(label, image[..., 2])


def test_rotation_fills_image_with_zero_and_label_with_ignore():
    example = coded_example(21, 21, np.full((21, 21), 4, np.uint8))
    image, label = _np(transforms.rotate(example, 45.0, ignore_index=255))
    assert label[0, 0] == 255 and (image[0, 0] == 0).all()
    assert label[10, 10] == 4
    assert set(np.unique(label)) <= {4, 255}
    for i in range(4):
        _, label = _np(transforms.random_rotate(example, _seed(i), max_degrees=30.0))
        assert set(np.unique(label)) <= {4, 255}


def test_photometric_distortion_changes_only_the_image():
    rng = np.random.default_rng(0)
    example = {'image': tf.constant(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
               'label': tf.constant(rng.integers(0, 3, (16, 16), dtype=np.uint8))}
    changed = 0
    for i in range(6):
        out = transforms.photometric_distortion(example, _seed(i))
        assert out['image'].dtype == tf.uint8 and out['image'].shape == (16, 16, 3)
        np.testing.assert_array_equal(out['label'].numpy(), example['label'].numpy())
        again = transforms.photometric_distortion(example, _seed(i))
        np.testing.assert_array_equal(out['image'].numpy(), again['image'].numpy())
        changed += int(not np.array_equal(out['image'].numpy(), example['image'].numpy()))
    assert changed >= 4


def test_map_labels_and_check_label_values():
    example = {'image': tf.zeros([1, 4, 3], tf.uint8),
               'label': tf.constant([[0, 7, 33, 255]], tf.uint8)}
    table = [255] * 256
    table[7], table[33] = 0, 18
    mapped = transforms.map_labels(example, table)['label'].numpy()
    np.testing.assert_array_equal(mapped, [[255, 0, 18, 255]])
    transforms.check_label_values({'label': tf.constant(mapped)}, num_classes=19)
    with pytest.raises(tf.errors.InvalidArgumentError, match='33'):
        transforms.check_label_values(example, num_classes=19)
    with pytest.raises(ValueError, match='256 entries'):
        transforms.label_lookup_table([0, 1, 2])


def test_full_recipe_introduces_no_label_values():
    example = coded_example(40, 60)
    for i in range(6):
        seeds = tf.unstack(tf.random.experimental.stateless_split(_seed(i), 5))
        out = transforms.random_scale(example, seeds[0], min_ratio=0.5, max_ratio=2.0,
                                      base_size=(64, 48))
        out = transforms.random_crop_or_pad(out, seeds[1], height=48, width=48,
                                            cat_max_ratio=0.75)
        out = transforms.random_flip(out, seeds[2])
        out = transforms.random_rotate(out, seeds[3], max_degrees=20.0)
        out = transforms.photometric_distortion(out, seeds[4])
        assert out['label'].shape == (48, 48) and out['image'].shape == (48, 48, 3)
        assert set(np.unique(out['label'].numpy())) <= {0, 2, 4, 255}


@pytest.mark.parametrize('shape,ratio_range', [((30, 40), (0.5, 2.0)), ((45, 20), (1.5, 2.5))])
def test_fused_scale_crop_equals_scale_then_crop(shape, ratio_range):
    rng = np.random.default_rng(1)
    height, width = shape
    label = np.kron(rng.integers(0, 4, (height // 5 + 1, width // 5 + 1)), np.ones((5, 5)))
    example = {'image': tf.constant(rng.integers(0, 256, shape + (3,), dtype=np.uint8)),
               'label': tf.constant(label[:height, :width].astype(np.uint8))}
    for i in range(8):
        options = dict(min_ratio=ratio_range[0], max_ratio=ratio_range[1], base_size=(64, 40))
        scaled = transforms.random_scale(example, _seed(i), **options)
        expected = transforms.random_crop_or_pad(scaled, _seed(100 + i), height=48, width=32,
                                                 cat_max_ratio=0.75)
        fused = transforms.random_scale_crop(example, _seed(i), _seed(100 + i), height=48,
                                             width=32, cat_max_ratio=0.75, **options)
        np.testing.assert_array_equal(fused['label'].numpy(), expected['label'].numpy())
        # A label map applied to the window equals mapping the whole label first.
        table = [255] * 256
        table[1], table[3] = 0, 1
        mapped = transforms.random_scale_crop(
            transforms.map_labels(example, table), _seed(i), _seed(100 + i), height=48,
            width=32, cat_max_ratio=0.75, **options)
        in_window = transforms.random_scale_crop(
            example, _seed(i), _seed(100 + i), height=48, width=32, cat_max_ratio=0.75,
            label_map=table, **options)
        np.testing.assert_array_equal(in_window['label'].numpy(), mapped['label'].numpy())
        np.testing.assert_array_equal(in_window['image'].numpy(), mapped['image'].numpy())
        difference = np.abs(fused['image'].numpy().astype(int) - expected['image'].numpy())
        assert difference.max() <= 1
