"""Learning-rate schedules by hand, and options the optimizer builder sets itself."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import config as config_lib
from segjax import optim

EXPERIMENT = 'experiments/unet_synthetic.py'


def test_warmup_cosine_by_hand():
    cosine = optim.warmup_cosine(1.0, 100, warmup_steps=10)
    # Warm-up: update k (count k - 1) at k/10, so the first update already trains.
    np.testing.assert_allclose([float(cosine(c)) for c in (0, 4, 9)], [0.1, 0.5, 1.0], rtol=1e-6)
    assert abs(float(cosine(10)) - 1.0) < 1e-6
    # Half-way through the 90 decay steps: 0.5 * (1 + cos(pi / 2)) = 0.5.
    np.testing.assert_allclose(float(cosine(55)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(cosine(100)), 0.0, atol=1e-7)
    np.testing.assert_allclose(float(cosine(150)), 0.0, atol=1e-7)  # clamped past the end


def test_warmup_cosine_without_warmup_starts_at_peak_and_ends_at_end_value():
    cosine = optim.warmup_cosine(2.0, 10, end_value=0.5)
    np.testing.assert_allclose(float(cosine(0)), 2.0, rtol=1e-6)
    # count 5 of 10: 0.5 + 1.5 * 0.5 * (1 + cos(pi/2)) = 1.25
    np.testing.assert_allclose(float(cosine(5)), 1.25, rtol=1e-6)
    np.testing.assert_allclose(float(cosine(10)), 0.5, rtol=1e-6)


def test_warmup_poly_by_hand():
    poly = optim.warmup_poly(1.0, 100, warmup_steps=0, power=0.9, end_value=0.0)
    # (1 - 50/100) ** 0.9 by hand: 0.5 ** 0.9 = 0.535886...
    np.testing.assert_allclose(float(poly(50)), 0.5**0.9, rtol=1e-5)
    warm = optim.warmup_poly(1.0, 110, warmup_steps=10, power=1.0, end_value=0.1)
    np.testing.assert_allclose(float(warm(0)), 0.1, rtol=1e-6)
    # 50 of the 100 decay steps, power 1: 0.9 * 0.5 + 0.1 = 0.55
    np.testing.assert_allclose(float(warm(60)), 0.55, rtol=1e-6)
    np.testing.assert_allclose(float(warm(110)), 0.1, rtol=1e-6)


@pytest.mark.parametrize('make', [optim.warmup_cosine, optim.warmup_poly])
def test_first_update_moves_the_parameters(make):
    tx = optim.sgd(make(1.0, 100, warmup_steps=50), momentum=0.0, weight_decay=0.0)
    params = {'w': jnp.ones((2, 2))}
    updates, _ = jax.jit(tx.update)({'w': jnp.ones((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates['w']), -1.0 / 50, rtol=1e-6)


def test_schedule_matches_optax_cosine_after_warmup():
    ours = optim.warmup_cosine(0.3, 200, warmup_steps=20, end_value=0.01)
    reference = optax.cosine_decay_schedule(0.3, 180, alpha=0.01 / 0.3)
    for count in (20, 57, 133, 199):
        assert math.isclose(float(ours(count)), float(reference(count - 20)), rel_tol=1e-5)


@pytest.mark.parametrize('override, message', [
    ('optimizer.learning_rate=0.1',
     "config.optimizer.learning_rate: segjax sets adamw's 'learning_rate' itself, from "
     'config.optimizer.lr'),
    ('schedule.total_steps=5', "segjax sets warmup_cosine's 'total_steps' itself"),
    ('schedule.peak_value=5.0', "segjax sets warmup_cosine's 'peak_value' itself"),
    ('model.num_classes=3', "segjax sets UNet's 'num_classes' itself, from config.data."),
    ('model.dtype=1', "segjax sets UNet's 'dtype' itself"),
    ('loss.ignore_index=0', "segjax sets cross_entropy's 'ignore_index' itself"),
    ('optimizer.lrr=0.1', "adamw takes no option 'lrr' (did you mean 'lr'?); it takes ['lr', "
     "'weight_decay', 'b1', 'b2', 'eps', 'no_decay', 'lr_multipliers', 'layer_decay', "
     "'layer_id_fn']"),
])
def test_options_the_builder_sets_are_config_errors(override, message):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(EXPERIMENT, [override])
    assert message in str(info.value)
