"""Two processes x two CPU devices over loopback (gloo): train, checkpoint and evaluate together,
and the cross-host evaluation equals a single-process evaluation of the same checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest
from test_end_to_end import EXPERIMENT, ROOT, run_cli, tiny_overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_two_processes_train_and_evaluate_like_one(tmp_path):
    workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
           'JAX_PLATFORMS': 'cpu'}
    port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, '-m', 'segjax.train', '--config', EXPERIMENT, '--workdir', str(workdir),
         '--multihost', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={i}', *tiny_overrides(data_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert '4 devices, 2 processes' in outputs[0]
    assert 'step 4/4' in outputs[0] and 'step 4/4' not in outputs[1]  # only process 0 logs
    assert sorted(os.listdir(workdir / 'checkpoints'))[-1] == '4'
    two_process = json.loads((workdir / 'metrics.json').read_text())

    run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', workdir,
            *tiny_overrides(data_dir))
    one_process = json.loads((workdir / 'eval' / 'metrics.json').read_text())
    # Every validation pixel counted exactly once across hosts, padding nowhere.
    assert one_process['confusion_matrix'] == two_process['confusion_matrix']
    assert sum(map(sum, two_process['confusion_matrix'])) == 16 * 32 * 32


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_coordinator_listens_on_the_coordinator_host_only(tmp_path):
    if not os.path.exists('/proc/net/tcp'):
        pytest.skip('needs Linux /proc/net to list listening sockets')
    port = free_port()
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
           'JAX_PLATFORMS': 'cpu'}
    script = os.path.join(ROOT, 'tests', 'multihost_listeners.py')
    processes = [subprocess.Popen(
        [sys.executable, script, f'127.0.0.1:{port}', str(i)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    listening = [line.split()[1:] for line in outputs[0].splitlines()
                 if line.startswith('LISTENING')][0]
    coordinator = [a for a in listening if int(a.rsplit(':', 1)[1], 16) == port]
    # 127.0.0.1 as /proc/net/tcp or tcp6 (an IPv4-mapped ::ffff:127.0.0.1) writes it; JAX's own
    # default would be [::] (all zeros), every interface.
    assert coordinator and all(a.split(':')[0] in ('0100007F', '0000000000000000FFFF00000100007F')
                               for a in coordinator), listening
