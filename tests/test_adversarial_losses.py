"""The adversarial losses (segjax.losses.adversarial): each GAN loss and the self-training loss
against its formula in float64 numpy, masks (including all-masked), which inputs get gradients,
jit, sharded and bfloat16 inputs, and torch's BCE as an oracle. The doctests run with the rest of
the library's in tests/test_losses.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.test_util import check_grads

from segjax import losses


def softplus(x):
    return np.logaddexp(0.0, x)


# name -> (discriminator loss, its per-element real term, its per-element fake term), float64.
DISCRIMINATORS = {
    'bce': (losses.bce_discriminator_loss, lambda r: softplus(-r), softplus),
    'hinge': (losses.hinge_discriminator_loss, lambda r: np.maximum(0.0, 1.0 - r),
              lambda f: np.maximum(0.0, 1.0 + f)),
    'least_squares': (losses.least_squares_discriminator_loss, lambda r: 0.5 * (r - 1.0) ** 2,
                      lambda f: 0.5 * f ** 2),
}
# name -> (generator loss, its per-element term), float64.
GENERATORS = {
    'bce': (losses.bce_generator_loss, lambda f: softplus(-f)),
    'hinge': (losses.hinge_generator_loss, lambda f: -f),
    'least_squares': (losses.least_squares_generator_loss, lambda f: 0.5 * (f - 1.0) ** 2),
}


def scores(seed, shape=(8, 3, 4, 1)):
    """float32 discriminator logits [B, H, W, 1], spread over both sides of every hinge."""
    return (2.0 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def random_mask(seed, shape=(8, 3, 4, 1), keep=0.7):
    return np.random.default_rng(seed).random(shape) < keep


def masked_mean(values, mask):
    return values[mask].mean() if mask.any() else 0.0


# ----------------------------------------------------------------------------- golden values

def test_golden_values_by_hand():
    # Two elements each, written out: real [0, log 3] (sigmoid 1/2, 3/4), fake [log 3, -1].
    real = jnp.array([0.0, np.log(3.0)])
    fake = jnp.array([np.log(3.0), -1.0])
    log2, log43, log4 = np.log(2.0), np.log(4 / 3), np.log(4.0)
    expected = {
        # (log 2 + log 4/3) / 2 + (-log(1/4) + -log(1 - sigmoid(-1))) / 2
        losses.bce_discriminator_loss: (log2 + log43) / 2 + (log4 + softplus(-1.0)) / 2,
        losses.bce_generator_loss: (log43 + softplus(1.0)) / 2,
        # real: 1 - 0 = 1, 1 - log 3 < 0 -> 0; fake: 1 + log 3, 1 - 1 = 0
        losses.hinge_discriminator_loss: 1 / 2 + (1 + np.log(3.0)) / 2,
        losses.hinge_generator_loss: -(np.log(3.0) - 1.0) / 2,
        losses.least_squares_discriminator_loss: (
            0.5 * (1 + (np.log(3.0) - 1) ** 2) / 2 + 0.5 * (np.log(3.0) ** 2 + 1) / 2),
        losses.least_squares_generator_loss: 0.5 * ((np.log(3.0) - 1) ** 2 + 4) / 2,
    }
    for fn, value in expected.items():
        args = (real, fake) if 'discriminator' in fn.__name__ else (fake,)
        out = jax.jit(fn)(*args)
        assert out.dtype == jnp.float32 and out.shape == (), fn.__name__
        np.testing.assert_allclose(out, value, rtol=1e-6, err_msg=fn.__name__)


@pytest.mark.parametrize('name', sorted(DISCRIMINATORS))
def test_discriminator_formula_with_masks(name):
    fn, on_real, on_fake = DISCRIMINATORS[name]
    real, fake = scores(0), scores(1, shape=(8, 2, 2, 1))  # real and fake need not match
    mask_real, mask_fake = random_mask(2), random_mask(3, shape=(8, 2, 2, 1))
    expected = (masked_mean(on_real(real.astype(np.float64)), mask_real)
                + masked_mean(on_fake(fake.astype(np.float64)), mask_fake))
    np.testing.assert_allclose(jax.jit(fn)(real, fake, mask_real=mask_real, mask_fake=mask_fake),
                               expected, rtol=1e-5)
    unmasked = on_real(real.astype(np.float64)).mean() + on_fake(fake.astype(np.float64)).mean()
    np.testing.assert_allclose(jax.jit(fn)(real, fake), unmasked, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(GENERATORS))
def test_generator_formula_with_mask(name):
    fn, on_fake = GENERATORS[name]
    fake, mask = scores(4), random_mask(5)
    np.testing.assert_allclose(jax.jit(fn)(fake, mask=mask),
                               masked_mean(on_fake(fake.astype(np.float64)), mask), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(fn)(fake), on_fake(fake.astype(np.float64)).mean(),
                               rtol=1e-5)


def test_named_pairs():
    assert losses.bce_gan == losses.AdversarialLoss(losses.bce_discriminator_loss,
                                                    losses.bce_generator_loss)
    assert losses.hinge_gan.discriminator is losses.hinge_discriminator_loss
    assert losses.hinge_gan.generator is losses.hinge_generator_loss
    assert losses.least_squares_gan.discriminator is losses.least_squares_discriminator_loss
    assert losses.least_squares_gan.generator is losses.least_squares_generator_loss
    with pytest.raises(AttributeError):  # frozen: a config's value cannot be mutated in place
        losses.bce_gan.generator = losses.hinge_generator_loss


# ----------------------------------------------------------------------------- masks

MASK_FORMS = {
    'bool': lambda m: m,
    'float': lambda m: m.astype(np.float32),
    'per pixel [B, H, W] for [B, H, W, 1]': lambda m: m[..., 0],
}


@pytest.mark.parametrize('form', sorted(MASK_FORMS))
def test_mask_forms_agree(form):
    fake, mask = scores(6), random_mask(7)
    for fn, on_fake in GENERATORS.values():
        np.testing.assert_allclose(fn(fake, mask=MASK_FORMS[form](mask)),
                                   masked_mean(on_fake(fake.astype(np.float64)), mask),
                                   rtol=1e-5, err_msg=fn.__name__)


def poisoned(x, mask):
    """x with inf/NaN at the masked-out elements."""
    bad = np.where(np.arange(x.size).reshape(x.shape) % 2 == 0, np.nan, np.inf)
    return np.where(mask, x, bad).astype(np.float32)


@pytest.mark.parametrize('name', sorted(DISCRIMINATORS))
def test_masked_elements_count_nowhere(name):
    # Masked elements holding inf/NaN change neither the value nor any gradient, and get 0.
    d_loss, g_loss = DISCRIMINATORS[name][0], GENERATORS[name][0]
    real, fake, mask_real, mask_fake = scores(8), scores(9), random_mask(10), random_mask(11)
    clean = jax.value_and_grad(d_loss, argnums=(0, 1))(real, fake, mask_real=mask_real,
                                                         mask_fake=mask_fake)
    value, (g_real, g_fake) = jax.value_and_grad(d_loss, argnums=(0, 1))(
        poisoned(real, mask_real), poisoned(fake, mask_fake), mask_real=mask_real,
        mask_fake=mask_fake)
    np.testing.assert_array_equal(value, clean[0])
    np.testing.assert_array_equal(g_real, clean[1][0])
    np.testing.assert_array_equal(g_fake, clean[1][1])
    assert np.all(g_real[~mask_real] == 0) and np.all(g_fake[~mask_fake] == 0)
    value, grad = jax.value_and_grad(g_loss)(poisoned(fake, mask_fake), mask=mask_fake)
    np.testing.assert_array_equal(value, g_loss(fake, mask=mask_fake))
    assert np.all(np.isfinite(grad)) and np.all(grad[~mask_fake] == 0)


@pytest.mark.parametrize('name', sorted(DISCRIMINATORS))
def test_all_masked_is_zero_with_zero_gradients(name):
    d_loss, g_loss = DISCRIMINATORS[name][0], GENERATORS[name][0]
    real, fake = scores(12), scores(13)
    none = np.zeros(real.shape, bool)
    value, grads = jax.jit(jax.value_and_grad(
        functools.partial(d_loss, mask_real=none, mask_fake=none), argnums=(0, 1)))(real, fake)
    assert value == 0.0 and value.dtype == jnp.float32
    for grad in grads:
        np.testing.assert_array_equal(grad, np.zeros_like(real))
    value, grad = jax.jit(jax.value_and_grad(functools.partial(g_loss, mask=none)))(fake)
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(fake))
    # Masking one side only leaves the other side's mean.
    one_sided = d_loss(real, fake, mask_fake=none)
    np.testing.assert_allclose(one_sided, masked_mean(
        DISCRIMINATORS[name][1](real.astype(np.float64)), np.ones(real.shape, bool)), rtol=1e-5)


def test_bad_inputs_raise():
    fake = scores(14)
    with pytest.raises(ValueError, match='mask_fake has shape'):
        losses.hinge_discriminator_loss(fake, fake, mask_fake=np.ones((8, 3), bool))
    with pytest.raises(ValueError, match=r'mask has shape \(8, 3, 5\)'):
        losses.bce_generator_loss(fake, mask=np.ones((8, 3, 5), bool))
    with pytest.raises(TypeError, match='expected discriminator logits'):
        losses.bce_generator_loss({'logits': fake})
    logits = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match='confidence_logits has shape'):
        losses.self_training_cross_entropy(logits, np.zeros((2, 4)), threshold=0.2)
    with pytest.raises(ValueError, match='threshold=1.5'):
        losses.self_training_cross_entropy(logits, np.zeros((2, 3)), threshold=1.5)
    with pytest.raises(TypeError, match="outputs\\['logits'\\]"):
        losses.self_training_cross_entropy({'logits': logits}, np.zeros((2, 3)), threshold=0.2)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize('name', sorted(DISCRIMINATORS))
def test_gradients_against_formula(name):
    # d/dx of each mean term is the per-element derivative over the number counted.
    derivative = {
        'bce': (lambda r: -(1 - sigmoid(r)), sigmoid, lambda f: -(1 - sigmoid(f))),
        'hinge': (lambda r: -(r < 1.0).astype(np.float64), lambda f: (f > -1.0).astype(
            np.float64), lambda f: -np.ones_like(f)),
        'least_squares': (lambda r: r - 1.0, lambda f: f, lambda f: f - 1.0),
    }[name]
    d_loss, g_loss = DISCRIMINATORS[name][0], GENERATORS[name][0]
    real, fake, mask_real, mask_fake = scores(15), scores(16), random_mask(17), random_mask(18)
    g_real, g_fake = jax.grad(d_loss, argnums=(0, 1))(real, fake, mask_real=mask_real,
                                                       mask_fake=mask_fake)
    r64, f64 = real.astype(np.float64), fake.astype(np.float64)
    np.testing.assert_allclose(g_real, np.where(mask_real, derivative[0](r64), 0.0)
                               / mask_real.sum(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_fake, np.where(mask_fake, derivative[1](f64), 0.0)
                               / mask_fake.sum(), rtol=1e-5, atol=1e-8)
    # The generator loss trains through the fakes: a non-zero gradient, the formula's.
    g_gen = jax.grad(g_loss)(fake, mask=mask_fake)
    np.testing.assert_allclose(g_gen, np.where(mask_fake, derivative[2](f64), 0.0)
                               / mask_fake.sum(), rtol=1e-5, atol=1e-8)
    assert np.abs(g_gen).sum() > 0


@pytest.mark.parametrize('name', ['bce', 'least_squares'])
def test_numerical_gradients(name):
    # The smooth objectives against finite differences (hinge is piecewise linear: its exact
    # gradient is checked against the formula above).
    d_loss, g_loss = DISCRIMINATORS[name][0], GENERATORS[name][0]
    real, fake, mask_fake = scores(19, (2, 3)), scores(20, (2, 3)), random_mask(21, (2, 3))
    check_grads(jax.jit(functools.partial(d_loss, mask_fake=mask_fake)), (real, fake), order=1,
                modes=['rev'], atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(g_loss), (fake,), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- self-training

def self_training_reference(logits, confidence, threshold, mask=None):
    """float64 numpy: mean over trusted pixels of -log softmax(z)[argmax z]; 0 when none."""
    logits = logits.astype(np.float64)
    kept = sigmoid(confidence.astype(np.float64)) > threshold
    if mask is not None:
        kept &= mask
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -log_probs.max(-1)  # the argmax's log-probability is the largest
    return nll[kept].mean() if kept.any() else 0.0, kept


def self_training_inputs(seed, shape=(8, 3, 4), classes=3):
    rng = np.random.default_rng(seed)
    logits = (1.5 * rng.normal(size=(*shape, classes))).astype(np.float32)
    confidence = (2.0 * rng.normal(size=shape)).astype(np.float32)
    return logits, confidence


def test_self_training_golden_by_hand():
    # Pixel 0: pseudo-label 0, p = 3/4; pixel 1: pseudo-label 1, p = 7/8; pixel 2: sigmoid(-2)
    # = .12 < .5, not trusted; pixel 3: sigmoid(0) = .5, not > .5 (strict), not trusted.
    logits = jnp.array([[np.log(3.0), 0.0], [0.0, np.log(7.0)], [0.0, 5.0], [9.0, 0.0]])
    confidence = jnp.array([2.0, 3.0, -2.0, 0.0])
    out = jax.jit(functools.partial(losses.self_training_cross_entropy, threshold=0.5))(
        logits, confidence)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, (np.log(4 / 3) + np.log(8 / 7)) / 2, rtol=1e-6)
    # A mask drops pixel 1 as well.
    np.testing.assert_allclose(
        losses.self_training_cross_entropy(logits, confidence, threshold=0.5,
                                           mask=jnp.array([1.0, 0.0, 1.0, 1.0])),
        np.log(4 / 3), rtol=1e-6)


@pytest.mark.parametrize('threshold', [0.0, 0.2, 0.8])
def test_self_training_formula(threshold):
    logits, confidence = self_training_inputs(21)
    mask = random_mask(22, shape=confidence.shape)
    fn = jax.jit(functools.partial(losses.self_training_cross_entropy, threshold=threshold))
    expected, _ = self_training_reference(logits, confidence, threshold)
    np.testing.assert_allclose(fn(logits, confidence), expected, rtol=1e-5)
    np.testing.assert_allclose(fn(logits, confidence[..., None]), expected, rtol=1e-5)
    expected, _ = self_training_reference(logits, confidence, threshold, mask)
    np.testing.assert_allclose(fn(logits, confidence, mask=mask), expected, rtol=1e-5)


def test_self_training_gradients():
    # To the logits: (softmax - onehot(argmax)) / |K| at trusted pixels, 0 elsewhere; to the
    # confidence: exactly 0 (it only selects pixels).
    logits, confidence = self_training_inputs(23)
    _, kept = self_training_reference(logits, confidence, 0.3)
    g_logits, g_conf = jax.grad(
        functools.partial(losses.self_training_cross_entropy, threshold=0.3), argnums=(0, 1))(
        logits, confidence)
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    onehot = np.eye(z.shape[-1])[z.argmax(-1)]
    expected = np.where(kept[..., None], probs - onehot, 0.0) / kept.sum()
    np.testing.assert_allclose(g_logits, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_conf, np.zeros_like(confidence))
    assert 0 < kept.sum() < kept.size and np.abs(g_logits).sum() > 0


def test_self_training_nothing_trusted():
    logits, confidence = self_training_inputs(24)
    logits = np.where(np.arange(logits.size).reshape(logits.shape) % 3 == 0, np.nan, logits)
    for kwargs in ({'threshold': 1.0}, {'threshold': 0.0, 'mask': np.zeros(confidence.shape)}):
        fn = functools.partial(losses.self_training_cross_entropy, **kwargs)
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(logits, confidence)
        assert value == 0.0 and value.dtype == jnp.float32
        np.testing.assert_array_equal(grads[0], np.zeros_like(logits))
        np.testing.assert_array_equal(grads[1], np.zeros_like(confidence))


# ----------------------------------------------------------------------------- dtypes, sharding

def discriminator_call(fn):
    """fn on (real, fake), with the fakes below -1 masked out."""
    return lambda real, fake: fn(real, fake, mask_fake=fake > -1.0)


def generator_call(fn):
    return lambda fake, _: fn(fake)


# name -> a call of one loss on two [B, H, W, 1] float arrays.
ALL_CALLS = {
    **{f'{name}_discriminator': discriminator_call(fn)
       for name, (fn, _, _) in DISCRIMINATORS.items()},
    **{f'{name}_generator': generator_call(fn) for name, (fn, _) in GENERATORS.items()},
    'self_training': lambda x, y: losses.self_training_cross_entropy(
        jnp.concatenate([x, y], axis=-1), x[..., 0], threshold=0.4),
}


@pytest.mark.parametrize('name', sorted(ALL_CALLS))
def test_bfloat16_inputs_computed_in_float32(name):
    # bfloat16 inputs give the float32 value of the same (rounded) inputs: no bf16 arithmetic.
    x, y = scores(25), scores(26)
    x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    out = jax.jit(ALL_CALLS[name])(x16, y16)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, ALL_CALLS[name](x16.astype(jnp.float32), y16.astype(jnp.float32)), rtol=1e-6)


@pytest.mark.parametrize('name', sorted(ALL_CALLS))
def test_sharded_batch_gives_the_global_value(name):
    # The batch split over the 8 (forced CPU) devices: the formula over the global batch.
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec('data'))
    x, y = scores(27), scores(28)
    np.testing.assert_allclose(
        jax.jit(ALL_CALLS[name])(jax.device_put(x, sharding), jax.device_put(y, sharding)),
        ALL_CALLS[name](x, y), rtol=1e-5)


# ----------------------------------------------------------------------------- torch oracle

def test_bce_against_torch():
    torch = pytest.importorskip('torch')
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    real, fake, mask_real, mask_fake = scores(29), scores(30), random_mask(31), random_mask(32)
    t_real, t_fake = torch.tensor(real[mask_real]), torch.tensor(fake[mask_fake])
    expected = (bce(t_real, torch.ones_like(t_real)) + bce(t_fake, torch.zeros_like(t_fake)))
    np.testing.assert_allclose(
        losses.bce_discriminator_loss(real, fake, mask_real=mask_real, mask_fake=mask_fake),
        expected.item(), rtol=1e-5)
    np.testing.assert_allclose(losses.bce_generator_loss(fake, mask=mask_fake),
                               bce(t_fake, torch.ones_like(t_fake)).item(), rtol=1e-5)
