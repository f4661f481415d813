"""The real command lines on the smoke-size synthetic data: train -> checkpoint -> resume ->
evaluate -> predict, and the clear errors a user gets for bad input (SIGTERM and kill -9:
test_scale_out.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

EXPERIMENT = 'experiments/unet_synthetic.py'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(data_dir, **extra):
    values = {'data.builder_config': 'smoke', 'data.data_dir': str(data_dir),
              'data.crop_size': '(32,32)', 'model.base_width': 4, 'model.depth': 2,
              'batch_size': 8, 'eval_batch_size': 8, 'num_steps': 4, 'log_every': 2,
              'eval_every': 0, 'checkpoint_every': 2, 'num_summary_images': 2}
    values.update(extra)
    return [f'--config.{k}={v}' for k, v in values.items()]


def run_cli(module, *args, check=True):
    result = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'{module} exited {result.returncode}:\n{result.stderr[-4000:]}')
    return result


def checkpoint_steps(workdir):
    directory = os.path.join(workdir, 'checkpoints')
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A workdir trained for 4 steps, then resumed to 6 (without summary images)."""
    root = tmp_path_factory.mktemp('e2e')
    workdir, data_dir = root / 'run', root / 'tfds'
    first = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', workdir,
                    *tiny_overrides(data_dir))
    # The resumed run also checks that no summary images (0) is allowed.
    second = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', workdir,
                     *tiny_overrides(data_dir, num_steps=6, num_summary_images=0))
    return {'workdir': workdir, 'data_dir': data_dir, 'root': root,
            'first': first.stdout, 'second': second.stdout}


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_train_checkpoints_and_writes_metrics(trained):
    assert 'starting step 0/4' in trained['first']
    assert 'step 4/4' in trained['first']
    metrics = json.loads((trained['workdir'] / 'metrics.json').read_text())
    assert metrics['step'] == 6
    assert 0.0 <= metrics['miou'] <= 1.0
    assert len(metrics['per_class_iou']) == 8
    assert np.asarray(metrics['confusion_matrix']).sum() == 16 * 32 * 32  # every val pixel once
    check_boundary_iou(metrics)
    events = [f for f in os.listdir(trained['workdir']) if f.startswith('events.out.tfevents')]
    assert events, 'TensorBoard event file written'
    assert 'boundary mIoU' in trained['first']  # the eval line
    # Protobuf keeps tags as plain bytes: the event files hold the Boundary IoU scalars.
    tags = b''.join((trained['workdir'] / f).read_bytes() for f in events)
    assert b'val/boundary_miou' in tags and b'val/boundary_iou/circle' in tags


def check_boundary_iou(metrics):
    """metrics.json's Boundary IoU: from its summed counts, bands within the class masks."""
    cm = np.asarray(metrics['confusion_matrix'])
    intersection = np.asarray(metrics['boundary_intersection'])
    union = np.asarray(metrics['boundary_union'])
    assert union.shape == (8,) and union.sum() > 0 and np.all(intersection <= union)
    # Each band lies inside its class mask, so the union of the bands lies in the masks' union.
    assert np.all(union <= cm.sum(0) + cm.sum(1) - np.diag(cm))
    with np.errstate(invalid='ignore'):
        expected = np.where(union > 0, intersection / union, np.nan)
    np.testing.assert_allclose(np.asarray(metrics['per_class_boundary_iou'], float), expected)
    np.testing.assert_allclose(metrics['boundary_miou'], np.nanmean(expected))


def test_resume_continues_from_the_last_checkpoint(trained):
    assert 'resuming at step 4/6' in trained['second']
    assert 'step 6/6' in trained['second']
    assert checkpoint_steps(trained['workdir'])[-1] == 6


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_evaluate_latest_and_given_step(trained):
    result = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                     *tiny_overrides(trained['data_dir']))
    assert 'mIoU' in result.stdout and 'circle' in result.stdout
    metrics = json.loads((trained['workdir'] / 'eval' / 'metrics.json').read_text())
    assert metrics['step'] == 6
    trained_metrics = json.loads((trained['workdir'] / 'metrics.json').read_text())
    # The same checkpoint evaluated twice (in training and standalone) gives the same matrix.
    assert metrics['confusion_matrix'] == trained_metrics['confusion_matrix']
    assert 'boundary mIoU' in result.stdout and 'BIoU' in result.stdout
    check_boundary_iou(metrics)
    assert metrics['boundary_union'] == trained_metrics['boundary_union']
    assert metrics['boundary_intersection'] == trained_metrics['boundary_intersection']
    assert metrics['boundary_dilation_ratio'] == 0.02
    with Image.open(trained['workdir'] / 'eval' / 'confusion_matrix.png') as png:
        assert png.size[0] > 100
    result = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                     '--step', 4, *tiny_overrides(trained['data_dir']))
    assert json.loads((trained['workdir'] / 'eval' / 'metrics.json').read_text())['step'] == 4


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_predict_writes_mask_colour_and_overlay(trained):
    inputs = trained['root'] / 'images'
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (('a', (32, 32)), ('b', (45, 29))):  # odd sizes work too
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            inputs / f'{name}.png')
    out = trained['root'] / 'predictions'
    run_cli('segjax.predict', '--config', EXPERIMENT, '--workdir', trained['workdir'],
            '--input', inputs, '--output', out, *tiny_overrides(trained['data_dir']))
    for name, size in (('a', (32, 32)), ('b', (45, 29))):
        with Image.open(out / f'{name}_mask.png') as mask:
            mask = np.asarray(mask)
        assert mask.shape == size and mask.max() < 8
        for kind in ('color', 'overlay'):
            with Image.open(out / f'{name}_{kind}.png') as image:
                assert np.asarray(image).shape == (*size, 3)


def test_bad_config_key_is_a_clear_error(tmp_path):
    result = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', tmp_path,
                     '--config.optimizer.lrr=0.1', check=False)
    assert result.returncode == 2
    assert "config.optimizer.lrr: adamw takes no option 'lrr'" in result.stderr
    assert 'Traceback' not in result.stderr


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path):
    result = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', tmp_path / 'empty',
                     check=False)
    assert result.returncode == 1
    assert 'no checkpoints in workdir' in result.stderr and 'Traceback' not in result.stderr


def test_predict_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'this is not a png')
    result = run_cli('segjax.predict', '--config', EXPERIMENT, '--workdir', tmp_path,
                     '--input', bad, '--output', tmp_path / 'out', check=False)
    assert result.returncode == 1
    assert f'cannot read image {str(bad)!r}' in result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.slow  # whole command-line runs: `pytest -m slow` (CI runs it)
def test_evaluate_and_predict_with_sliding_window_and_tta(trained):
    tta = ['--config.eval.mode=slide', '--config.eval.window=(16, 16)',
           '--config.eval.stride=(12, 12)', '--config.eval.scales=(0.75, 1.0)',
           '--config.eval.flip=True']
    result = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                     *tiny_overrides(trained['data_dir']), *tta)
    assert 'mIoU' in result.stdout
    metrics = json.loads((trained['workdir'] / 'eval' / 'metrics.json').read_text())
    assert np.asarray(metrics['confusion_matrix']).sum() == 16 * 32 * 32
    bad = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                  *tiny_overrides(trained['data_dir']), '--config.eval.mode=slide', check=False)
    assert bad.returncode == 2 and 'needs config.eval.window' in bad.stderr


@pytest.mark.slow  # whole command-line runs: `pytest -m slow` (CI runs it)
def test_predict_with_crf_writes_both_and_evaluate_searches_the_crf(trained):
    crf = ['--config.eval.crf.iterations=2']
    inputs = trained['root'] / 'crf_images'
    inputs.mkdir()
    image = np.random.default_rng(1).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(image).save(inputs / 'c.png')
    out = trained['root'] / 'crf_predictions'
    result = run_cli('segjax.predict', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                     '--input', inputs, '--output', out, *tiny_overrides(trained['data_dir']),
                     *crf)
    assert 'with and without CRF' in result.stdout
    for name in ('c_mask', 'c_nocrf_mask'):
        with Image.open(out / f'{name}.png') as mask:
            assert np.asarray(mask).shape == (24, 20) and np.asarray(mask).max() < 8
    with Image.open(out / 'c_crf_compare.png') as compare:  # image | without | with
        compare = np.asarray(compare)
    assert compare.shape == (24, 60, 3)
    np.testing.assert_array_equal(compare[:, :20], image)
    with Image.open(out / 'c_nocrf_overlay.png') as overlay:
        np.testing.assert_array_equal(compare[:, 20:40], np.asarray(overlay))

    result = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                     *tiny_overrides(trained['data_dir']), *crf,
                     '--crf_grid', 'appearance_weight=3,5;theta_alpha=30')
    lines = [line for line in result.stdout.splitlines() if line.startswith('crf grid:')]
    assert len(lines) == 4 and 'no CRF' in lines[0]  # baseline, 2 settings, best
    assert '--config.eval.crf.theta_alpha=30.0' in lines[-1]
    grid = json.loads((trained['workdir'] / 'eval' / 'crf_grid.json').read_text())
    assert [r['crf'] and r['crf']['appearance_weight'] for r in grid['results']] == [None, 3, 5]
    assert grid['best']['miou'] == max(r['miou'] for r in grid['results'][1:])
    bad = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', trained['workdir'],
                  *tiny_overrides(trained['data_dir']), '--crf_grid', 'theta_alfa=3',
                  check=False)
    assert bad.returncode == 2 and "unknown key 'theta_alfa'" in bad.stderr
