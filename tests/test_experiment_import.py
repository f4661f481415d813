"""Experiment files load from any working directory, through every entry point, and an
experiment that cannot be imported is a one-line config error."""

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from segjax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, 'experiments', '*.py')))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository, neither it nor the repository on sys.path,
    and no experiment module imported yet (as in a fresh `segjax-train` process)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if p not in ('', '.', REPO)])
    for name in [m for m in sys.modules if m == 'experiments' or m.startswith('experiments.')]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


def test_twenty_shipped_experiments_exist():
    assert len(EXPERIMENTS) >= 20


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_every_shipped_experiment_loads_from_another_directory(path, elsewhere):
    config = config_lib.load(path)
    assert config.data.num_classes >= 2 and callable(config.model.fn)


def test_experiment_outside_the_repository_imports_its_sibling(elsewhere):
    folder = elsewhere / 'my_experiments'
    folder.mkdir()
    (folder / 'shared_base.py').write_text(
        'from segjax import config as config_lib\n'
        'def base_config():\n'
        f'    return config_lib.load({EXPERIMENTS[-1]!r})\n')
    (folder / 'short_run.py').write_text(
        'from shared_base import base_config\n'
        'def get_config():\n'
        '    c = base_config()\n'
        '    c.num_steps = 7\n'
        '    return c\n')
    config = config_lib.load(str(folder / 'short_run.py'))
    assert config.num_steps == 7
    assert str(folder) not in sys.path  # the import path is restored after loading


def test_experiment_package_outside_the_repository_imports_by_package_name(elsewhere):
    package = elsewhere / 'project' / 'myexps'
    package.mkdir(parents=True)
    (package / 'base.py').write_text(
        'from experiments.unet_synthetic import get_config as unet\n'
        'def get_config():\n'
        '    c = unet()\n'
        '    c.num_steps = 11\n'
        '    return c\n')
    (package / 'variant.py').write_text(
        'from myexps.base import get_config as base\n'
        'def get_config():\n'
        '    c = base()\n'
        '    c.batch_size = 8\n'
        '    return c\n')
    # experiments.* resolves through the working directory: run from the repository root.
    os.chdir(REPO)
    config = config_lib.load(str(package / 'variant.py'))
    assert (config.num_steps, config.batch_size) == (11, 8)


def test_missing_module_is_a_config_error_naming_file_and_module(elsewhere):
    path = elsewhere / 'broken.py'
    path.write_text('import segjax_no_such_module\n')
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(str(path))
    assert str(path) in str(info.value)
    assert "no module named 'segjax_no_such_module'" in str(info.value)


def test_syntax_error_is_a_config_error(elsewhere):
    path = elsewhere / 'typo.py'
    path.write_text('def get_config(:\n')
    with pytest.raises(config_lib.ConfigError, match='syntax error at .*typo.py:1'):
        config_lib.load(str(path))


def _console_script(name: str) -> str:
    path = os.path.join(sysconfig.get_path('scripts'), name)
    if not os.path.exists(path):
        pytest.skip(f'{name} is not installed (pip install -e .)')
    return path


@pytest.mark.slow  # whole command-line runs: `pytest -m slow` (CI runs it)
def test_console_script_loads_an_experiment_that_imports_another(tmp_path):
    # An unknown override fails after the experiment imported: exit 2, one line, no traceback.
    result = subprocess.run(
        [_console_script('segjax-train'), '--config',
         os.path.join(REPO, 'experiments', 'fcn_resnet_synthetic.py'), '--workdir',
         str(tmp_path / 'w'), '--config.no_such_key=1'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "unknown config key 'no_such_key'" in result.stderr
    assert 'Traceback' not in result.stderr


def test_cli_reports_an_unimportable_experiment_without_traceback(tmp_path):
    path = tmp_path / 'broken.py'
    path.write_text('from segjax_no_such_package import thing\n')
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.evaluate', '--config', str(path), '--workdir',
         str(tmp_path / 'w')], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert str(path) in result.stderr and "'segjax_no_such_package'" in result.stderr
