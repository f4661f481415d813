"""segjax.trainers: the adversarial (Luc et al. 2016) and semi-supervised (Hung et al. 2018)
steps against their formulas, the skip guard, 1 device = 8 devices = 2 processes x 2 devices,
and the command lines (train, SIGTERM + resume, evaluate, predict, bad input)."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import restored_state, sigterm_then_resume
from multiprocess_steps import batches_for, fixed_batches, run, trained_leaves
from test_end_to_end import ROOT, run_cli, tiny_overrides
from test_multihost import free_port
from test_scale_out import one_device_mesh

from segjax import config as config_lib
from segjax import losses, sharding, trainers
from segjax.models.discriminator import ImageLabelDiscriminator, PixelDiscriminator
from segjax.trainers import adversarial, semisupervised

ADVERSARIAL = 'experiments/adversarial_unet_synthetic.py'
SEMISUP = 'experiments/semisup_unet_synthetic.py'
LR = 0.1


class NoNormNet(nn.Module):
    """No BatchNorm: labelled and unlabelled images through one pass change nothing."""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(self.num_classes, (3, 3))(nn.relu(nn.Conv(6, (3, 3))(x)))


def common():
    return {'model': NoNormNet(), 'tx': optax.sgd(LR), 'loss_fn': losses.cross_entropy,
            'num_classes': 4, 'ignore_index': 255, 'image_shape': (1, 32, 32, 3)}


def batch(size=4, seed=0):
    b = fixed_batches(1, size, 32)[0]  # the pixel discriminator needs 32x32 at least
    b['unlabelled_image'] = np.random.default_rng(seed + 7).normal(
        size=b['image'].shape).astype(np.float32)
    return b


def assert_trees_close(a, b, **tolerance):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


def adam_first_update(grads, lr):
    """optax.adam's first step: m_hat = g, v_hat = g^2, update = -lr g / (|g| + eps)."""
    return jax.tree.map(lambda g: -lr * g / (jnp.abs(g) + 1e-8), grads)


def test_adversarial_step_follows_luc_et_al():
    weight, d_lr = 0.7, 1e-2
    trainer = adversarial.trainer(**common(), discriminator_features=4,
                                  discriminator_lr=d_lr, adversarial_weight=weight)
    state = trainer.init(jax.random.key(0))
    b = batch()
    new, stats = trainer.step(state, b, jax.random.key(1))
    model, d = NoNormNet(), ImageLabelDiscriminator(features=4)
    d_vars = {'params': state.discriminator['params'],
              'batch_stats': state.discriminator['batch_stats']}
    labels, images = b['label'], b['image']

    def total(params):
        logits = model.apply({'params': params}, images)
        fake = jax.nn.softmax(logits, -1)
        generator = -jnp.mean(jax.nn.log_sigmoid(d.apply(d_vars, images, fake)))
        return losses.cross_entropy(logits, labels) + weight * generator, fake

    (expected_loss, fake), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    np.testing.assert_allclose(stats['loss'], expected_loss, rtol=1e-5)
    assert_trees_close(new.params, jax.tree.map(lambda p, g: p - LR * g, state.params, grads),
                       rtol=1e-5, atol=1e-6)

    # The discriminator: real = one-hot truth (the prediction where the label is ignored),
    # fake = the prediction; BCE: -log sigmoid(real) - log(1 - sigmoid(fake)).
    valid = labels != 255
    one_hot = jax.nn.one_hot(np.where(valid, labels, 0), 4)
    real = jnp.where(valid[..., None], one_hot, fake)

    def d_loss(params):
        variables = {**d_vars, 'params': params}
        logits = d.apply(variables, jnp.concatenate([images, images]),
                         jnp.concatenate([real, fake]))
        r, f = logits[:4], logits[4:]
        return -jnp.mean(jax.nn.log_sigmoid(r)) - jnp.mean(jax.nn.log_sigmoid(-f))

    value, d_grads = jax.value_and_grad(d_loss)(d_vars['params'])
    np.testing.assert_allclose(stats['loss/discriminator'], value, rtol=1e-5)
    expected = jax.tree.map(jnp.add, d_vars['params'], adam_first_update(d_grads, d_lr))
    assert_trees_close(new.discriminator['params'], expected, rtol=1e-4, atol=1e-6)
    for key in ('loss/supervised', 'loss/adversarial', 'discriminator/real_accuracy',
                'discriminator/fake_accuracy', 'pixel_accuracy', 'grad_norm'):
        assert np.isfinite(stats[key]), key


@pytest.mark.parametrize('current_step', [0, 3])
def test_semisupervised_step_follows_hung_et_al(current_step):
    w_adv, w_unlabelled, w_self, threshold, start, d_lr = 0.3, 0.2, 0.5, 0.45, 2, 1e-2
    trainer = semisupervised.trainer(
        **common(), discriminator_features=4, discriminator_lr=d_lr,
        adversarial_weight=w_adv, unlabelled_adversarial_weight=w_unlabelled,
        self_training_weight=w_self, confidence_threshold=threshold, self_training_start=start)
    state = trainer.init(jax.random.key(0))
    state = state.replace(step=jnp.asarray(current_step, jnp.int32))
    b = batch()
    new, stats = trainer.step(state, b, jax.random.key(1))
    model, d = NoNormNet(), PixelDiscriminator(features=4)
    d_vars = {'params': state.discriminator['params']}
    labels = b['label']
    valid = labels != 255

    def total(params):
        logits_l = model.apply({'params': params}, b['image'])
        logits_u = model.apply({'params': params}, b['unlabelled_image'])
        conf_l = d.apply(d_vars, jax.nn.softmax(logits_l, -1))
        conf_u = d.apply(d_vars, jax.nn.softmax(logits_u, -1))
        adv = -jnp.sum(jax.nn.log_sigmoid(conf_l) * valid) / valid.sum()
        adv_u = -jnp.mean(jax.nn.log_sigmoid(conf_u))
        confident = jax.nn.sigmoid(jax.lax.stop_gradient(conf_u)) > threshold
        pseudo = jnp.argmax(logits_u, -1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_u, -1), pseudo[..., None],
                                   -1)[..., 0]
        self_training = jnp.sum(nll * confident) / jnp.maximum(confident.sum(), 1)
        on = float(current_step >= start)
        value = (losses.cross_entropy(logits_l, labels) + w_adv * adv + w_unlabelled * adv_u
                 + on * w_self * self_training)
        return value, (logits_l, logits_u, confident.mean())

    (expected_loss, (logits_l, logits_u, confident)), grads = jax.value_and_grad(
        total, has_aux=True)(state.params)
    np.testing.assert_allclose(stats['loss'], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(stats['self_training/confident_pixels'], confident, rtol=1e-6)
    assert_trees_close(new.params, jax.tree.map(lambda p, g: p - LR * g, state.params, grads),
                       rtol=1e-5, atol=1e-6)

    # Discriminator: real one-hot truth on valid pixels; fake = both batches' predictions,
    # the labelled ones' ignored pixels not counted (AdvSemiSeg's D_remain).
    fake = jax.nn.softmax(jnp.concatenate([logits_l, logits_u]), -1)
    real = jnp.where(valid[..., None], jax.nn.one_hot(np.where(valid, labels, 0), 4), fake[:4])
    fake_mask = jnp.concatenate([valid, jnp.ones_like(valid)])

    def d_loss(params):
        logits = d.apply({'params': params}, jnp.concatenate([real, fake]))
        r, f = logits[:4], logits[4:]
        return (-jnp.sum(jax.nn.log_sigmoid(r) * valid) / valid.sum()
                - jnp.sum(jax.nn.log_sigmoid(-f) * fake_mask) / fake_mask.sum())

    value, d_grads = jax.value_and_grad(d_loss)(d_vars['params'])
    np.testing.assert_allclose(stats['loss/discriminator'], value, rtol=1e-5)
    expected = jax.tree.map(jnp.add, d_vars['params'], adam_first_update(d_grads, d_lr))
    assert_trees_close(new.discriminator['params'], expected, rtol=1e-4, atol=1e-6)


def test_a_nan_step_leaves_both_networks_unchanged():
    trainer = semisupervised.trainer(**common(), discriminator_features=4)
    state = trainer.init(jax.random.key(0))
    b = batch()
    b['unlabelled_image'][0, 0, 0, 0] = np.nan
    new, stats = jax.jit(trainer.step)(state, b, jax.random.key(1))
    assert int(stats['skipped_steps']) == 1 and np.isnan(stats['pixel_accuracy'])
    assert int(new.step) == 1
    assert_trees_close((new.params, new.discriminator), (state.params, state.discriminator),
                       rtol=0, atol=0)


def test_semisupervised_step_reads_no_unlabelled_labels():
    """The step's only view of the unlabelled images is 'unlabelled_image': a batch without
    any other key runs, and extra keys (labels someone put there) change nothing."""
    trainer = semisupervised.trainer(**common(), discriminator_features=4)
    state = trainer.init(jax.random.key(0))
    b = batch()
    poisoned = {**b, 'unlabelled_label': np.full(b['label'].shape, 10**6, np.int32)}
    clean, _ = trainer.step(state, b, jax.random.key(1))
    dirty, _ = trainer.step(state, poisoned, jax.random.key(1))
    assert_trees_close((clean.params, clean.discriminator), (dirty.params, dirty.discriminator),
                       rtol=0, atol=0)


def test_gradient_accumulation_is_refused():
    with pytest.raises(config_lib.ConfigError, match='grad_accum_steps=2'):
        adversarial.trainer(**{**common(), 'grad_accum_steps': 2})


@pytest.mark.slow  # two compilations of each step: `pytest -m slow` (CI runs it)
@pytest.mark.parametrize('kind', ['adversarial', 'semisupervised'])
def test_one_device_equals_eight(kind):
    batches = batches_for(kind, 3, 8)
    single = trained_leaves(run(one_device_mesh(), batches, kind=kind))
    eight = trained_leaves(run(sharding.make_mesh(), batches, kind=kind))
    for a, b in zip(single, eight, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_two_processes_equal_one_device(tmp_path):
    kinds = ('adversarial', 'semisupervised')
    port, out = free_port(), tmp_path / 'params'
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': sharding.with_cpu_xla_flags(
        '--xla_force_host_platform_device_count=2')}
    script = os.path.join(ROOT, 'tests', 'multiprocess_steps.py')
    processes = [subprocess.Popen(
        [sys.executable, script, f'127.0.0.1:{port}', str(i), str(out), ','.join(kinds)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    for p in processes:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    for kind in kinds:
        two_processes = list(np.load(f'{out}.{kind}.npz').values())
        single = trained_leaves(run(one_device_mesh(), batches_for(kind, 3, 8), kind=kind))
        assert len(two_processes) == len(single)
        for a, b in zip(single, two_processes, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_supervised_trainer_is_the_train_step():
    trainer = trainers.supervised(**common())
    state = trainer.init(jax.random.key(0))
    b = fixed_batches(1, 4, 32)[0]
    from segjax import step

    direct, _ = step.train_step(state, b, jax.random.key(1), model=NoNormNet(),
                                tx=optax.sgd(LR), loss_fn=losses.cross_entropy)
    via, _ = trainer.step(state, b, jax.random.key(1))
    assert_trees_close(direct.params, via.params, rtol=0, atol=0)
    assert via.discriminator == {}


# ------------------------------------------------------------------------ command lines

def semisup_overrides(data_dir, **extra):
    return tiny_overrides(data_dir, **{'trainer.discriminator_features': 4,
                                       'trainer.self_training_start': 2, **extra})


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_semisupervised_train_resume_evaluate_predict(tmp_path, e2e_data):
    """SIGTERM + resume equals an uninterrupted run (both networks, both optimizer states,
    both data streams); evaluate and predict use the segmentation network."""
    overrides = semisup_overrides(e2e_data, num_steps=6, log_every=1, checkpoint_every=1000)
    straight = tmp_path / 'straight'
    result = run_cli('segjax.train', '--config', SEMISUP, '--workdir', straight, *overrides)
    assert '| supervised ' in result.stdout and '| self_training ' in result.stdout
    assert 'D acc real' in result.stdout

    interrupted = tmp_path / 'interrupted'
    sigterm_then_resume(SEMISUP, interrupted, overrides, step=3, num_steps=6)

    a = restored_state(SEMISUP, straight, overrides)
    b = restored_state(SEMISUP, interrupted, overrides)
    assert int(a.step) == int(b.step) == 6
    assert a.discriminator['params']
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)

    evaluated = run_cli('segjax.evaluate', '--config', SEMISUP, '--workdir', straight,
                        *overrides)
    assert 'mIoU' in evaluated.stdout
    image = tmp_path / 'x.png'
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    run_cli('segjax.predict', '--config', SEMISUP, '--workdir', straight, *overrides,
            '--input', image, '--output', tmp_path / 'out')
    assert (tmp_path / 'out' / 'x_mask.png').exists()


@pytest.mark.slow  # several processes or full runs: `pytest -m slow` (CI runs it)
def test_adversarial_experiment_trains(tmp_path, e2e_data):
    result = run_cli('segjax.train', '--config', ADVERSARIAL, '--workdir', tmp_path,
                     *tiny_overrides(e2e_data, **{'trainer.discriminator_features': 4}))
    assert '| adversarial ' in result.stdout and '| discriminator ' in result.stdout


@pytest.mark.parametrize('value', [0.0, -0.5, 1.5, float('nan')])
def test_a_labelled_fraction_outside_0_1_is_a_clear_error(value):
    config = config_lib.load(SEMISUP)
    config.data.labelled_fraction = value
    with pytest.raises(config_lib.ConfigError,
                       match=r'labelled_fraction=.*: expected a share of the train split'):
        config_lib.validate(config)


@pytest.mark.slow  # whole command-line runs: `pytest -m slow` (CI runs it)
def test_no_unlabelled_images_is_a_clear_error(tmp_path, e2e_data):
    result = run_cli('segjax.train', '--config', SEMISUP, '--workdir', tmp_path,
                     *semisup_overrides(e2e_data, **{'data.labelled_fraction': 1.0}),
                     check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'labelled_fraction=1.0 leaves none: set it below 1' in result.stderr
    assert 'Traceback' not in result.stderr


def test_unknown_trainer_option_is_a_clear_error():
    with pytest.raises(config_lib.ConfigError, match="did you mean 'confidence_threshold'"):
        config_lib.load(SEMISUP, ['trainer.confidence_treshold=0.3'])
