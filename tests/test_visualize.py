"""Palettes, colour masks, overlays, denormalisation and the confusion-matrix PNG."""

import numpy as np
import pytest
from PIL import Image

from segjax.visualize import (
    color_mask,
    default_palette,
    denormalize,
    overlay,
    plot_confusion_matrix,
    side_by_side,
)


def test_default_palette_is_voc():
    palette = default_palette(21)
    assert palette.shape == (21, 3) and palette.dtype == np.uint8
    expected = [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
        [0, 0, 128], [128, 0, 128], [0, 128, 128], [128, 128, 128],
        [64, 0, 0], [192, 0, 0],
    ]
    np.testing.assert_array_equal(palette[:10], expected)
    np.testing.assert_array_equal(palette[20], [0, 64, 128])  # VOC 'tvmonitor'
    # The bit interleaving gives distinct colours for all 256 indices.
    assert len({tuple(c) for c in default_palette(256)}) == 256


def test_color_mask_maps_classes_and_ignore():
    palette = default_palette(3)
    mask = np.array([[0, 1], [2, 255]])
    colors = color_mask(mask, palette, ignore_color=(10, 20, 30))
    assert colors.shape == (2, 2, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors[0, 1], [128, 0, 0])
    np.testing.assert_array_equal(colors[1, 0], [0, 128, 0])
    np.testing.assert_array_equal(colors[1, 1], [10, 20, 30])
    # Default ignore colour is white; indices beyond the palette get it too.
    colors = color_mask(np.array([[255, 7]], np.uint8), palette)
    np.testing.assert_array_equal(colors, [[[255, 255, 255], [255, 255, 255]]])


def test_overlay():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    color = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    out = overlay(image, color)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    expected = np.rint(0.5 * image.astype(float) + 0.5 * color.astype(float))
    np.testing.assert_allclose(out, expected, atol=1)
    np.testing.assert_array_equal(overlay(image, color, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, color, alpha=1.0), color)
    # With a mask, pixels where mask == 0 keep the image.
    mask = np.zeros((4, 5), np.int32)
    mask[0, 0] = 3
    out = overlay(image, color, alpha=1.0, mask=mask)
    np.testing.assert_array_equal(out[0, 0], color[0, 0])
    np.testing.assert_array_equal(out[1:], image[1:])


def test_denormalize_inverts_normalisation():
    mean = np.array([123.675, 116.28, 103.53])
    std = np.array([58.395, 57.12, 57.375])
    image = np.random.default_rng(1).integers(0, 256, size=(2, 3, 4, 3)).astype(np.uint8)
    normalized = (image.astype(np.float32) - mean) / std
    restored = denormalize(normalized, mean, std)
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, image)
    # Out-of-range values are clipped rather than wrapped.
    np.testing.assert_array_equal(denormalize(np.full((1, 1, 3), 10.0), mean, std), 255)


def test_side_by_side():
    parts = [np.full((3, 4, 3), v, np.uint8) for v in (1, 2, 3)]
    out = side_by_side(*parts)
    assert out.shape == (3, 12, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 4:8], parts[1])
    assert side_by_side(*[p[None] for p in parts]).shape == (1, 3, 12, 3)
    with pytest.raises(ValueError):
        side_by_side(parts[0], parts[1][:2], parts[2])


def test_plot_confusion_matrix_writes_png(tmp_path):
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # the last class has no ground truth
    path = plot_confusion_matrix(cm, ['road', 'car', 'sky'], tmp_path / 'cm.png')
    with Image.open(path) as png:
        assert png.format == 'PNG'
        assert png.size[0] > 100 and png.size[1] > 100
        png.load()
