"""Scale-out: the same update on 1 device, 8 devices and 2 processes x 2 devices; gradient
accumulation; EMA; the non-finite guard; bfloat16; exact resume after SIGTERM; kill -9."""

import functools
import os
import re
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import restored_state, signal_training_at, sigterm_then_resume
from jax.sharding import AxisType
from multiprocess_steps import fixed_batches, run, trained_leaves
from test_end_to_end import EXPERIMENT, ROOT, checkpoint_steps, run_cli, tiny_overrides
from test_multihost import free_port

from segjax import losses, optim, sharding, step


def one_device_mesh():
    return jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_two_processes_reach_the_same_parameters_as_one_device(tmp_path):
    port, out = free_port(), tmp_path / 'params.npz'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': sharding.with_cpu_xla_flags(
        '--xla_force_host_platform_device_count=2')}
    script = os.path.join(ROOT, 'tests', 'multiprocess_steps.py')
    processes = [subprocess.Popen([sys.executable, script, f'127.0.0.1:{port}', str(i), str(out)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in processes:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    two_processes = list(np.load(out).values())
    single = trained_leaves(run(one_device_mesh(), fixed_batches(3, 8)))
    eight = trained_leaves(run(sharding.make_mesh(), fixed_batches(3, 8)))
    for a, b, c in zip(single, eight, two_processes, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(a, c, rtol=2e-4, atol=2e-5)


class NoNormNet(nn.Module):
    """Convolutions only: with no BatchNorm, accumulation must equal the large batch exactly."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Conv(self.num_classes, (1, 1))(x)


@pytest.mark.parametrize('mesh_devices', [1, 8])
def test_gradient_accumulation_equals_the_large_batch(mesh_devices):
    mesh = one_device_mesh() if mesh_devices == 1 else sharding.make_mesh()
    model, tx = NoNormNet(), optim.adamw(1e-2, weight_decay=1e-4)
    rng = np.random.default_rng(1)
    batch = {'image': rng.normal(size=(32, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, 3, size=(32, 8, 8)).astype(np.int32)}
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    results = {}
    for accum in (1, 4):
        state = step.create_state(model, tx, jax.random.key(0), (1, 8, 8, 3))
        train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx,
                                               loss_fn=losses.cross_entropy,
                                               grad_accum_steps=accum))
        for _ in range(2):
            state, stats = train_step(state, batch, jax.random.key(1))
        results[accum] = (jax.device_get(state.params), float(stats['loss']))
    np.testing.assert_allclose(results[1][1], results[4][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[4][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ema_follows_the_bias_corrected_rule():
    model, tx = NoNormNet(), optim.sgd(0.5, momentum=0.0, weight_decay=0.0)
    state = step.create_state(model, tx, jax.random.key(0), (1, 8, 8, 3), ema=True)
    batch = {'image': jnp.ones((2, 8, 8, 3)), 'label': jnp.zeros((2, 8, 8), jnp.int32)}
    new, _ = step.train_step(state, batch, jax.random.key(1), model=model, tx=tx,
                             loss_fn=losses.cross_entropy, ema_decay=0.999)
    # Step 0: decay = min(0.999, (1 + 0) / (10 + 0)) = 0.1, so ema = 0.1 * old + 0.9 * new.
    for e, old, p in zip(jax.tree.leaves(new.ema['params']), jax.tree.leaves(state.params),
                         jax.tree.leaves(new.params), strict=True):
        np.testing.assert_allclose(e, 0.1 * old + 0.9 * p, rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])


def test_a_nan_step_is_skipped_and_counted():
    model, tx = NoNormNet(), optim.adamw(1e-2)
    state = step.create_state(model, tx, jax.random.key(0), (1, 8, 8, 3), ema=True)
    good = {'image': jnp.ones((2, 8, 8, 3)), 'label': jnp.zeros((2, 8, 8), jnp.int32)}
    bad = {**good, 'image': good['image'].at[0, 0, 0, 0].set(jnp.nan)}
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx,
                                           loss_fn=losses.cross_entropy, ema_decay=0.9))
    after_bad, stats = train_step(state, bad, jax.random.key(1))
    assert int(stats['skipped_steps']) == 1 and int(stats['nonfinite_run']) == 1
    # The skipped step's logits are NaN: its logged accuracy says so rather than a made-up value.
    assert np.isnan(stats['pixel_accuracy']) and np.isnan(stats['loss'])
    assert int(after_bad.step) == 1  # the data position still advances
    for tree in ('params', 'opt_state', 'ema'):
        for a, b in zip(jax.tree.leaves(getattr(after_bad, tree)),
                        jax.tree.leaves(getattr(state, tree)), strict=True):
            np.testing.assert_array_equal(a, b)
    after_good, stats = train_step(after_bad, good, jax.random.key(1))
    assert int(stats['nonfinite_run']) == 0 and int(stats['skipped_steps']) == 1
    assert 0.0 <= float(stats['pixel_accuracy']) <= 1.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after_good.params))


@pytest.mark.slow  # whole command-line runs: `pytest -m slow` (CI runs it)
def test_persistent_nan_stops_the_run_with_a_clear_error(tmp_path, e2e_data):
    # An absurd learning rate makes every step after the first non-finite.
    result = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', tmp_path,
                     *tiny_overrides(e2e_data, num_steps=50, **{
                         'optimizer.lr': 1e30, 'max_nonfinite_steps': 3,
                         'schedule.warmup_steps': 0}), check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert '3 consecutive steps had a non-finite loss or gradient' in result.stderr
    assert 'Traceback' not in result.stderr


def losses_printed(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r'^step \d+/\d+ \| loss ([0-9.]+)', stdout, re.M)]


@pytest.mark.slow  # whole command-line runs: `pytest -m slow` (CI runs it)
def test_bfloat16_run_converges(tmp_path, e2e_data):
    result = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', tmp_path,
                     *tiny_overrides(e2e_data, num_steps=60, log_every=1, dtype='bfloat16',
                                     **{'model.base_width': 8, 'schedule.warmup_steps': 5}))
    printed = losses_printed(result.stdout)
    assert len(printed) == 60
    # From ln(8) = 2.08 at step 1: the loss falls steadily in bfloat16 too.
    assert np.mean(printed[-5:]) < 0.75 * printed[0], printed


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, e2e_data):
    overrides = tiny_overrides(e2e_data, num_steps=10, log_every=1, checkpoint_every=1000,
                               ema_decay=0.9)
    straight = tmp_path / 'straight'
    run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', straight, *overrides)

    interrupted = tmp_path / 'interrupted'
    stop_after = int(np.random.default_rng().integers(2, 8))  # a random step
    sigterm_then_resume(EXPERIMENT, interrupted, overrides, step=stop_after, num_steps=10)

    a = restored_state(EXPERIMENT, straight, overrides)
    b = restored_state(EXPERIMENT, interrupted, overrides)
    assert int(a.step) == int(b.step) == 10
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state, a.ema)),
                    jax.tree.leaves((b.params, b.batch_stats, b.opt_state, b.ema)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_kill_9_during_saves_resumes_from_a_complete_checkpoint(tmp_path, e2e_data):
    workdir = tmp_path / 'run'
    overrides = tiny_overrides(e2e_data, num_steps=100000, log_every=1, checkpoint_every=1)
    # From step 6 on a save is in flight at almost every moment: kill -9 at a random instant.
    signal_training_at(EXPERIMENT, workdir, overrides, step=6, signal_number=signal.SIGKILL,
                       delay_s=float(np.random.default_rng().uniform(0, 0.5)), timeout=60)
    # Also leave a partial checkpoint as a crash mid-write would: it must never be read.
    partial = workdir / 'checkpoints' / '99999.orbax-checkpoint-tmp-1'
    partial.mkdir(parents=True)
    (partial / 'garbage').write_text('half a checkpoint')
    complete = checkpoint_steps(workdir)
    assert complete and max(complete) < 99999
    result = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', workdir,
                     *tiny_overrides(e2e_data, num_steps=max(complete) + 1))
    assert f'resuming at step {max(complete)}/' in result.stdout
    assert not partial.exists(), 'orbax removes unfinished temporary checkpoints on start'
