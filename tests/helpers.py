"""What several test files do the same way with a command-line training run: stop it with a
signal at a given step, resume it, and restore the state it saved."""

import signal
import subprocess
import sys
import time

import jax
from test_end_to_end import ROOT, checkpoint_steps, run_cli

from segjax import config as config_lib
from segjax import experiment, sharding


def signal_training_at(config: str, workdir, overrides, *, step: int,
                       signal_number: int = signal.SIGTERM, delay_s: float = 0.0,
                       timeout: float = 300) -> tuple[int, str]:
    """(exit code, output) of `python -m segjax.train` sent `signal_number` `delay_s` seconds
    after it prints `step {step}/` (never sent if the run ends first)."""
    process = subprocess.Popen(
        [sys.executable, '-m', 'segjax.train', '--config', str(config), '--workdir',
         str(workdir), *map(str, overrides)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(f'step {step}/'):
            time.sleep(delay_s)
            process.send_signal(signal_number)
            break
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


def sigterm_then_resume(config: str, workdir, overrides, *, step: int,
                        num_steps: int) -> subprocess.CompletedProcess:
    """SIGTERM after `step`: the run exits 0 with a checkpoint short of `num_steps` (the one
    the signal saved); then the same command resumes it to the end. Returns the resumed run."""
    returncode, output = signal_training_at(config, workdir, overrides, step=step)
    assert returncode == 0, output[-3000:]
    assert checkpoint_steps(workdir)[-1] < num_steps, (checkpoint_steps(workdir), output[-3000:])
    return run_cli('segjax.train', '--config', config, '--workdir', workdir, *overrides)


def restored_state(config: str, workdir, overrides, step: int | None = None):
    """The train state a run saved in `workdir` (the latest or `step`), fetched to the host;
    `overrides` are the run's `--config.x=y` flags."""
    loaded = config_lib.load(config, [o[len('--config.'):] for o in overrides])
    _, state = experiment.restore_state(loaded, str(workdir), sharding.make_mesh(), step)
    return jax.device_get(state)
