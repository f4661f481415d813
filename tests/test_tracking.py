"""Weights & Biases tracking (segjax.wandb_writer): offline runs read back with wandb's own
reader (`wandb leet inspect --json`), the mode choice, resuming a workdir's run, config
validation, and that nothing imports wandb while config.wandb.project is None.

No test reaches the network: WANDB_BASE_URL points at a closed local port, no API key is
configured, and the runs are offline."""

import configparser
import functools
import glob
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from segjax import config as config_lib
from segjax import summary, wandb_writer

EXPERIMENT = 'experiments/unet_synthetic.py'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSED_PORT_URL = 'http://127.0.0.1:9'  # the discard port: nothing listens there


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb with its settings, credentials and server kept inside tmp_path."""
    wandb = pytest.importorskip('wandb')
    for name in ('WANDB_API_KEY', 'WANDB_IDENTITY_TOKEN_FILE', 'WANDB_ENTITY', 'WANDB_PROJECT',
                 'WANDB_RUN_ID', 'WANDB_RESUME', 'WANDB_DIR', 'WANDB_MODE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('WANDB_SILENT', 'true')
    monkeypatch.setenv('WANDB_BASE_URL', CLOSED_PORT_URL)
    monkeypatch.setenv('WANDB_CONFIG_DIR', str(tmp_path / 'wandb-config'))
    monkeypatch.setenv('WANDB_CACHE_DIR', str(tmp_path / 'wandb-cache'))
    monkeypatch.setenv('WANDB_DATA_DIR', str(tmp_path / 'wandb-data'))
    monkeypatch.setenv('NETRC', str(tmp_path / 'no-netrc'))
    monkeypatch.setenv('WANDB_X_DISABLE_STATS', 'true')  # no system-metrics sampler in tests
    wandb.teardown()  # W&B's settings are read once per process: read these
    yield wandb
    wandb.teardown()


def tracked_config(*overrides):
    return config_lib.load(EXPERIMENT, ['wandb.project=segjax-test', *overrides])


def inspect_records(run_dir) -> list[dict]:
    """The run's records as wandb's own reader prints them, one JSON object a line."""
    result = subprocess.run(
        [sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', str(run_dir)],
        capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]


def records_of(records, kind):
    return [r[kind] for r in records if r['type'] == kind]


def offline_runs(wandb_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(wandb_dir, 'wandb', 'offline-run-*')))


def test_offline_run_holds_config_scalars_and_images(offline_wandb, tmp_path):
    workdir = tmp_path / 'demo'
    config = tracked_config('wandb.mode=offline', 'wandb.group=lr-study',
                            "wandb.tags=('study:lr-study', 'trial:3')", 'num_steps=40')
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 24, 3), dtype=np.uint8)

    writer = wandb_writer.WandbWriter(config, str(workdir))
    writer.scalars(2, {'train/loss': np.float32(0.5), 'train/lr': 0.001})
    writer.images(2, 'val/input_truth_prediction', images)
    writer.scalars(4, {'train/loss': 0.25, 'val/miou': 0.125})
    writer.flush()
    writer.close()

    run_id = (workdir / wandb_writer.RUN_ID_FILE).read_text().strip()
    (run_dir,) = offline_runs(workdir)  # the W&B directory defaults to the workdir
    assert run_dir.endswith(f'-{run_id}')
    assert os.path.isfile(os.path.join(run_dir, f'run-{run_id}.wandb'))
    records = inspect_records(run_dir)

    (run,) = records_of(records, 'run')
    assert run['run_id'] == run_id
    assert run['project'] == 'segjax-test'
    assert run['display_name'] == 'demo'  # the workdir's name
    assert run['run_group'] == 'lr-study'
    assert run['tags'] == ['study:lr-study', 'trial:3']
    logged = run['config']['update']
    assert logged['num_steps'] == 40
    assert logged['model']['fn'] == 'segjax.models.unet.UNet'
    assert logged['model']['base_width'] == 16
    assert logged['loss']['fn'] == 'segjax.losses.cross_entropy'
    assert logged['data']['builder'] == 'segjax.data.synthetic.SyntheticShapes'
    assert logged['data']['crop_size'] == [64, 64]
    assert logged['wandb']['tags'] == ['study:lr-study', 'trial:3']

    rows = {h['step']['num']: h['item'] for h in records_of(records, 'history')}
    assert sorted(rows) == [2, 4]
    assert rows[2]['train/loss'] == 0.5 and rows[2]['train/lr'] == 0.001
    assert rows[4]['train/loss'] == 0.25 and rows[4]['val/miou'] == 0.125
    assert 'val/miou' not in rows[2] and 'val/input_truth_prediction._type' not in rows[4]
    assert rows[2]['val/input_truth_prediction._type'] == 'images/separated'
    assert rows[2]['val/input_truth_prediction.count'] == 2
    files = rows[2]['val/input_truth_prediction.filenames']
    for image, name in zip(images, files, strict=True):  # the pixels as logged
        np.testing.assert_array_equal(
            np.asarray(Image.open(os.path.join(run_dir, 'files', name))), image)
    assert records_of(records, 'exit')[-1]['exit_code'] == 0


def test_a_crashed_run_resumes_as_the_same_run(offline_wandb, tmp_path):
    workdir = str(tmp_path / 'work')
    config = tracked_config('wandb.mode=offline', f'wandb.dir={tmp_path / "wandb-runs"}')
    writer = wandb_writer.WandbWriter(config, workdir)
    writer.scalars(1, {'train/loss': 1.0})
    with pytest.raises(RuntimeError, match='crash'):
        try:
            raise RuntimeError('crash')
        finally:  # as train's loop closes its writers
            writer.close()
    writer = wandb_writer.WandbWriter(config, workdir)
    writer.scalars(2, {'train/loss': 0.5})
    writer.close()

    # In config.wandb.dir, not the workdir; W&B adds '-1' to a second folder of the same second.
    runs = [inspect_records(d) for d in offline_runs(tmp_path / 'wandb-runs')]
    run_id = open(os.path.join(workdir, wandb_writer.RUN_ID_FILE)).read().strip()
    assert [records_of(r, 'run')[0]['run_id'] for r in runs] == [run_id, run_id]
    assert [records_of(r, 'exit')[-1]['exit_code'] for r in runs] == [1, 0]
    assert [sorted(h['step']['num'] for h in records_of(r, 'history')) for r in runs] == [[1], [2]]
    assert not os.path.exists(os.path.join(workdir, 'wandb'))


def test_other_processes_write_nothing_and_import_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(wandb_writer.jax, 'process_index', lambda: 1)
    monkeypatch.setitem(sys.modules, 'wandb', None)  # any `import wandb` would now fail
    writer = wandb_writer.WandbWriter(tracked_config(), str(tmp_path))
    writer.scalars(1, {'train/loss': 1.0})
    writer.images(1, 'val/x', np.zeros((1, 4, 4, 3), np.uint8))
    writer.close()
    assert os.listdir(tmp_path) == []


def test_no_project_means_tensorboard_only_and_no_wandb_import(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'wandb', None)
    writers = summary.make_writers(config_lib.load(EXPERIMENT), str(tmp_path))
    assert [type(w) for w in writers] == [summary.SummaryWriter]
    for writer in writers:
        writer.close()


def test_missing_wandb_names_the_pip_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'wandb', None)
    with pytest.raises(config_lib.ConfigError, match=r'pip install wandb==0\.31\.0'):
        wandb_writer.WandbWriter(tracked_config(), str(tmp_path))


def test_the_pin_is_the_one_installed_and_declared():
    requirements = open(os.path.join(ROOT, 'requirements-test.txt')).read().splitlines()
    assert wandb_writer.WANDB_PIN in requirements
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, 'setup.cfg'))
    assert setup['options.extras_require']['wandb'].strip() == wandb_writer.WANDB_PIN
    wandb = pytest.importorskip('wandb')
    assert f'wandb=={wandb.__version__}' == wandb_writer.WANDB_PIN


def _never():
    raise AssertionError('this probe should not run')


@pytest.mark.parametrize('requested, default_mode, credentials, error, expected', [
    ('online', 'offline', _never, _never, ('online', "config.wandb.mode='online'")),
    ('offline', 'online', _never, _never, ('offline', "config.wandb.mode='offline'")),
    ('auto', 'offline', _never, _never, ('offline', "W&B's own setting is mode='offline'")),
    ('auto', 'disabled', _never, _never, ('disabled', "mode='disabled'")),
    ('auto', 'online', lambda: False, _never, ('offline', 'no W&B API key is configured')),
    ('auto', 'online', lambda: True, lambda: 'timed out',
     ('offline', 'https://w.example cannot be reached (timed out)')),
    ('auto', 'online', lambda: True, lambda: None, ('online', 'https://w.example answers')),
])
def test_choose_mode(requested, default_mode, credentials, error, expected):
    mode, reason = wandb_writer.choose_mode(
        requested, default_mode=default_mode, base_url='https://w.example',
        has_credentials=credentials, server_error=error)
    assert mode == expected[0]
    assert expected[1] in reason


def test_auto_mode_is_offline_without_an_api_key(offline_wandb):
    assert wandb_writer.mode_for('auto', offline_wandb) == (
        'offline', "config.wandb.mode='auto' and no W&B API key is configured (set "
        'WANDB_API_KEY or run `wandb login`)')


def test_auto_mode_with_a_key_checks_the_server(offline_wandb, monkeypatch):
    monkeypatch.setenv('WANDB_API_KEY', 'k' * 40)
    offline_wandb.teardown()
    mode, reason = wandb_writer.mode_for('auto', offline_wandb)
    assert mode == 'offline'
    assert f'the W&B server {CLOSED_PORT_URL} cannot be reached' in reason


def test_server_error_is_none_for_any_http_answer():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(('127.0.0.1', 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert wandb_writer.server_error(f'http://127.0.0.1:{server.server_port}') is None
    finally:
        server.shutdown()
        server.server_close()
    assert 'refused' in wandb_writer.server_error(CLOSED_PORT_URL, timeout=2).lower()


def _module_level_fn(x, *, scale=1):
    return x * scale


def test_plain_config_names_callables_and_lists_arrays():
    import ml_collections

    config = ml_collections.ConfigDict({
        'fn': _module_level_fn,
        'variant': functools.partial(_module_level_fn, scale=2),
        'cls': Image.Image,
        'table': np.arange(3, dtype=np.uint8),
        'value': np.float32(0.5),
        'nested': {'sizes': ((1, 2), (3, 4)), 'name': 'x', 'none': None},
    })
    assert wandb_writer.plain_config(config) == {
        'fn': f'{__name__}._module_level_fn',
        'variant': f'{__name__}._module_level_fn(scale=2)',
        'cls': 'PIL.Image.Image',
        'table': [0, 1, 2],
        'value': 0.5,
        'nested': {'sizes': [[1, 2], [3, 4]], 'name': 'x', 'none': None},
    }


@pytest.mark.parametrize('overrides, message', [
    (['wandb.project=p', 'wandb.mode=cloud'],
     "config.wandb.mode='cloud': expected one of ['auto', 'online', 'offline']"),
    (['wandb.entity=team'],
     "config.wandb.entity='team' is set but config.wandb.project is None"),
    (["wandb.tags=('study:a',)"],
     "config.wandb.tags=('study:a',) is set but config.wandb.project is None"),
    (['wandb.mode=offline'], "config.wandb.mode='offline' is set but"),
    (['wandb.project=7'], 'config.wandb.project=7: expected a non-empty string'),
    (['wandb.project=p', "wandb.tags=('ok', 3)"],
     "config.wandb.tags=('ok', 3): expected a tuple of non-empty strings"),
])
def test_wandb_config_errors(overrides, message):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load(EXPERIMENT, overrides)
    assert message in str(error.value)
    assert EXPERIMENT in str(error.value)


def test_wandb_config_from_the_command_line_and_a_sweep():
    config = config_lib.load(EXPERIMENT, [
        'wandb.project=segjax-test', 'wandb.entity=my-team', 'wandb.mode=offline',
        "wandb.tags=('study:lr', 'trial:0')", 'wandb.dir=/tmp/wandb-runs'])
    assert config.wandb.project == 'segjax-test'
    assert config.wandb.tags == ('study:lr', 'trial:0')
    assert config.wandb.dir == '/tmp/wandb-runs'
    # What segjax.sweep sets on each trial's config.
    config.wandb.group = 'lr'
    config.wandb.tags = ('study:lr', 'trial:1')
    config_lib.validate(config)


@pytest.mark.slow
@pytest.mark.long
def test_nothing_imports_wandb_unless_a_project_is_set(tmp_path):
    code = (
        'import sys\n'
        'import segjax.train\n'
        'from segjax import config, summary\n'
        f'writers = summary.make_writers(config.load({EXPERIMENT!r}), {str(tmp_path)!r})\n'
        'print(sorted(m for m in sys.modules if m.split(".")[0] == "wandb"))\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == '[]'


@pytest.mark.slow
@pytest.mark.long
def test_train_command_logs_an_offline_wandb_run(offline_wandb, tmp_path):
    from test_end_to_end import run_cli, tiny_overrides

    workdir = tmp_path / 'run'
    result = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', workdir,
                     *tiny_overrides(tmp_path / 'tfds'), '--config.wandb.project=segjax-test',
                     '--config.wandb.mode=offline')
    assert "W&B: offline run" in result.stdout
    assert "config.wandb.mode='offline'" in result.stdout
    (run_dir,) = offline_runs(workdir)
    records = inspect_records(run_dir)
    rows = {h['step']['num']: h['item'] for h in records_of(records, 'history')}
    assert sorted(rows) == [2, 4]  # log_every=2, num_steps=4
    assert {'train/loss', 'train/lr', 'train/pixel_accuracy'} <= set(rows[2])
    metrics = json.loads((workdir / 'metrics.json').read_text())
    assert rows[4]['val/miou'] == pytest.approx(metrics['miou'])
    assert rows[4]['val/iou/circle'] == pytest.approx(metrics['per_class_iou'][1])
    assert rows[4]['val/input_truth_prediction.count'] == 2  # num_summary_images
    (run,) = records_of(records, 'run')
    assert run['config']['update']['num_steps'] == 4
    assert records_of(records, 'exit')[-1]['exit_code'] == 0
