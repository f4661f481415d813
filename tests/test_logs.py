"""What the command lines print: segjax's own lines, no library chatter unless --verbose, and
evaluation progress."""

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_end_to_end import EXPERIMENT, ROOT, tiny_overrides

from segjax import config as config_lib
from segjax import evaluate, logs, metrics, sharding
from segjax.data import synthetic

# Lines the CLIs printed before: TensorFlow's C++ logging, orbax's absl warnings for a read-only
# checkpoint manager, TFDS's banners and tqdm progress bars.
NOISE = ('oneDNN', 'cpu_feature_guard', 'absl::InitializeLog', 'I0000 ', 'W0000 ',
         'Given directory is read only', 'read_only=True', 'Downloading and preparing',
         'downloaded and prepared', 'examples/s', 'Shuffling', '%|')


def assert_quiet(output: str) -> None:
    found = [pattern for pattern in NOISE if pattern in output]
    assert not found, f'library noise {found} in:\n{output[-3000:]}'


def run(module, *args, env=None):
    result = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f'{module} exited {result.returncode}:\n{result.stderr[-3000:]}'
    return result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# The pieces.


def test_verbose_from_flag_and_environment(monkeypatch):
    monkeypatch.delenv(logs.ENV_VAR, raising=False)
    assert not logs.verbose_from_environment(['--config', 'x.py'])
    assert logs.verbose_from_environment(['--config', 'x.py', '--verbose'])
    for value, verbose in (('1', True), ('yes', True), ('0', False), ('', False)):
        monkeypatch.setenv(logs.ENV_VAR, value)
        assert logs.verbose_from_environment([]) is verbose


def _record(level: int, pathname: str) -> logging.LogRecord:
    return logging.LogRecord('absl', level, pathname, 1, 'message', None, None)


def test_quiet_hides_library_records_below_error_only(default_log_state):
    absl_logger = logging.getLogger('absl')
    orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
    tfds_file = '/site-packages/tensorflow_datasets/core/dataset_builder.py'
    ours = '/repo/segjax/data/voc.py'
    assert logs.quiet(False) is False and logs.is_quiet()
    assert not absl_logger.filter(_record(logging.WARNING, orbax))
    assert not absl_logger.filter(_record(logging.INFO, tfds_file))
    assert absl_logger.filter(_record(logging.ERROR, orbax))  # errors always show
    assert absl_logger.filter(_record(logging.WARNING, ours))  # segjax's own warnings show
    assert logs.quiet(True) is True and not logs.is_quiet()
    assert absl_logger.filter(_record(logging.WARNING, orbax))


def test_format_seconds():
    assert [logs.format_seconds(s) for s in (0, 59.9, 78, 3600 + 125)] == [
        '0s', '59s', '1m18s', '1h02m']


def test_progress_line():
    # 480 images in 39 s: 12.3 img/s; 969 left take 78.7 s.
    assert evaluate.progress_line(480, 1449, 39.0) == (
        'eval: 480/1,449 images | 12.3 img/s | ETA 1m18s')
    assert evaluate.progress_line(0, 10, 0.0) == 'eval: 0/10 images | 0.0 img/s | ETA ?'


def test_counts_over_split_prints_progress(tmp_path, capsys):
    config = config_lib.defaults()
    config.data.builder_config = synthetic.SyntheticShapesConfig(
        name='progress', image_size=16, num_train=4, num_validation=12, min_object_size=6,
        max_object_size=12)
    builder = synthetic.SyntheticShapes(config=config.data.builder_config,
                                        data_dir=str(tmp_path))
    builder.download_and_prepare()
    capsys.readouterr()  # TFDS's banners
    config.data.num_classes = len(synthetic.CLASS_NAMES)
    config.eval_batch_size = 8  # 12 images: two batches, the second padded
    mesh = sharding.make_mesh()

    def eval_fn(state, batch):  # a perfect model: the matrix is the labels' histogram
        mask = jnp.broadcast_to(batch['valid'][:, None, None], batch['label'].shape)
        return metrics.confusion_matrix(batch['label'], batch['label'], 8, mask=mask)

    cm = evaluate.counts_over_split(None, jax.jit(eval_fn), builder, config, mesh,
                                       progress_every_s=0)
    labels = np.stack([ex['label'][..., 0] for ex in tfds.as_numpy(
        builder.as_dataset(split='validation'))])
    np.testing.assert_array_equal(np.diag(cm), np.bincount(labels.ravel(), minlength=8))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(' | ')[0] for line in lines[:2]] == [
        'eval: 8/12 images', 'eval: 12/12 images']
    assert 'img/s | ETA ' in lines[0] and lines[2].startswith('eval: 12 images in ')
    assert evaluate.counts_over_split(None, jax.jit(eval_fn), builder, config, mesh,
                                         progress_every_s=None).sum() == cm.sum()
    assert capsys.readouterr().out == ''


# ----------------------------------------------------------------------------------------------
# The command lines.


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """train on the smoke data (preparing it), with the default output."""
    root = tmp_path_factory.mktemp('logs')
    workdir, data_dir = root / 'run', root / 'tfds'
    output = run('segjax.train', '--config', EXPERIMENT, '--workdir', workdir,
                 *tiny_overrides(data_dir, num_steps=2, checkpoint_every=2))
    return {'workdir': workdir, 'data_dir': data_dir, 'root': root, 'output': output}


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_train_prints_only_its_own_lines(trained):
    assert_quiet(trained['output'])
    assert 'preparing synthetic_shapes/smoke/1.0.0' in trained['output']
    assert 'starting step 0/2' in trained['output'] and 'step 2/2' in trained['output']


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_evaluate_and_predict_quiet_and_verbose(trained):
    args = ['--config', EXPERIMENT, '--workdir', trained['workdir'],
            *tiny_overrides(trained['data_dir'])]
    output = run('segjax.evaluate', *args)
    assert_quiet(output)
    assert 'mIoU' in output and 'preparing' not in output  # the data is reused
    verbose = run('segjax.evaluate', *args, '--verbose')
    assert 'Given directory is read only' in verbose  # orbax's warning comes back
    images = trained['root'] / 'images'
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / 'a.png')
    output = run('segjax.predict', *args, '--input', images, '--output', trained['root'] / 'out')
    assert_quiet(output)
    assert 'wrote 1 x (mask, color, overlay) PNGs' in output
