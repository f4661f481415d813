"""Models per the contract, optimizers, gradient accumulation against the whole batch (1 vs 8
devices: test_scale_out.py)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import losses, optim, step
from segjax.models import fcn, unet

MODELS = {
    'unet': functools.partial(unet.UNet, base_width=4, depth=2),
    'fcn8s': functools.partial(fcn.FCN8s, base_width=4, head_width=8),
    'fcn32s': functools.partial(fcn.FCN32s, base_width=4, head_width=8),
}


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_logits_at_input_resolution_any_size(name, dtype):
    model = MODELS[name](num_classes=5, dtype=dtype)
    images = jnp.ones((2, 37, 50, 3))  # deliberately not a multiple of any stride
    variables = model.init(jax.random.key(0), images, train=False)
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 37, 50, 5)
    assert logits.dtype == jnp.float32  # the loss always sees float32 logits
    # Parameters stay float32 whatever the compute dtype.
    assert {p.dtype for p in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}


def test_unet_parameter_count_matches_formula():
    # Each double conv: 3x3 convs without bias + BN (scale, bias); 2x2 transposed convs with bias.
    def double(cin, cout):
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    w = 4
    expected = (double(3, w) + double(w, 2 * w) + double(2 * w, 4 * w)  # encoder + bottom
                + (4 * w * 2 * w * 4 + 2 * w) + double(4 * w, 2 * w)  # up to level 1
                + (2 * w * w * 4 + w) + double(2 * w, w)  # up to level 0
                + (w * 5 + 5))  # 1x1 classifier
    variables = MODELS['unet'](num_classes=5).init(
        jax.random.key(0), jnp.ones((1, 8, 8, 3)), train=False)
    assert sum(p.size for p in jax.tree.leaves(variables['params'])) == expected


def test_weight_decay_skips_biases_and_norm_scales():
    params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2)), 'bias': jnp.ones((2,))},
              'bn': {'scale': jnp.ones((2,))}}
    tx = optim.sgd(1.0, momentum=0.0, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates['conv']['kernel'][0, 0, 0, 0]) == -0.5
    assert float(updates['conv']['bias'][0]) == 0.0
    assert float(updates['bn']['scale'][0]) == 0.0


# ----------------------------------------------------------------------------- accumulation

class PixelLinear(nn.Module):
    """A 1x1 convolution (no BatchNorm: accumulation can then equal the whole batch), with an
    auxiliary 1x1 head at half resolution when `aux`."""

    num_classes: int = 4
    aux: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        logits = nn.Conv(self.num_classes, (1, 1))(x)
        if not self.aux:
            return logits
        return {'logits': logits, 'aux': nn.Conv(self.num_classes, (1, 1))(x[:, ::2, ::2])}


CLASS_WEIGHTS = (0.3, 1.0, 2.5, 0.7)


def uneven_batch(batch_size: int = 8, side: int = 8) -> dict:
    """Images whose valid-pixel counts and class mixes differ a lot: image i has 7 * i
    ignored pixels and labels skewed towards class i % 4."""
    rng = np.random.default_rng(3)
    label = rng.integers(0, 4, (batch_size, side, side))
    for i in range(batch_size):
        label[i][rng.random((side, side)) < 0.5] = i % 4
        label[i].reshape(-1)[:7 * i] = 255
    return {'image': rng.normal(size=(batch_size, side, side, 3)).astype(np.float32),
            'label': label.astype(np.int32)}


def one_step(model, loss_fn, batch: dict, grad_accum_steps: int):
    """(gradients, stats) of one train_step: SGD with learning rate 1 and nothing else, so the
    parameter change is minus the gradient."""
    tx = optim.sgd(1.0, momentum=0.0, weight_decay=0.0)
    state = step.create_state(model, tx, jax.random.key(0), (1, 8, 8, 3))
    new, stats = jax.jit(functools.partial(
        step.train_step, model=model, tx=tx, loss_fn=loss_fn,
        grad_accum_steps=grad_accum_steps))(state, batch, jax.random.key(1))
    grads = jax.tree.map(lambda old, p: np.asarray(old - p), state.params, new.params)
    return grads, jax.device_get(stats)


ACCUMULATED_LOSSES = {
    # The default experiment's loss (experiments/unet_synthetic.py).
    'class_weighted_ce': (False, functools.partial(losses.cross_entropy,
                                                   class_weights=CLASS_WEIGHTS)),
    'ce_by_valid_smoothed': (False, functools.partial(
        losses.cross_entropy, class_weights=CLASS_WEIGHTS, normalize_by='valid',
        label_smoothing=0.1)),
    # Terms with three different denominators (class weights, valid pixels, boundary weights).
    'aux_of_weighted_sums': (True, functools.partial(
        losses.with_aux, aux_weight=0.4,
        main={'fn': losses.weighted_sum, 'terms': {
            'ce': {'fn': losses.cross_entropy, 'class_weights': CLASS_WEIGHTS},
            'focal': {'fn': losses.focal_loss, 'weight': 0.5, 'gamma': 1.0},
            'edge': {'fn': losses.boundary_cross_entropy, 'weight': 0.3}}},
        aux=losses.cross_entropy)),
}


@pytest.mark.parametrize('name', sorted(ACCUMULATED_LOSSES))
@pytest.mark.parametrize('micro_batches', [2, 4])
def test_accumulation_equals_the_whole_batch_whatever_the_pixel_counts(name, micro_batches):
    aux, loss_fn = ACCUMULATED_LOSSES[name]
    model, batch = PixelLinear(aux=aux), uneven_batch()
    whole_grads, whole = one_step(model, loss_fn, batch, 1)
    grads, accumulated = one_step(model, loss_fn, batch, micro_batches)
    np.testing.assert_allclose(accumulated['loss'], whole['loss'], rtol=1e-6)
    np.testing.assert_allclose(accumulated['pixel_accuracy'], whole['pixel_accuracy'], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_accumulation_by_a_plain_average_would_differ():
    # The same loss behind a lambda declares no denominator: micro-batches are averaged, which
    # with these uneven pixel counts is measurably not the whole batch (so the test above can
    # tell the two apart).
    loss_fn = ACCUMULATED_LOSSES['class_weighted_ce'][1]
    assert losses.declares_denominators(loss_fn)
    undeclared = lambda logits, labels: loss_fn(logits, labels)  # noqa: E731
    assert not losses.declares_denominators(undeclared)
    model, batch = PixelLinear(), uneven_batch()
    whole_grads, whole = one_step(model, loss_fn, batch, 1)
    grads, averaged = one_step(model, undeclared, batch, 4)
    kernel, whole_kernel = grads['Conv_0']['kernel'], whole_grads['Conv_0']['kernel']
    assert np.max(np.abs(kernel - whole_kernel)) > 1e-3
    assert abs(float(averaged['loss']) - float(whole['loss'])) > 1e-3


def test_accumulated_region_loss_is_the_mean_of_its_micro_batches():
    # Cross-entropy (declared) is exact; Dice (a region loss, nothing to declare) is averaged
    # over the micro-batches: the logged loss is exactly CE(whole) + mean_i Dice(micro i).
    loss_fn = functools.partial(losses.weighted_sum, terms={
        'ce': {'fn': losses.cross_entropy, 'class_weights': CLASS_WEIGHTS},
        'dice': losses.dice_loss})
    model, batch = PixelLinear(), uneven_batch()
    _, stats = one_step(model, loss_fn, batch, 2)
    state = step.create_state(model, optim.sgd(1.0), jax.random.key(0), (1, 8, 8, 3))
    logits = model.apply({'params': state.params}, batch['image'])
    ce = losses.cross_entropy(logits, batch['label'], class_weights=CLASS_WEIGHTS)
    # Micro-batch i holds rows i, i + k, ... (step._microbatches).
    dice = np.mean([losses.dice_loss(logits[i::2], batch['label'][i::2]) for i in range(2)])
    np.testing.assert_allclose(stats['loss'], float(ce) + dice, rtol=1e-6)
    assert abs(dice - float(losses.dice_loss(logits, batch['label']))) > 1e-4
