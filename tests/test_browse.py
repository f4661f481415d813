"""python -m segjax.browse on the smoke-size synthetic data: the grids hold the stored (or the
training pipeline's) images and labels pixel for pixel, the legend the classes present, and bad
input is a clear error."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from segjax import browse, visualize
from segjax.data import synthetic

EXPERIMENT = 'experiments/unet_synthetic.py'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PALETTE = synthetic.PALETTE
NAMES = synthetic.CLASS_NAMES
SIZE = 32  # the smoke images' height and width
WHITE, VOC_VOID = (255, 255, 255), (224, 224, 192)  # the ignore and no-class colours


def smoke_overrides(data_dir, **extra):
    values = {'data.builder_config': 'smoke', 'data.data_dir': str(data_dir), **extra}
    return [f'--config.{k}={v}' for k, v in values.items()]


@pytest.fixture
def browse_main(default_log_state):
    """browse.main in this process (quiet() changes process-wide settings, restored after)."""
    return browse.main


@pytest.fixture(scope='module')
def stored_train(e2e_data):
    """The smoke train split as stored (read with TFDS itself): [(image, label)] in order."""
    builder = synthetic.SyntheticShapes(data_dir=str(e2e_data), config='smoke')
    builder.download_and_prepare()
    ds = builder.as_dataset(split='train', shuffle_files=False)
    return [(ex['image'], ex['label'][..., 0]) for ex in tfds.as_numpy(ds)]


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'))


def panels(grid, row, height, width):
    """The image, label-colour and overlay panels of `row` (rows all height x width)."""
    top = browse.GAP + row * (height + browse.GAP)
    lefts = [browse.GAP + i * (width + browse.GAP) for i in range(3)]
    return [grid[top:top + height, left:left + width] for left in lefts]


def swatch_colors(grid, num_entries):
    """The centre pixel of each legend swatch, top to bottom (the legend ends GAP above the
    grid's bottom)."""
    legend_top = grid.shape[0] - browse.GAP - num_entries * browse.LEGEND_ROW
    x = browse.GAP + browse.SWATCH // 2
    return [tuple(grid[legend_top + i * browse.LEGEND_ROW + browse.LEGEND_ROW // 2, x])
            for i in range(num_entries)]


def expected_legend(labels):
    return [f'{c} {NAMES[c]}' for c in np.unique(np.concatenate([lb.ravel() for lb in labels]))]


def expected_grid_shape(rows, height, width, legend):
    rows_width = 2 * browse.GAP + 3 * width + 2 * browse.GAP
    legend_width = browse.render_legend([(np.zeros(3, np.uint8), t) for t in legend]).shape[1]
    return (browse.GAP + rows * (height + browse.GAP) + len(legend) * browse.LEGEND_ROW
            + browse.GAP, max(rows_width, legend_width), 3)


def test_stored_split_grids_hold_the_decoded_images_and_labels(tmp_path, e2e_data, stored_train):
    """The real command line: 6 images, 4 a grid -> grid_000 (4 rows) and grid_001 (2 rows)."""
    output = tmp_path / 'new' / 'browse'  # created, parents too
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.browse', '--config', EXPERIMENT, '--output', str(output),
         '--num_images', '6', '--per_grid', '4', *smoke_overrides(e2e_data)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f'wrote {output}/grid_000.png (4 images, ')
    assert lines[1].startswith(f'wrote {output}/grid_001.png (2 images, ')
    assert lines[2] == f"browsed 6 images of 'train' (as stored) in 2 grids in {output}"
    assert sorted(os.listdir(output)) == ['grid_000.png', 'grid_001.png']
    for index, examples in enumerate((stored_train[:4], stored_train[4:6])):
        grid = read_png(output / f'grid_{index:03d}.png')
        legend = expected_legend([label for _, label in examples])
        assert grid.shape == expected_grid_shape(len(examples), SIZE, SIZE, legend)
        for row, (image, label) in enumerate(examples):
            image_panel, label_panel, overlay_panel = panels(grid, row, SIZE, SIZE)
            np.testing.assert_array_equal(image_panel, image)  # uint8, exactly
            np.testing.assert_array_equal(label_panel, PALETTE[label])
            blend = np.rint(0.5 * image.astype(np.float32) + 0.5 * PALETTE[label])
            np.testing.assert_array_equal(overlay_panel, blend.astype(np.uint8))
        present = np.unique(np.concatenate([label.ravel() for _, label in examples]))
        assert swatch_colors(grid, len(legend)) == [tuple(PALETTE[c]) for c in present]


def find_window(panel, stored_images):
    """(index, top, left, flipped) of the stored image window `panel` is (within 1), or None."""
    height, width = panel.shape[:2]
    for index, image in enumerate(stored_images):
        for flipped, source in ((False, image), (True, image[:, ::-1])):
            for top in range(source.shape[0] - height + 1):
                for left in range(source.shape[1] - width + 1):
                    window = source[top:top + height, left:left + width].astype(np.int16)
                    if np.abs(window - panel).max() <= 1:
                        return index, top, left, flipped
    return None


def test_augmented_grids_hold_the_pipelines_crops(tmp_path, e2e_data, stored_train,
                                                  browse_main, capsys):
    crop = (24, 28)
    written = browse_main(['--config', EXPERIMENT, '--output', str(tmp_path), '--augmented',
                           '--num_images', '5', '--per_grid', '5',
                           *smoke_overrides(e2e_data, **{'data.crop_size': crop})])
    assert [w.path for w in written] == [str(tmp_path / 'grid_000.png')]
    assert written[0].num_images == 5
    grid = read_png(written[0].path)
    labels = []
    for row in range(5):
        image_panel, label_panel, _ = panels(grid, row, *crop)
        # A random crop (and maybe a flip) of a stored train image, denormalised from float.
        found = find_window(image_panel.astype(np.int16), [image for image, _ in stored_train])
        assert found is not None, f'row {row} is no window of a stored image'
        index, top, left, flipped = found
        label = stored_train[index][1][:, ::-1] if flipped else stored_train[index][1]
        label = label[top:top + crop[0], left:left + crop[1]]
        np.testing.assert_array_equal(label_panel, PALETTE[label])
        labels.append(label)
    legend = expected_legend(labels)
    assert list(written[0].legend) == legend  # exactly the classes present, by index
    assert grid.shape == expected_grid_shape(5, *crop, legend)
    assert swatch_colors(grid, len(legend)) == [
        tuple(PALETTE[int(t.split()[0])]) for t in legend]
    assert "browsed 5 images of 'train' (augmented) in 1 grid in" in capsys.readouterr().out


def test_grid_shows_ignore_and_values_that_are_no_class():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[0, 3, 255], [9, 3, 0]], np.uint8)
    grid, legend = browse.grid([{'image': image, 'label': label}], PALETTE, NAMES, 255)
    assert legend == ['0 background', '3 triangle', '255 ignore', 'not a class: 9']
    _, label_panel, overlay_panel = panels(grid, 0, 2, 3)
    black, yellow = (0, 0, 0), tuple(PALETTE[3])
    np.testing.assert_array_equal(label_panel, [[black, yellow, WHITE],
                                                [VOC_VOID, yellow, black]])
    np.testing.assert_array_equal(overlay_panel, visualize.overlay(image, label_panel))
    assert swatch_colors(grid, 4) == [black, yellow, WHITE, VOC_VOID]


def test_special_colors_avoid_the_palette():
    palette = np.array([[255, 255, 255], [1, 2, 3]], np.uint8)  # white is a class here
    ignore, no_class = browse.special_colors(palette)
    assert tuple(ignore) == VOC_VOID and tuple(no_class) == (255, 0, 255)


def test_unknown_split_is_a_clear_error(tmp_path, e2e_data, browse_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        browse_main(['--config', EXPERIMENT, '--output', str(tmp_path / 'out'),
                     '--split', 'tran', *smoke_overrides(e2e_data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--split: split 'tran' is not a split of synthetic_shapes/smoke/1.0.0" in err
    assert "available: 'train', 'validation'" in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('flag, value', [('--num_images', '0'), ('--per_grid', '-3'),
                                         ('--num_images', 'many')])
def test_non_positive_counts_are_clear_errors(tmp_path, flag, value, browse_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        browse_main(['--config', EXPERIMENT, '--output', str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'argument {flag}: expected a positive integer, got' in err and value in err
