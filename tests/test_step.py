"""Models per the contract, and the sharded train step: 8 devices == 1 device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

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


def _run_steps(mesh, batches, num_steps=3):
    model = MODELS['unet'](num_classes=4)
    tx = optim.sgd(0.1, momentum=0.9, weight_decay=1e-4)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec('data'))
    state = jax.jit(functools.partial(step.create_state, model, tx, image_shape=(1, 16, 16, 3)),
                    out_shardings=replicated)(jax.random.key(0))
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx,
                                           loss_fn=losses.cross_entropy), donate_argnums=0)
    for batch in batches[:num_steps]:  # the same global batches, split 1 or 8 ways
        batch = {k: jax.device_put(v, data) for k, v in batch.items()}
        state, stats = train_step(state, batch, jax.random.key(1))
    return jax.device_get(state), jax.device_get(stats)


def test_train_step_on_8_devices_equals_1_device():
    assert jax.device_count() == 8, 'conftest forces 8 CPU devices'
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                'label': rng.integers(0, 4, size=(8, 16, 16)).astype(np.int32)}
               for _ in range(3)]
    for batch in batches:
        batch['label'][:, :2] = 255  # some ignored pixels too
    one = jax.make_mesh((1,), ('data',), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    eight = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    state1, stats1 = _run_steps(one, batches)
    state8, stats8 = _run_steps(eight, batches)
    assert int(state1.step) == int(state8.step) == 3
    np.testing.assert_allclose(stats1['loss'], stats8['loss'], rtol=1e-5)
    # Global-batch BatchNorm: running statistics agree too, not only parameters.
    for tree in ('params', 'batch_stats'):
        for a, b in zip(jax.tree.leaves(getattr(state1, tree)),
                        jax.tree.leaves(getattr(state8, tree)), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    # The parameters did move: the comparison is not between two initial states.
    model = MODELS['unet'](num_classes=4)
    initial = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
    moved = [float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(initial), jax.tree.leaves(state1.params), strict=True)]
    assert max(moved) > 1e-3


def test_weight_decay_skips_biases_and_norm_scales():
    params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2)), 'bias': jnp.ones((2,))},
              'bn': {'scale': jnp.ones((2,))}}
    tx = optim.sgd(1.0, momentum=0.0, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(updates['conv']['kernel'][0, 0, 0, 0]) == -0.5
    assert float(updates['conv']['bias'][0]) == 0.0
    assert float(updates['bn']['scale'][0]) == 0.0


def test_schedules():
    cosine = optim.warmup_cosine(1.0, 100, warmup_steps=10)
    assert float(cosine(0)) == 0.0 and abs(float(cosine(10)) - 1.0) < 1e-6
    assert abs(float(cosine(100))) < 1e-6
    poly = optim.warmup_poly(1.0, 100, warmup_steps=0, power=0.9, end_value=0.0)
    # (1 - 50/100) ** 0.9 by hand: 0.5 ** 0.9 = 0.535886...
    np.testing.assert_allclose(float(poly(50)), 0.5**0.9, rtol=1e-5)
