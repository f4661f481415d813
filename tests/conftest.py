"""Every test process sees 8 CPU devices, so sharding code is always exercised, under the
XLA:CPU flags the command-line tools set (`segjax.sharding.CPU_XLA_FLAGS`), so the numerics
tested are the numerics users get."""

import os

import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()
# Tests are about correctness on the 8 forced CPU devices, even on a machine with a GPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# torchvision (a test-only oracle) segfaults on import once TensorFlow is loaded (in triton's
# import), so it is imported first where it is installed.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass

# After torchvision (see above), before any JAX computation: XLA reads its flags once.
from segjax import sharding  # noqa: E402

os.environ['XLA_FLAGS'] = sharding.with_cpu_xla_flags(os.environ['XLA_FLAGS'])



@pytest.fixture
def default_log_state(monkeypatch):
    """segjax.logs.quiet() (every CLI calls it) changes process-wide settings; restore them
    after the test."""
    import logging

    import tensorflow_datasets as tfds

    from segjax import logs
    monkeypatch.setattr(logs, '_state', {'quiet': False, 'verbose': False})
    yield
    logging.getLogger('absl').removeFilter(logs._FILTER)
    tfds.display_progress_bar(True)


@pytest.fixture(scope='session')
def e2e_data(tmp_path_factory):
    """A TFDS data_dir shared by the command-line tests (the smoke data builds once)."""
    return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def tv():
    """(torch, torchvision), or skip: the test-only oracles; torch's generator seeded once per
    test module."""
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    return torch, torchvision
