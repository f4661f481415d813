"""The dense CRF wired into segjax: config.eval.crf through the one inference path
(step.predict_step / eval_step), the CRF-as-RNN model wrapper, and the grid search's parsing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import config as config_lib
from segjax import crf, evaluate, experiment, inference, losses, metrics, step
from segjax.models import crf_rnn

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
CRF = {'iterations': 3, **crf.DEEPLAB_LARGEFOV, 'mean': MEAN, 'std': STD}
TTA = {'mode': 'slide', 'window': (8, 8), 'stride': (6, 6), 'scales': (0.75, 1.0),
       'flip': True, 'window_batch': 4}


class PixelNet(nn.Module):
    """A 1x1 convolution scaled down: noisy, weakly confident logits a CRF changes."""

    num_classes: int = 4
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        return 0.3 * nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)


class AuxNet(PixelNet):
    """PixelNet with an auxiliary output, as FCN/PSPNet return."""

    @nn.compact
    def __call__(self, x, train=False):
        logits = PixelNet(self.num_classes, self.dtype)(x)
        return {'logits': logits, 'aux': 2.0 * logits}


def two_region_batch(seed=0, size=(12, 14)):
    """Normalised images of two flat colour regions plus noise, and their labels."""
    rng = np.random.default_rng(seed)
    height, width = size
    label = np.zeros((2, height, width), np.int32)
    label[:, :, width // 2:] = 1
    rgb = np.where(label[..., None] == 1, [200.0, 40.0, 40.0], [30.0, 90.0, 220.0])
    rgb = np.clip(rgb + rng.normal(0, 70, rgb.shape), 0, 255)
    images = ((rgb - MEAN) / STD).astype(np.float32)
    return {'image': jnp.asarray(images), 'label': jnp.asarray(label),
            'valid': jnp.array([True, True])}


@pytest.fixture(scope='module')
def pixel_state():
    model = PixelNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    state = step.TrainState(step=0, params=variables['params'], batch_stats={}, opt_state=None,
                            ema={}, nonfinite_run=0, skipped_steps=0)
    return model, state


def by_hand(model, state, images, options=None):
    """dense_crf applied by hand to the model's output on the un-normalised images."""
    apply_fn = functools.partial(model.apply, {'params': state.params})
    rgb = images * jnp.asarray(STD) + jnp.asarray(MEAN)
    settings = {k: v for k, v in CRF.items() if k not in ('mean', 'std')}
    if options is None:
        return crf.dense_crf(apply_fn(images), rgb, **settings).argmax(-1)
    probabilities = inference.probabilities(apply_fn, images, **options)
    return crf.dense_crf(jnp.log(probabilities), rgb, **settings).argmax(-1)


def test_config_crf_is_off_by_default_with_deeplab_values():
    config = config_lib.defaults()
    assert config.eval.crf.iterations == 0
    assert {k: config.eval.crf[k] for k in crf.DEEPLAB_LARGEFOV} == crf.DEEPLAB_LARGEFOV
    config = config_lib.load('experiments/unet_synthetic.py')
    assert experiment.inference_options(config) is None  # off: one plain pass, as before
    config.eval.crf.iterations = 10
    assert experiment.inference_options(config) == {
        'crf': {'iterations': 10, **crf.DEEPLAB_LARGEFOV, 'mean': MEAN, 'std': STD}}
    assert experiment.inference_options(config, crf=False) is None
    config.eval.flip = True
    assert experiment.inference_options(config)['flip'] is True
    assert 'crf' in experiment.inference_options(config)


@pytest.mark.parametrize('key, value, expected', [
    ('iterations', -1, 'expected an integer >= 0'),
    ('iterations', 2.5, 'expected an integer >= 0'),
    ('theta_alpha', 0.0, 'expected a finite number > 0'),
    ('appearance_weight', -2.0, 'expected a finite number >= 0'),
    ('smoothness_weight', float('inf'), 'expected a finite number >= 0'),
])
def test_config_crf_values_are_validated(key, value, expected):
    config = config_lib.load('experiments/unet_synthetic.py')
    with config.ignore_type():
        config.eval.crf[key] = value
    with pytest.raises(config_lib.ConfigError,
                       match=rf'x\.py: config\.eval\.crf\.{key}={value!r}: {expected}'):
        config_lib.validate(config, source='x.py')


def test_config_crf_override_from_the_command_line():
    config = config_lib.load('experiments/unet_synthetic.py',
                             ['eval.crf.iterations=10', 'eval.crf.theta_beta=3'])
    assert config.eval.crf.iterations == 10 and config.eval.crf.theta_beta == 3.0


@pytest.mark.parametrize('options', [None, TTA], ids=['whole', 'slide_multiscale_flip'])
def test_eval_step_with_crf_equals_dense_crf_by_hand(pixel_state, options):
    model, state = pixel_state
    batch = two_region_batch()

    def eval_step(inference_options):  # options are static: bound, as the CLIs bind them
        return jax.jit(functools.partial(step.eval_step, model=model, num_classes=4,
                                         inference_options=inference_options))(state, batch)

    off, on = eval_step(options), eval_step({**(options or {}), 'crf': CRF})
    expected = by_hand(model, state, batch['image'], options)
    np.testing.assert_array_equal(
        on['confusion_matrix'], metrics.confusion_matrix(expected, batch['label'], 4))
    assert not np.array_equal(on['confusion_matrix'], off['confusion_matrix'])
    # Off is the unchanged path: the plain argmax of the network's scores.
    plain = step.predict_step(state, batch['image'], model=model, inference_options=options)
    np.testing.assert_array_equal(
        off['confusion_matrix'], metrics.confusion_matrix(plain, batch['label'], 4))


def test_predict_with_and_without_crf_share_one_pass(pixel_state):
    model, state = pixel_state
    images = two_region_batch()['image']
    with_crf, without = jax.jit(functools.partial(
        step.predict_with_and_without_crf, model=model,
        inference_options={'crf': CRF}))(state, images)
    np.testing.assert_array_equal(with_crf, by_hand(model, state, images))
    np.testing.assert_array_equal(without, step.predict_step(state, images, model=model))
    with pytest.raises(ValueError, match="no 'crf' options"):
        step.predict_with_and_without_crf(state, images, model=model, inference_options=None)


def crf_rnn_model(inner=PixelNet, learn_compatibility=True):
    return crf_rnn.CRFasRNN(num_classes=4, inner={'fn': inner}, iterations=2,
                            learn_compatibility=learn_compatibility)


def test_crf_rnn_output_is_dense_crf_of_the_inner_model_and_aux_passes_through():
    model = crf_rnn_model(AuxNet)
    images = two_region_batch()['image']
    variables = model.init(jax.random.key(1), images)
    params = variables['params']
    assert float(params['appearance_weight']) == 4.0
    assert float(params['smoothness_weight']) == 3.0
    np.testing.assert_array_equal(params['compatibility'], 1.0 - np.eye(4))
    outputs = model.apply(variables, images)
    inner = AuxNet().apply({'params': params['inner']}, images)
    np.testing.assert_array_equal(outputs['aux'], inner['aux'])
    rgb = images * jnp.asarray(STD) + jnp.asarray(MEAN)
    expected = crf.dense_crf(inner['logits'], rgb, iterations=2,
                             compatibility=1.0 - jnp.eye(4))
    np.testing.assert_allclose(outputs['logits'], expected, rtol=1e-5, atol=1e-5)


def test_crf_rnn_gradients_reach_the_crf_and_train_steps_change_it():
    model = crf_rnn_model()
    batch = two_region_batch()
    tx = optax.adam(0.05)
    state = step.create_state(model, tx, jax.random.key(2), (1, 12, 14, 3))
    loss_fn = functools.partial(losses.cross_entropy, ignore_index=255)

    def loss(params):
        return loss_fn(model.apply({'params': params}, batch['image']), batch['label'])

    grads = jax.grad(loss)(state.params)
    for name in ('appearance_weight', 'smoothness_weight', 'compatibility'):
        assert np.all(np.isfinite(grads[name])) and np.any(np.asarray(grads[name]) != 0), name
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx, loss_fn=loss_fn))
    new = state
    for _ in range(3):
        new, stats = train_step(new, batch, jax.random.key(3))
    assert np.isfinite(float(stats['loss']))
    for name in ('appearance_weight', 'smoothness_weight', 'compatibility'):
        assert not np.allclose(new.params[name], state.params[name]), name


def test_crf_rnn_experiment_loads_and_checks_the_inner_model():
    config = config_lib.load('experiments/crf_rnn_unet_synthetic.py',
                             ['model.inner.base_width=4', 'model.inner.depth=2'])
    model = experiment.make_model(config)
    assert isinstance(model, crf_rnn.CRFasRNN) and model.num_classes == 8
    assert model.inner['base_width'] == 4 and tuple(model.mean) == tuple(config.data.mean)
    with pytest.raises(config_lib.ConfigError, match="model.inner.widht: UNet takes no option"):
        config_lib.load('experiments/crf_rnn_unet_synthetic.py', ['model.inner.widht=4'])
    with pytest.raises(config_lib.ConfigError, match="model.inner.num_classes: segjax sets"):
        config_lib.load('experiments/crf_rnn_unet_synthetic.py', ['model.inner.num_classes=3'])


def test_crf_grid_parses_every_combination_and_rejects_bad_input():
    crf_config = config_lib.defaults().eval.crf
    settings = evaluate.parse_crf_grid('appearance_weight=3,5; theta_alpha=60;iterations=4',
                                       crf_config)
    assert [(s['appearance_weight'], s['theta_alpha'], s['iterations']) for s in settings] == [
        (3.0, 60.0, 4), (5.0, 60.0, 4)]
    assert all(s['theta_beta'] == 5.0 for s in settings)  # unlisted keys keep the config's
    assert evaluate.crf_overrides({'iterations': 4, 'theta_alpha': 60.0}) == (
        '--config.eval.crf.iterations=4 --config.eval.crf.theta_alpha=60.0')
    for text, message in (('theta_alfa=3', "unknown key 'theta_alfa'"),
                          ('theta_alpha=big', 'expected theta_alpha=<float>'),
                          ('iterations=2;theta_gamma=0', 'theta_gamma=0.0: expected'),
                          ('theta_alpha=60', 'iterations is 0'), ('', 'expected')):
        with pytest.raises(config_lib.ConfigError, match=message):
            evaluate.parse_crf_grid(text, crf_config)
