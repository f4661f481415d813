"""cross_entropy against hand-computed values, ignore semantics, class weights, jit and grads."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from segjax import losses
from segjax.losses import cross_entropy

# Four pixels, two classes; log-softmax written out by hand:
#   [0, 0]          -> p = [1/2, 1/2], label 0: nll = log 2
#   [log 3, 0]      -> p = [3/4, 1/4], label 0: nll = log(4/3)
#   [0, log 3]      -> p = [1/4, 3/4], label 1: nll = log(4/3)
#   [4, -4]         -> label 255, ignored
LOGITS = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)], [4.0, -4.0]])
LABELS = jnp.array([0, 0, 1, 255])


def test_golden_value():
    # Mean over the 3 valid pixels.
    expected = (math.log(2) + 2 * math.log(4 / 3)) / 3
    loss = cross_entropy(LOGITS, LABELS)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_golden_value_spatial_shape():
    # The same pixels laid out as [B=1, H=2, W=2, C=2] give the same mean.
    loss = cross_entropy(LOGITS.reshape(1, 2, 2, 2), LABELS.reshape(1, 2, 2))
    np.testing.assert_allclose(loss, (math.log(2) + 2 * math.log(4 / 3)) / 3, rtol=1e-6)


def test_class_weights_golden_value():
    # w = [1, 3]: sum w[y] * nll = 1 * log 2 + 1 * log(4/3) + 3 * log(4/3); sum w[y] = 1 + 1 + 3.
    expected = (math.log(2) + 4 * math.log(4 / 3)) / 5
    loss = cross_entropy(LOGITS, LABELS, class_weights=jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_out_of_range_labels_are_ignored():
    labels = jnp.array([0, 0, 1, 2])  # 2 is outside [0, C) for C = 2
    np.testing.assert_allclose(cross_entropy(LOGITS, labels), cross_entropy(LOGITS, LABELS))
    labels = jnp.array([0, 0, 1, -1])
    np.testing.assert_allclose(cross_entropy(LOGITS, labels), cross_entropy(LOGITS, LABELS))


def test_custom_ignore_index_and_uint8_labels():
    labels = jnp.array([0, 0, 1, 7], jnp.uint8)
    np.testing.assert_allclose(
        cross_entropy(LOGITS, labels, ignore_index=7), cross_entropy(LOGITS, LABELS)
    )


def random_batch(seed=0, shape=(2, 5, 6), num_classes=4, ignore_fraction=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=shape)
    labels[rng.random(shape) < ignore_fraction] = 255
    return jnp.asarray(logits), jnp.asarray(labels)


def test_ignored_pixels_change_neither_loss_nor_gradient():
    logits, labels = random_batch()
    ignored = (labels == 255)[..., None]
    other = jnp.where(ignored, 100.0 * jax.random.normal(jax.random.key(0), logits.shape), logits)
    value_and_grad = jax.jit(jax.value_and_grad(cross_entropy))
    loss_a, grad_a = value_and_grad(logits, labels)
    loss_b, grad_b = value_and_grad(other, labels)
    np.testing.assert_array_equal(loss_a, loss_b)
    np.testing.assert_array_equal(grad_a, grad_b)
    # Exactly zero at ignored pixels, non-zero elsewhere.
    assert np.all(np.where(ignored, grad_a, 0.0) == 0.0)
    assert np.all(np.abs(grad_a).sum(-1)[~np.asarray(ignored[..., 0])] > 0)


def test_all_ignored_batch_is_zero_with_finite_grads():
    logits, _ = random_batch()
    labels = jnp.full(logits.shape[:-1], 255)
    for weights in [None, jnp.array([1.0, 2.0, 0.5, 1.0])]:
        loss, grad = jax.value_and_grad(cross_entropy)(logits, labels, class_weights=weights)
        assert float(loss) == 0.0
        assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


def test_jit_matches_eager():
    logits, labels = random_batch(seed=1)
    weights = jnp.array([0.5, 1.0, 2.0, 1.5])
    eager = cross_entropy(logits, labels, class_weights=weights)
    jitted = jax.jit(cross_entropy, static_argnames='ignore_index')(
        logits, labels, class_weights=weights
    )
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_matches_numpy_reference():
    logits, labels = random_batch(seed=2)
    weights = np.array([0.5, 1.0, 2.0, 1.5])
    x = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    valid = y != 255
    nll = -log_probs[valid, y[valid]]
    w = weights[y[valid]]
    np.testing.assert_allclose(cross_entropy(logits, labels), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        cross_entropy(logits, labels, class_weights=weights), (w * nll).sum() / w.sum(), rtol=1e-5
    )


def test_bfloat16_logits_give_float32():
    logits, labels = random_batch(seed=3)
    low = logits.astype(jnp.bfloat16)
    loss = cross_entropy(low, labels)
    assert loss.dtype == jnp.float32
    # Same value as float32 on the bf16-rounded logits, and close to the unrounded result.
    np.testing.assert_allclose(loss, cross_entropy(low.astype(jnp.float32), labels), rtol=1e-6)
    np.testing.assert_allclose(loss, cross_entropy(logits, labels), rtol=2e-2)
    grad = jax.grad(cross_entropy)(low, labels)
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(grad.astype(jnp.float32)))


def test_check_grads():
    logits, labels = random_batch(seed=4, shape=(2, 3, 3), num_classes=3)
    weights = jnp.array([0.5, 2.0, 1.0])
    # jit keeps the many numerical-difference evaluations fast.
    check_grads(jax.jit(lambda x: cross_entropy(x, labels)), (logits,), order=1, modes=['rev'],
                atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(lambda x: cross_entropy(x, labels, class_weights=weights)), (logits,),
                order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match='do not match'):
        cross_entropy(LOGITS, LABELS[:3])


def test_docstring_example():
    result = doctest.testmod(losses, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_torch_parity():
    torch = pytest.importorskip('torch')
    logits, labels = random_batch(seed=5)
    weights = np.array([0.5, 1.0, 2.0, 1.5], np.float32)
    # torch wants [B, C, H, W] and int64 labels.
    t_logits = torch.tensor(np.moveaxis(np.asarray(logits), -1, 1))
    t_labels = torch.tensor(np.asarray(labels), dtype=torch.int64)
    expected = torch.nn.functional.cross_entropy(
        t_logits, t_labels, weight=torch.tensor(weights), ignore_index=255
    )
    np.testing.assert_allclose(
        cross_entropy(logits, labels, class_weights=weights), expected.item(), rtol=1e-5
    )
