"""Models per the contract, optimizers and schedules (1 vs 8 devices: test_scale_out.py)."""

import functools

import jax
import jax.numpy as jnp
import pytest

from segjax import optim
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
