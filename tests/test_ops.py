"""segjax.models.ops against the flax/lax building blocks they replace: same variables, same
outputs, same gradients (float32, on one device and sharded over eight)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from segjax import sharding
from segjax.models import ops


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize('shape,strides,padding', [
    ((2, 9, 7, 5), (1, 1), 'SAME'), ((2, 9, 7, 5), (2, 2), 'SAME'),
    ((1, 8, 8, 4), (2, 1), ((0, 0), (0, 0))), ((3, 5, 6, 8), (1, 1), 'VALID')])
def test_pointwise_conv_equals_lax(shape, strides, padding):
    x, kernel = _normal(0, shape), _normal(1, (1, 1, shape[-1], 6))
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, ('NHWC', 'HWIO', 'NHWC'))
    expected = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=numbers)
    got = ops.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=numbers)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_conv_module_same_params_and_outputs_as_nn_conv():
    x = _normal(0, (2, 11, 10, 3))
    for kwargs in [dict(kernel_size=(1, 1), strides=2), dict(kernel_size=(3, 3), strides=2),
                   dict(kernel_size=(3, 3), kernel_dilation=2), dict(kernel_size=(1, 1))]:
        reference = nn.Conv(4, **kwargs)
        variables = reference.init(jax.random.key(0), x)
        fast = ops.Conv(4, **kwargs)
        assert (jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x))
                == jax.tree.map(jnp.shape, variables))
        np.testing.assert_allclose(fast.apply(variables, x), reference.apply(variables, x),
                                   rtol=1e-5, atol=1e-5)


def _bn_pair(train):
    reference = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    fast = ops.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    return reference, fast


def _bn_variables(x):
    reference, _ = _bn_pair(True)
    variables = reference.init(jax.random.key(0), x)
    channels = x.shape[-1]
    # Non-trivial parameters and statistics so every term of the formulas is exercised.
    return {'params': {'scale': 1 + 0.3 * _normal(1, (channels,)), 'bias': _normal(2, (channels,))},
            'batch_stats': {'mean': _normal(3, (channels,)),
                            'var': 0.5 + jnp.abs(_normal(4, (channels,)))},
            **{k: v for k, v in variables.items() if k not in ('params', 'batch_stats')}}


def _bn_loss(module, variables, x, cotangent):
    y, updates = module.apply(variables, x, mutable=['batch_stats'])
    return jnp.sum(y * cotangent), updates


@pytest.mark.parametrize('shape', [(4, 6, 5, 3), (2, 3, 16)])
def test_batch_norm_matches_flax_in_train_mode(shape):
    x = 2.0 + 3.0 * _normal(0, shape)
    variables = _bn_variables(x)
    reference, fast = _bn_pair(train=True)
    assert (jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x))
            == jax.tree.map(jnp.shape, reference.init(jax.random.key(0), x)))
    cotangent = _normal(5, shape)
    results = []
    for module in (reference, fast):
        grad_fn = jax.jit(jax.value_and_grad(
            lambda v, x, m=module: _bn_loss(m, v, x, cotangent), argnums=(0, 1), has_aux=True))
        (value, updates), (grad_vars, grad_x) = grad_fn(variables, x)
        results.append((value, updates, grad_vars['params'], grad_x))
    for got, expected in zip(results[1], results[0], strict=True):
        jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-4),
                     got, expected)


def test_batch_norm_matches_flax_in_eval_mode():
    x = _normal(0, (2, 5, 5, 7))
    variables = _bn_variables(x)
    reference, fast = _bn_pair(train=False)
    np.testing.assert_allclose(fast.apply(variables, x), reference.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_batch_normalize_gradient_of_returned_statistics():
    """The custom gradient covers the batch mean and variance outputs too."""
    x = _normal(0, (3, 4, 2))
    scale, bias = 1 + _normal(1, (2,)), _normal(2, (2,))

    def direct(x):
        mean = jnp.mean(x, axis=(0, 1))
        var = jnp.mean(x * x, axis=(0, 1)) - mean**2
        y = (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias
        return jnp.sum(jnp.sin(y)) + jnp.sum(mean**2) + jnp.sum(jnp.cos(var))

    def custom(x):
        y, mean, var = ops.batch_normalize(x, scale, bias, 1e-5)
        return jnp.sum(jnp.sin(y)) + jnp.sum(mean**2) + jnp.sum(jnp.cos(var))

    np.testing.assert_allclose(jax.grad(custom)(x), jax.grad(direct)(x), rtol=1e-4, atol=1e-5)


def test_batch_norm_bfloat16_keeps_float32_statistics():
    x = (100.0 + _normal(0, (2, 8, 8, 4))).astype(jnp.bfloat16)
    module = ops.BatchNorm(use_running_average=False, momentum=0.0, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    y, updates = module.apply(variables, x, mutable=['batch_stats'])
    assert y.dtype == jnp.bfloat16
    assert updates['batch_stats']['mean'].dtype == jnp.float32
    np.testing.assert_allclose(updates['batch_stats']['mean'],
                               jnp.mean(x.astype(jnp.float32), axis=(0, 1, 2)), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mutable=['batch_stats'])[0]
                                      .astype(jnp.float32) ** 2))(x)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


def test_batch_norm_sharded_over_devices_uses_the_global_batch():
    mesh = sharding.make_mesh()
    x = 1.0 + _normal(0, (jax.device_count() * 2, 4, 4, 3))
    variables = _bn_variables(x)
    cotangent = _normal(5, x.shape)
    _, fast = _bn_pair(train=True)
    grad_fn = jax.jit(jax.value_and_grad(lambda v, x: _bn_loss(fast, v, x, cotangent),
                                         argnums=(0, 1), has_aux=True))
    single = grad_fn(variables, x)
    sharded = grad_fn(jax.device_put(variables, sharding.replicated(mesh)),
                      jax.device_put(x, sharding.batch_sharding(mesh)))
    jax.tree.map(lambda s, e: np.testing.assert_allclose(s, e, rtol=1e-5, atol=1e-5),
                 sharded, single)


def test_conv_transpose_2x2_equals_nn_conv_transpose():
    x = _normal(0, (2, 5, 7, 3))
    reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
    variables = reference.init(jax.random.key(1), x)
    fast = ops.ConvTranspose2x2(4)
    assert (jax.tree.map(jnp.shape, fast.init(jax.random.key(1), x))
            == jax.tree.map(jnp.shape, variables))
    np.testing.assert_allclose(fast.apply(variables, x), reference.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda v, m=m: jnp.sum(jnp.sin(m.apply(v, x))))(variables)
             for m in (reference, fast)]
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5), *grads)


@pytest.mark.parametrize('pool,shape,reference', [
    (ops.max_pool_2x2, (2, 6, 8, 3), lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))),
    (ops.max_pool_3x3_stride2, (2, 9, 8, 3),
     lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))),
    (ops.max_pool_3x3_stride2, (1, 6, 7, 2),
     lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))])
def test_max_pools_equal_nn_max_pool_with_gradients(pool, shape, reference):
    x = _normal(0, shape)  # continuous values: no ties, so gradients are unambiguous
    np.testing.assert_array_equal(pool(x), reference(x))
    cotangent = _normal(1, reference(x).shape)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(pool(x) * cotangent))(x),
                               jax.grad(lambda x: jnp.sum(reference(x) * cotangent))(x),
                               rtol=1e-6)


def test_spatial_mean_equals_mean():
    x = _normal(0, (3, 5, 7, 4))
    np.testing.assert_allclose(ops.spatial_mean(x), jnp.mean(x, axis=(1, 2), keepdims=True),
                               rtol=1e-5, atol=1e-6)
