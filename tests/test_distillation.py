"""Knowledge distillation: the two losses against hand-computed values and torch (the pixel-wise
KL as torch's kl_div, the pair-wise term as Liu et al.'s sim_dis_compute), and
segjax.trainers.distillation's step on a tiny teacher restored from a real checkpoint: its
formula, the teacher's gradient, kd_weight=0 = the supervised step, the EMA teacher, the
errors, and (slow) SIGTERM + resume through the command line."""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import restored_state, sigterm_then_resume
from test_end_to_end import ROOT, run_cli, tiny_overrides

from segjax import checkpoint, experiment, losses, optim, sharding, trainers
from segjax import config as config_lib
from segjax.trainers import distillation

TEACHER_CONFIG = os.path.join(ROOT, 'experiments', 'unet_synthetic.py')
DISTILL = 'experiments/distill_unet_synthetic.py'
TEACHER_OVERRIDES = ('model.base_width=4', 'model.depth=2')
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # unet_synthetic's
NUM_CLASSES, SIZE, LR = 8, 16, 0.1


def value_and_grad(fn, **options):
    """fn's value and gradient in its first argument, options bound, compiled: one XLA program
    rather than dozens of eager op dispatches."""
    return jax.jit(jax.value_and_grad(lambda *args: fn(*args, **options)))


def random_logits(seed, shape=(2, 5, 6, 4)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2).astype(np.float32)


def random_labels(seed, shape=(2, 5, 6), num_classes=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
    labels[rng.random(shape) < 0.3] = 255
    return labels


# ------------------------------------------------------------------------ pixel-wise KD

def test_pixelwise_kd_golden_value_and_gradient():
    # T = 2. Pixel 0: softmax(s/T) = (3/4, 1/4), softmax(t/T) = (1/2, 1/2):
    # KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3). Pixel 1: ignored, its logits NaN.
    # Pixel 2: student = teacher, KL 0. Value: T^2 (1/2 ln(4/3) + 0) / 2 = ln(4/3).
    student = jnp.array([[[2 * math.log(3.0), 0.0], [jnp.nan, jnp.inf], [1.0, -1.0]]])
    teacher = jnp.array([[[0.0, 0.0], [jnp.nan, -jnp.inf], [1.0, -1.0]]])
    labels = jnp.array([[1, 255, 0]])
    value, grad = value_and_grad(losses.pixelwise_kd, temperature=2.0)(student, teacher, labels)
    np.testing.assert_allclose(value, math.log(4 / 3), rtol=1e-6)
    # d/ds = T (softmax(s/T) - softmax(t/T)) / |V| = 2 ((3/4, 1/4) - (1/2, 1/2)) / 2.
    np.testing.assert_allclose(grad, [[[0.25, -0.25], [0.0, 0.0], [0.0, 0.0]]], atol=1e-6)


def test_pixelwise_kd_matches_torch_kl_div():
    torch = pytest.importorskip('torch')
    student, teacher, labels = random_logits(0), random_logits(1), random_labels(2)
    temperature = 3.0
    value, grad = value_and_grad(losses.pixelwise_kd, temperature=temperature)(
        student, teacher, labels)
    valid = labels != 255
    s = torch.tensor(student[valid], requires_grad=True)  # [|V|, C]
    t = torch.tensor(teacher[valid])
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(s / temperature, -1), torch.softmax(t / temperature, -1),
        reduction='batchmean') * temperature**2
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    expected_grad = np.zeros_like(student)
    expected_grad[valid] = s.grad.numpy()
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_pixelwise_kd_counts_only_valid_pixels():
    """Ignored pixels and labels outside [0, C) count nowhere, whatever the logits hold."""
    student, teacher, labels = random_logits(3), random_logits(4), random_labels(5)
    labels[0, 0, 0] = 7  # outside [0, 4): not valid either
    invalid = (labels == 255) | (labels >= 4)
    poisoned_s = np.where(invalid[..., None], np.nan, student)
    poisoned_t = np.where(invalid[..., None], np.inf, teacher)
    clean = losses.pixelwise_kd(student, teacher, labels, temperature=1.5)
    value, grad = value_and_grad(losses.pixelwise_kd, temperature=1.5)(poisoned_s, poisoned_t,
                                                                       labels)
    np.testing.assert_allclose(value, clean, rtol=1e-6)
    assert np.all(np.asarray(grad)[invalid] == 0)
    # The valid pixels' mean: the same loss over them alone.
    valid = ~invalid
    alone = losses.pixelwise_kd(student[valid][None], teacher[valid][None],
                                np.zeros((1, valid.sum()), np.int32), temperature=1.5)
    np.testing.assert_allclose(value, alone, rtol=1e-5)


def test_kd_losses_on_an_empty_batch_are_zero_with_finite_gradients():
    student, teacher = random_logits(6, (1, 4, 4, 3)), random_logits(7, (1, 4, 4, 3))
    labels = np.full((1, 4, 4), 255, np.int32)
    for fn, options in ((losses.pixelwise_kd, {'temperature': 2.0}),
                        (losses.pairwise_similarity_kd, {'pool_size': 2})):
        value, grad = value_and_grad(fn, **options)(student, teacher, labels)
        assert float(value) == 0.0
        assert np.all(np.asarray(grad) == 0)


def test_kd_losses_jit_and_compute_in_float32():
    student, teacher, labels = random_logits(8), random_logits(9), random_labels(10)
    for fn, options in ((losses.pixelwise_kd, {'temperature': 2.0}),
                        (losses.pairwise_similarity_kd, {'pool_size': 2})):
        eager = fn(student, teacher, labels, **options)
        jitted = jax.jit(lambda s, t, y, fn=fn, options=options: fn(s, t, y, **options))(
            student, teacher, labels)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5)
        half = fn(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16),
                  labels, **options)
        assert half.dtype == jnp.float32
        np.testing.assert_allclose(half, eager, rtol=0.1, atol=0.01)


def test_kd_losses_reject_bad_options_and_shapes():
    student, teacher, labels = random_logits(0), random_logits(1), random_labels(2)
    with pytest.raises(ValueError, match='temperature=0.0: expected a number > 0'):
        losses.pixelwise_kd(student, teacher, labels, temperature=0.0)
    with pytest.raises(ValueError, match='pool_size=0: expected an integer >= 1'):
        losses.pairwise_similarity_kd(student, teacher, labels, pool_size=0)
    with pytest.raises(ValueError, match='teacher logits .* do not match student logits'):
        losses.pixelwise_kd(student, teacher[..., :3], labels, temperature=1.0)


# ------------------------------------------------------------------------ pair-wise KD

def test_pairwise_kd_golden_value_with_an_ignored_pixel():
    # Three 1x1 nodes; the third is ignored (label 255). Student nodes at right angles,
    # a^s = I; teacher nodes parallel, a^t = all ones: (a^s - a^t)^2 is 1 off the diagonal,
    # 2 of the 4 valid pairs, so 0.5.
    student = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]], [[jnp.nan, 5.0]]]])
    teacher = jnp.array([[[[1.0, 0.0]], [[2.0, 0.0]], [[3.0, jnp.inf]]]])
    labels = jnp.array([[[0], [1], [255]]])
    value, grad = value_and_grad(losses.pairwise_similarity_kd, pool_size=1)(
        student, teacher, labels)
    np.testing.assert_allclose(value, 0.5, rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[0, 2] == 0)


def torch_sim_dis_compute(torch, f_s, f_t):
    """Liu et al.'s sim_dis_compute (structure_knowledge_distillation, utils/criterion.py) on
    [B, C, H, W] nodes, with the norms differentiated (their code detaches them)."""

    def similarity(feat):
        norm = (feat**2).sum(dim=1, keepdim=True) ** 0.5 + 1e-8
        feat = (feat / norm).reshape(feat.shape[0], feat.shape[1], -1)
        return torch.einsum('icm,icn->imn', feat, feat)

    nodes = f_t.shape[-1] * f_t.shape[-2]
    return (((similarity(f_t) - similarity(f_s)) ** 2) / nodes**2 / f_t.shape[0]).sum()


@pytest.mark.parametrize('height, width, pool_size', [(8, 6, 2), (7, 5, 3)])
def test_pairwise_kd_matches_the_authors_formula_in_torch(height, width, pool_size):
    """Every pixel valid; (7, 5, 3) has partial patches (torch's max pool, ceil_mode=True)."""
    torch = pytest.importorskip('torch')
    shape = (2, height, width, 5)
    student, teacher = random_logits(11, shape), random_logits(12, shape)
    labels = np.zeros(shape[:-1], np.int32)
    value, grad = value_and_grad(losses.pairwise_similarity_kd, pool_size=pool_size)(
        student, teacher, labels)
    pool = torch.nn.MaxPool2d(pool_size, stride=pool_size, ceil_mode=True)
    s = torch.tensor(student.transpose(0, 3, 1, 2), requires_grad=True)
    t = torch.tensor(teacher.transpose(0, 3, 1, 2))
    expected = torch_sim_dis_compute(torch, pool(s), pool(t))
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, s.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_pairwise_kd_pools_valid_pixels_only():
    """A patch's node is the max over its valid pixels: an ignored pixel's large logit never
    wins the max."""
    student, teacher = random_logits(13, (1, 4, 4, 3)), random_logits(14, (1, 4, 4, 3))
    labels = np.zeros((1, 4, 4), np.int32)
    labels[0, 0, 0] = 255
    poisoned = student.copy()
    poisoned[0, 0, 0] = 1e6
    np.testing.assert_allclose(
        losses.pairwise_similarity_kd(poisoned, teacher, labels, pool_size=2),
        losses.pairwise_similarity_kd(student, teacher, labels, pool_size=2), rtol=1e-6)


# ------------------------------------------------------------------------ the trainer

class NoNormNet(nn.Module):
    """A student without BatchNorm, so its step's formula is short to write out."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(self.num_classes, (3, 3))(nn.relu(nn.Conv(6, (3, 3))(x)))


def teacher_config(*extra):
    return config_lib.load(TEACHER_CONFIG, TEACHER_OVERRIDES + extra)


def save(workdir, state, step_number=3):
    mngr = checkpoint.manager(experiment.checkpoint_dir(str(workdir)))
    checkpoint.save(mngr, step_number, state)
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """Two real teacher checkpoints (segjax's checkpoint module) of the tiny U-Net, one
    without and one with EMA weights (half the raw ones), of random values (BatchNorm
    statistics far from the initial (0, 1), so that eval mode shows) in the shapes its trainer
    initialises: nothing to compile."""
    config = teacher_config('ema_decay=0.9')
    model = experiment.make_model(config)
    tx, _ = optim.make(config)
    abstract = jax.eval_shape(experiment.make_trainer(config, model, tx).init,
                              jax.random.key(3))
    rng = np.random.default_rng(4)
    state = abstract.replace(
        params=jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype),
                            abstract.params),
        batch_stats=jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype),
                                 abstract.batch_stats),
        opt_state=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract.opt_state),
        **{k: jnp.zeros((), jnp.int32) for k in ('step', 'nonfinite_run', 'skipped_steps')})
    ema = jax.tree.map(lambda x: x * 0.5, {'params': state.params,
                                           'batch_stats': state.batch_stats})
    state = state.replace(ema=ema)
    plain, with_ema = tmp_path_factory.mktemp('teacher'), tmp_path_factory.mktemp('ema')
    save(plain, state.replace(ema={}))
    save(with_ema, state)
    return {'workdir': str(plain), 'ema_workdir': str(with_ema), 'model': model,
            'variables': {'params': state.params, 'batch_stats': state.batch_stats}, 'ema': ema}


def common(teacher_workdir, **options):
    return {'model': NoNormNet(), 'tx': optax.sgd(LR), 'loss_fn': losses.cross_entropy,
            'num_classes': NUM_CLASSES, 'ignore_index': 255, 'image_shape': (1, SIZE, SIZE, 3),
            'teacher_config': TEACHER_CONFIG, 'teacher_workdir': teacher_workdir,
            'teacher_overrides': TEACHER_OVERRIDES, 'image_mean': MEAN, 'image_std': STD,
            **options}


def batch(size=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=(size, SIZE, SIZE)).astype(np.int32)
    labels[:, :3] = 255
    return {'image': rng.normal(size=(size, SIZE, SIZE, 3)).astype(np.float32),
            'label': labels}


def test_step_is_labels_loss_plus_weighted_kd_terms(teacher):
    kd_weight, temperature, pairwise_weight, pool = 0.7, 2.5, 0.3, 4
    trainer = distillation.trainer(**common(
        teacher['workdir'], kd_weight=kd_weight, temperature=temperature,
        pairwise_weight=pairwise_weight, pairwise_pool_size=pool))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.load_frozen(sharding.make_mesh())
    b = batch()
    new, stats = jax.jit(trainer.step)(state, b, jax.random.key(1), frozen)

    # The teacher as its own evaluation runs it: eval mode, the checkpoint's statistics.
    targets = jax.jit(functools.partial(teacher['model'].apply, train=False))(
        teacher['variables'], b['image'])
    labels = b['label']

    def total(params):
        logits = NoNormNet().apply({'params': params}, b['image'])
        return (losses.cross_entropy(logits, labels)
                + kd_weight * losses.pixelwise_kd(logits, targets, labels,
                                                  temperature=temperature)
                + pairwise_weight * losses.pairwise_similarity_kd(logits, targets, labels,
                                                                  pool_size=pool))

    expected, grads = jax.jit(jax.value_and_grad(total))(state.params)
    np.testing.assert_allclose(stats['loss'], expected, rtol=1e-5)
    for x, p, g in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params),
                       jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(x, p - LR * g, rtol=1e-5, atol=1e-6)
    assert {'loss/supervised', 'loss/pixelwise_kd', 'loss/pairwise_kd', 'pixel_accuracy',
            'grad_norm', 'skipped_steps', 'nonfinite_run'} <= set(stats)
    assert float(stats['loss/pixelwise_kd']) > 0 and float(stats['loss/pairwise_kd']) > 0
    assert int(new.step) == 1 and not new.discriminator  # the teacher is not in the state


def test_no_gradient_reaches_the_teacher(teacher):
    trainer = distillation.trainer(**common(teacher['workdir'], kd_weight=1.0,
                                            pairwise_weight=1.0, pairwise_pool_size=4))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.load_frozen(sharding.make_mesh())

    def loss_of_teacher(variables):
        return trainer.step(state, batch(), jax.random.key(1), variables)[1]['loss']

    value, grads = jax.jit(jax.value_and_grad(loss_of_teacher))(frozen)
    assert float(value) > 0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


class BatchNormNet(nn.Module):
    """A student with BatchNorm, whose running statistics a step updates."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Conv(self.num_classes, (3, 3))(x)


def test_kd_weight_zero_is_the_supervised_step(teacher):
    options = {**common(teacher['workdir']), 'model': BatchNormNet()}
    supervised = trainers.supervised(**{k: options[k] for k in (
        'model', 'tx', 'loss_fn', 'num_classes', 'ignore_index', 'image_shape')})
    distilled = distillation.trainer(**options, kd_weight=0.0, temperature=4.0)
    state = supervised.init(jax.random.key(0))
    b = batch(seed=1)
    expected, expected_stats = jax.jit(supervised.step)(state, b, jax.random.key(2))
    got, stats = jax.jit(distilled.step)(state, b, jax.random.key(2),
                                         distilled.load_frozen(sharding.make_mesh()))
    assert jax.tree.leaves(got.batch_stats)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)
    for key in ('loss', 'pixel_accuracy', 'grad_norm'):
        np.testing.assert_allclose(stats[key], expected_stats[key], rtol=1e-6)


def test_a_teacher_with_ema_weights_is_loaded_with_them(teacher):
    trainer = distillation.trainer(**common(
        teacher['ema_workdir'], teacher_overrides=TEACHER_OVERRIDES + ('ema_decay=0.9',)))
    frozen = trainer.load_frozen(sharding.make_mesh())
    for a, e in zip(jax.tree.leaves(frozen), jax.tree.leaves(teacher['ema']), strict=True):
        np.testing.assert_array_equal(a, e)


def test_teacher_step_selects_the_checkpoint(teacher):
    trainer = distillation.trainer(**common(teacher['workdir'], teacher_step=5))
    with pytest.raises(config_lib.ConfigError, match=r'no checkpoint for step 5 .*\[3\]'):
        trainer.load_frozen(sharding.make_mesh())


def test_a_teacher_workdir_without_checkpoint_is_a_clear_error(tmp_path):
    trainer = distillation.trainer(**common(str(tmp_path)))
    with pytest.raises(config_lib.ConfigError,
                       match=r"teacher_workdir=.* holds no usable teacher checkpoint .*train "
                             r'the teacher first'):
        trainer.load_frozen(sharding.make_mesh())


@pytest.mark.parametrize('options, message', [
    ({'num_classes': 4}, r'the teacher predicts 8 classes .* the student 4'),
    ({'image_mean': (0.0, 0.0, 0.0)},
     r'teacher was trained on images normalised with config.data.mean=\(123.675'),
    ({'image_std': (1.0, 1.0, 1.0)}, r'config.data.std=\(58.395.* student\'s are normalised '
                                     r'with \(1.0, 1.0, 1.0\)'),
    ({'image_mean': None}, r"image_mean is not set: .*get_ref\('mean'\)"),
    ({'grad_accum_steps': 2}, r'grad_accum_steps=2: segjax.trainers.distillation'),
    ({'temperature': 0.0}, r'temperature=0.0: expected T > 0'),
    ({'kd_weight': -1.0}, r'kd_weight=-1.0: expected a weight >= 0'),
    ({'teacher_config': 'no/such/experiment.py'}, r"teacher_config: config file "
                                                  r"'no/such/experiment.py' does not exist"),
    ({'teacher_workdir': ''}, r"teacher_workdir='': expected the teacher's run directory"),
])
def test_unusable_teachers_and_options_are_clear_errors(teacher, options, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        distillation.trainer(**{**common(teacher['workdir']), **options})


def test_the_experiment_links_the_normalisation_and_loads_its_teacher_config():
    config = config_lib.load(DISTILL, ['data.mean=(1.0, 2.0, 3.0)'])
    assert config.trainer.image_mean == (1.0, 2.0, 3.0)
    assert os.path.isfile(config.trainer.teacher_config)
    with pytest.raises(config_lib.ConfigError, match='did you mean .temperature.'):
        config_lib.load(DISTILL, ['trainer.temprature=3.0'])


# ------------------------------------------------------------------------ command lines

def student_overrides(data_dir, teacher_workdir, **extra):
    teacher = ('model.base_width=8', 'model.depth=2')
    return tiny_overrides(data_dir, **{'trainer.teacher_workdir': teacher_workdir,
                                       'trainer.teacher_overrides': repr(teacher),
                                       'trainer.pairwise_weight': 0.5,
                                       'trainer.pairwise_pool_size': 4, **extra})


@pytest.mark.slow  # several whole command-line runs: `pytest -m long`
@pytest.mark.long
def test_distillation_train_resume_evaluate(tmp_path, e2e_data):
    """Teacher, then student: SIGTERM + resume equals an uninterrupted run; the checkpoints
    hold the student only; evaluating the student does not read the teacher's checkpoint."""
    teacher_dir = tmp_path / 'teacher'
    run_cli('segjax.train', '--config', 'experiments/unet_synthetic.py', '--workdir',
            teacher_dir, *tiny_overrides(e2e_data, **{'model.base_width': 8}))
    overrides = student_overrides(e2e_data, teacher_dir, num_steps=6, log_every=1,
                                  checkpoint_every=1000)
    straight = tmp_path / 'straight'
    result = run_cli('segjax.train', '--config', DISTILL, '--workdir', straight, *overrides)
    assert '| pixelwise_kd ' in result.stdout and '| pairwise_kd ' in result.stdout

    interrupted = tmp_path / 'interrupted'
    sigterm_then_resume(DISTILL, interrupted, overrides, step=3, num_steps=6)

    a = restored_state(DISTILL, straight, overrides)
    b = restored_state(DISTILL, interrupted, overrides)
    assert int(a.step) == int(b.step) == 6 and not a.discriminator
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    os.rename(teacher_dir, tmp_path / 'teacher_moved')  # evaluation needs the student only
    evaluated = run_cli('segjax.evaluate', '--config', DISTILL, '--workdir', straight,
                        *overrides)
    assert 'mIoU' in evaluated.stdout


@pytest.mark.slow  # a whole command-line run: `pytest -m long`
@pytest.mark.long
def test_training_without_a_trained_teacher_is_a_one_line_error(tmp_path, e2e_data):
    result = run_cli('segjax.train', '--config', DISTILL, '--workdir', tmp_path / 'student',
                     *student_overrides(e2e_data, tmp_path / 'no_teacher'), check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'holds no usable teacher checkpoint' in result.stderr
    assert 'Traceback' not in result.stderr
