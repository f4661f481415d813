"""The loss library: cross_entropy's own tests, then every loss against the same rules (jit,
ignored pixels, empty batches, numerical gradients, bfloat16, batch split over 8 devices),
golden values, float64 references, composition and the config path."""

import doctest
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.test_util import check_grads

from segjax import config as config_lib
from segjax import experiment, losses, step
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


def _jit_call(fn):
    """fn with its options bound statically and the call compiled (one XLA program per example,
    rather than dozens of eager op dispatches); the signature stays fn's."""
    @functools.wraps(fn)
    def call(*args, **options):
        return jax.jit(functools.partial(fn, **options))(*args)
    return call


def test_docstring_example():
    # Every public loss in the examples runs jitted: the same values, several times faster.
    public = {name: _jit_call(fn) for name, fn in vars(losses).items()
              if callable(fn) and getattr(fn, '__module__', None) == losses.__name__
              and not name.startswith('_')}
    result = doctest.testmod(losses, extraglobs=public, verbose=False)
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


# =============================================================================================
# The loss library: every loss against the same rules, golden values, references, composition.
# =============================================================================================


CE_DICE = {'ce': losses.cross_entropy, 'dice': {'fn': losses.dice_loss, 'weight': 0.5}}


def _total(fn):
    """A composite's total, so every loss fits the scalar rules below."""
    def scalar(logits, labels, **kwargs):
        out = fn(logits, labels, **kwargs)
        return out['loss'] if isinstance(out, dict) else out
    return scalar


# name -> (loss, options); all take [..., C] logits and class labels. One case per code path
# (the plain cross_entropy has its own tests above).
MULTI_CLASS = {
    'cross_entropy_smooth_weighted': (losses.cross_entropy, {
        'label_smoothing': 0.1, 'class_weights': (0.5, 2.0, 1.0)}),
    'top_k_cross_entropy': (losses.top_k_cross_entropy, {'top_k_percent': 0.3}),
    'ohem_cross_entropy': (losses.ohem_cross_entropy, {'thresh': 0.4, 'min_kept': 20}),
    'focal_loss': (losses.focal_loss, {'gamma': 2.0, 'alpha': (0.5, 1.0, 2.0)}),
    'boundary_cross_entropy': (losses.boundary_cross_entropy, {'boundary_weight': 3.0}),
    'dice_loss_all_squared_weighted': (losses.dice_loss, {
        'classes': 'all', 'exponent': 2, 'class_weights': (1.0, 2.0, 0.5)}),
    'jaccard_loss': (losses.jaccard_loss, {}),
    'tversky_loss': (losses.tversky_loss, {}),
    'focal_tversky_loss': (losses.focal_tversky_loss, {'classes': 'all'}),
    'lovasz_softmax': (losses.lovasz_softmax, {}),
    'weighted_sum': (_total(losses.weighted_sum), {'terms': CE_DICE}),
}
# name -> (loss, options); all take one logit channel [..., 1] and 0/1 labels.
BINARY = {
    'binary_cross_entropy': (losses.binary_cross_entropy, {'pos_weight': 2.0}),
    'binary_dice_loss': (losses.binary_dice_loss, {}),
    'lovasz_hinge': (losses.lovasz_hinge, {}),
}
ALL = {**MULTI_CLASS, **BINARY}


def make_inputs(name, seed=0, shape=(8, 3, 4), ignore_fraction=0.25):
    """numpy logits and labels (with ignored pixels) for `name`: 8 images of 3x4 pixels."""
    rng = np.random.default_rng(seed)
    channels, classes = (1, 2) if name in BINARY else (3, 3)
    logits = 1.5 * rng.normal(size=(*shape, channels)).astype(np.float32)
    labels = rng.integers(0, classes, size=shape).astype(np.int32)
    labels[rng.random(shape) < ignore_fraction] = 255
    return logits, labels


def shard(array):
    """The batch split over the 8 (forced CPU) devices, one image each, as train_step gets it."""
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec('data')))


def bound(name):
    fn, options = ALL[name]
    return functools.partial(fn, **options)


# One jitted function per loss, shared by the rule tests, so each compiles once per input type.
@functools.cache
def jitted(name):
    return jax.jit(bound(name))


@functools.cache
def jitted_value_and_grad(name):
    return jax.jit(jax.value_and_grad(bound(name)))


@pytest.mark.parametrize('name', ALL)
def test_rule_jit_compiles_to_a_float32_scalar(name):
    # Tracing fails on any Python branch on array values, so compiling is the check.
    logits, labels = make_inputs(name)
    value, grad = jitted_value_and_grad(name)(shard(logits), shard(labels))
    assert value.dtype == jnp.float32 and value.shape == ()
    assert np.isfinite(value) and float(value) > 0
    assert grad.shape == logits.shape and np.all(np.isfinite(grad))


@pytest.mark.parametrize('name', ALL)
def test_rule_batch_split_gives_the_formula_over_the_global_batch(name):
    # Sharded over 8 devices, the value is the reference formula (numpy, float64) over all the
    # batch's pixels: not a mean of per-device values.
    logits, labels = make_inputs(name, seed=1)
    value, _ = jitted_value_and_grad(name)(shard(logits), shard(labels))
    np.testing.assert_allclose(value, REFERENCE[name](logits, labels), rtol=1e-5)


@pytest.mark.parametrize('name', ALL)
def test_rule_ignored_pixels_add_no_loss_and_no_gradient(name):
    # Ignored pixels' logits set to NaN, inf and huge values change neither loss nor gradient.
    logits, labels = make_inputs(name)
    ignored = (labels == 255)[..., None]
    index = np.arange(logits.size).reshape(logits.shape) % 3
    junk = np.where(index == 0, np.nan, np.where(index == 1, np.inf, 1e4)).astype(np.float32)
    loss_a, grad_a = jitted_value_and_grad(name)(shard(logits), shard(labels))
    loss_b, grad_b = jitted_value_and_grad(name)(shard(np.where(ignored, junk, logits)),
                                                 shard(labels))
    np.testing.assert_array_equal(loss_a, loss_b)
    np.testing.assert_array_equal(grad_a, grad_b)
    assert np.all(np.isfinite(grad_a))
    assert np.all(np.asarray(grad_a)[np.broadcast_to(ignored, grad_a.shape)] == 0.0)
    assert np.any(np.asarray(grad_a) != 0.0)


@pytest.mark.parametrize('name', ALL)
def test_rule_no_valid_pixel_gives_zero_and_finite_gradients(name):
    logits, labels = make_inputs(name)
    for fill in [255, 7]:  # all ignored, or all outside the valid label range
        value, grad = jitted_value_and_grad(name)(shard(logits),
                                                  shard(np.full_like(labels, fill)))
        assert float(value) == 0.0
        assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


@pytest.mark.parametrize('name', ALL)
def test_rule_numerical_gradients(name):
    logits, labels = make_inputs(name, seed=2)
    check_grads(lambda x: jitted(name)(x, labels), (logits,), order=1, modes=['rev'],
                atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('name', ALL)
def test_rule_bfloat16_logits_accumulate_in_float32(name):
    logits, labels = make_inputs(name, seed=2)
    low = logits.astype(jnp.bfloat16)
    value, grad = jitted_value_and_grad(name)(shard(low), shard(labels))
    assert value.dtype == jnp.float32
    # The float32 computation on the bfloat16-rounded logits.
    np.testing.assert_allclose(value, jitted(name)(low.astype(np.float32), labels), rtol=1e-5)
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(grad.astype(jnp.float32)))


def run(fn, *args, **options):
    """fn(*args, **options) compiled: one XLA program instead of dozens of eager op dispatches."""
    return jax.jit(functools.partial(fn, **options))(*args)


# ----------------------------------------------------------------------------- golden values

# Two pixels, two classes: p = [1/2, 1/2] and [3/4, 1/4].
P2 = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
DICE0, DICE1 = 1.0 / 2.25, 0.5 / 1.75  # labels [0, 1], smooth 0
T0, T1 = 0.5 / (0.5 + 0.3 * 0.75 + 0.7 * 0.5), 0.25 / (0.25 + 0.3 * 0.5 + 0.7 * 0.75)

GOLDEN = [
    ('label smoothing', losses.cross_entropy, P2, [0, 1], {'label_smoothing': 0.2},
     # (1 - .2) nll + .2 / 2 * (-log p_0 - log p_1) per pixel
     (0.8 * (math.log(2) + math.log(4)) + 0.1 * (2 * math.log(2) + math.log(4 / 3) + math.log(4)))
     / 2),
    ('smoothing + weights', losses.cross_entropy, P2, [0, 1],
     {'label_smoothing': 0.2, 'class_weights': (1.0, 3.0)},
     (0.8 * (math.log(2) + 3 * math.log(4)) + 0.1 * (4 * math.log(2) + math.log(4 / 3)
                                                     + 3 * math.log(4))) / 4),
    ('valid count', losses.cross_entropy, P2, [0, 1],
     {'class_weights': (1.0, 3.0), 'normalize_by': 'valid'}, (math.log(2) + 3 * math.log(4)) / 2),
    ('all pixels', losses.cross_entropy, jnp.concatenate([P2, P2]), [0, 1, 255, 255],
     {'normalize_by': 'all'}, (math.log(2) + math.log(4)) / 4),
    ('top-k 50%', losses.top_k_cross_entropy, jnp.concatenate([P2, P2]), [0, 1, 0, 255],
     {'top_k_percent': 0.5}, (math.log(4) + math.log(2)) / 2),
    ('top-k 25% weighted', losses.top_k_cross_entropy, jnp.concatenate([P2, P2]), [0, 1, 0, 255],
     {'top_k_percent': 0.25, 'class_weights': (3.0, 1.0)}, 3 * math.log(2)),
    ('ohem threshold', losses.ohem_cross_entropy, jnp.concatenate([P2, P2]), [0, 1, 1, 255],
     {'thresh': 0.3, 'min_kept': 0}, math.log(4)),  # p_y = .5, .25, .5
    ('ohem min_kept', losses.ohem_cross_entropy, jnp.concatenate([P2, P2]), [0, 1, 1, 255],
     {'thresh': 0.3, 'min_kept': 2}, (math.log(4) + 2 * math.log(2)) / 3),  # ties at .5 kept
    ('ohem min_kept > valid', losses.ohem_cross_entropy, P2, [0, 1],
     {'thresh': 0.0, 'min_kept': 50}, (math.log(2) + math.log(4)) / 2),
    ('focal', losses.focal_loss, P2, [0, 1], {'gamma': 2.0, 'alpha': (1.0, 2.0)},
     (0.25 * math.log(2) + 2 * 0.75 ** 2 * math.log(4)) / 2),
    ('dice', losses.dice_loss, P2, [0, 1], {'smooth': 0.0}, 1 - (DICE0 + DICE1) / 2),
    ('dice smooth', losses.dice_loss, P2, [0, 1], {'smooth': 1.0},
     1 - ((1 + 1) / (2.25 + 1) + (0.5 + 1) / (1.75 + 1)) / 2),
    ('dice squared', losses.dice_loss, P2, [0, 1], {'smooth': 0.0, 'exponent': 2},
     1 - (1 / (0.25 + 0.5625 + 1) + 0.5 / (0.25 + 0.0625 + 1)) / 2),
    ('dice weighted', losses.dice_loss, P2, [0, 1], {'smooth': 0.0, 'class_weights': (1.0, 3.0)},
     ((1 - DICE0) + 3 * (1 - DICE1)) / 4),
    ('dice present', losses.dice_loss, P2, [0, 0], {'smooth': 0.0},  # class 1 absent
     1 - 2 * 1.25 / (1.25 + 2)),
    ('dice all', losses.dice_loss, P2, [0, 0], {'smooth': 0.0, 'classes': 'all'},
     (1 - 2 * 1.25 / (1.25 + 2) + 1) / 2),  # the absent class scores 0 (loss 1)
    ('jaccard', losses.jaccard_loss, P2, [0, 1], {'smooth': 0.0},
     1 - (0.5 / 1.75 + 0.25 / 1.5) / 2),
    ('tversky', losses.tversky_loss, P2, [0, 1], {'smooth': 0.0}, 1 - (T0 + T1) / 2),
    ('focal tversky', losses.focal_tversky_loss, P2, [0, 1], {'smooth': 0.0, 'gamma': 2.0},
     ((1 - T0) ** 0.5 + (1 - T1) ** 0.5) / 2),
    ('lovasz', losses.lovasz_softmax, P2, [0, 1], {}, (0.75 * 0.5 + 0.5 * 0.5 + 0.75) / 2),
    ('lovasz with ignored', losses.lovasz_softmax, jnp.concatenate([P2, P2]), [0, 1, 255, 255],
     {}, (0.75 * 0.5 + 0.5 * 0.5 + 0.75) / 2),
    ('lovasz all', losses.lovasz_softmax, P2, [0, 0], {'classes': 'all'},
     # class 0: errors [.5, .25], both foreground -> .5 * 1/2 + .25 * 1/2; class 1 absent:
     # the largest error (.5) times a Jaccard increment of 1
     (0.5 * 0.5 + 0.25 * 0.5 + 0.5) / 2),
    ('bce', losses.binary_cross_entropy, jnp.array([0.0, math.log(3.0), 2.0]), [1, 0, 2], {},
     (math.log(2) + math.log(4)) / 2),  # label 2 is not binary: ignored
    ('bce pos_weight', losses.binary_cross_entropy, jnp.array([[0.0], [math.log(3.0)]]), [1, 0],
     {'pos_weight': 3.0}, (3 * math.log(2) + math.log(4)) / 2),
    ('binary dice', losses.binary_dice_loss, jnp.array([0.0, math.log(3.0)]), [1, 0],
     {'smooth': 0.0}, 1 - 1 / 2.25),
    ('lovasz hinge', losses.lovasz_hinge, jnp.array([2.0, -1.0, 0.5, 9.0]), [1, 1, 0, 255], {},
     2 * 0.5 + 1.5 / 6),
]


def test_golden_values():
    # All cases in one compiled program (each a constant input): one compilation, not 26.
    @jax.jit
    def compute():
        return [fn(logits, jnp.asarray(labels), **options)
                for _, fn, logits, labels, options, _ in GOLDEN]

    values = compute()
    wrong = [(name, float(value), expected) for (name, *_, expected), value in zip(
        GOLDEN, values, strict=True) if not np.isclose(value, expected, rtol=1e-5, atol=0)]
    assert not wrong, f'(case, got, expected): {wrong}'


def test_boundary_cross_entropy_golden_and_ignore_makes_no_edge():
    labels = jnp.array([[[0, 0, 1], [0, 0, 1], [0, 0, 0]]])  # one 3x3 image
    expected_edges = np.array([[[0, 1, 1], [0, 1, 1], [0, 1, 1]]], bool)
    np.testing.assert_array_equal(run(losses.label_boundaries, labels), expected_edges)
    # An ignored pixel between two classes is no edge, and its neighbours are not edges of it.
    np.testing.assert_array_equal(run(losses.label_boundaries, jnp.array([[0, 255, 1]])),
                                  [[False, False, False]])
    np.testing.assert_array_equal(
        run(losses.label_boundaries, jnp.array([[0, 0, 0, 1]]), radius=2),
        [[False, True, True, True]])
    logits = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))
    nll = -np.take_along_axis(np_log_softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]
    weight = 1 + 4.0 * expected_edges
    np.testing.assert_allclose(
        run(losses.boundary_cross_entropy, logits, labels, boundary_weight=4.0),
        (weight * nll).sum() / weight.sum(), rtol=1e-5)
    # boundary_weight 0 is the cross-entropy.
    np.testing.assert_allclose(
        run(losses.boundary_cross_entropy, logits, labels, boundary_weight=0.0),
        run(cross_entropy, logits, labels), rtol=1e-6)


# ----------------------------------------------------------------------------- references

def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_flat(logits, labels):
    """float64 log-probs [N, C] and labels [N] of the valid pixels only (the references drop
    ignored pixels, as the published implementations do)."""
    c = logits.shape[-1]
    x, y = np.asarray(logits).reshape(-1, c), np.asarray(labels).reshape(-1)
    keep = (y != 255) & (y >= 0) & (y < c)
    return np_log_softmax(x[keep]), y[keep]


def np_region(logits, labels, score):
    """Mean over present classes of 1 - score(tp, fp, fn), over all valid pixels."""
    log_p, y = np_flat(logits, labels)
    p, g = np.exp(log_p), np.eye(log_p.shape[1])[y]
    tp, fp, fn = (p * g).sum(0), (p * (1 - g)).sum(0), ((1 - p) * g).sum(0)
    present = g.sum(0) > 0
    return (1 - score(tp, fp, fn))[present].mean()


def np_lovasz_grad(gt_sorted):
    gts = gt_sorted.sum()
    intersection = gts - np.cumsum(gt_sorted)
    union = gts + np.cumsum(1 - gt_sorted)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def np_lovasz_softmax(logits, labels, classes='present'):
    """bermanmaxim/LovaszSoftmax's lovasz_softmax_flat transcribed (ignored pixels dropped)."""
    log_p, y = np_flat(logits, labels)
    p = np.exp(log_p)
    out = []
    for c in range(logits.shape[-1]):
        fg = (y == c).astype(np.float64)
        if classes == 'present' and fg.sum() == 0:
            continue
        errors = np.abs(fg - p[:, c])
        perm = np.argsort(-errors, kind='stable')
        out.append(errors[perm] @ np_lovasz_grad(fg[perm]))
    return np.mean(out) if out else 0.0


def np_lovasz_hinge(logits, labels):
    x, y = np.asarray(logits, np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    keep = (y == 0) | (y == 1)
    x, y = x[keep], y[keep].astype(np.float64)
    if not len(y):
        return 0.0
    errors = 1.0 - x * (2 * y - 1)
    perm = np.argsort(-errors, kind='stable')
    return np.maximum(errors[perm], 0) @ np_lovasz_grad(y[perm])


def np_nll(logits, labels):
    log_p, y = np_flat(logits, labels)
    return log_p, y, -log_p[np.arange(len(y)), y]


def np_cross_entropy(logits, labels, class_weights=None, label_smoothing=0.0):
    log_p, y, nll = np_nll(logits, labels)
    c = log_p.shape[1]
    w = np.ones(c) if class_weights is None else np.asarray(class_weights, np.float64)
    smooth = -(log_p * w).sum(-1)  # PyTorch's label_smoothing with weight
    per_pixel = (1 - label_smoothing) * w[y] * nll + label_smoothing / c * smooth
    return per_pixel.sum() / w[y].sum()


def np_top_k(logits, labels, top_k_percent):
    """DeepLab: k = int(fraction * all pixels), the mean of the k largest valid losses."""
    k = max(1, int(top_k_percent * np.asarray(labels).size))
    return np.sort(np_nll(logits, labels)[2])[::-1][:k].mean()


def np_ohem(logits, labels, thresh, min_kept):
    """HRNet's rule: label probability below thresh, or among the min_kept lowest; mean."""
    nll = np_nll(logits, labels)[2]
    prob = np.exp(-nll)
    keep = (prob < thresh) | (np.argsort(np.argsort(prob)) < min_kept)
    return nll[keep].mean()


def np_focal(logits, labels, gamma, alpha):
    _, y, nll = np_nll(logits, labels)
    return (np.asarray(alpha)[y] * (1 - np.exp(-nll)) ** gamma * nll).mean()


def np_boundary_cross_entropy(logits, labels, boundary_weight, radius=1):
    labels = np.asarray(labels)
    c = logits.shape[-1]
    valid = (labels >= 0) & (labels < c)
    weight = np.zeros(labels.shape)
    for index in np.ndindex(labels.shape):
        if valid[index]:
            *lead, i, j = index
            window = (*lead, slice(max(i - radius, 0), i + radius + 1),
                      slice(max(j - radius, 0), j + radius + 1))
            edge = np.any(labels[window][valid[window]] != labels[index])
            weight[index] = 1 + boundary_weight * edge
    nll = -np.take_along_axis(np_log_softmax(logits), np.where(valid, labels, 0)[..., None],
                              -1)[..., 0]
    return (weight * nll).sum() / weight.sum()


def np_soft_counts(logits, labels):
    log_p, y = np_flat(logits, labels)
    p, g = np.exp(log_p), np.eye(log_p.shape[1])[y]
    return p, g, (p * g).sum(0), g.sum(0)


def np_class_mean(per_class, count, classes, class_weights):
    counted = count > 0 if classes == 'present' else np.ones(count.shape, bool)
    w = counted * (1.0 if class_weights is None else np.asarray(class_weights, np.float64))
    return (w * per_class).sum() / w.sum()


def np_dice(logits, labels, smooth=1.0, exponent=1, classes='present', class_weights=None):
    p, _, tp, count = np_soft_counts(logits, labels)
    dice = (2 * tp + smooth) / ((p ** exponent).sum(0) + count + smooth)
    return np_class_mean(1 - dice, count, classes, class_weights)


def np_tversky(logits, labels, alpha=0.3, beta=0.7, smooth=1.0, gamma=1.0, classes='present'):
    p, _, tp, count = np_soft_counts(logits, labels)
    index = (tp + smooth) / (tp + alpha * (p.sum(0) - tp) + beta * (count - tp) + smooth)
    return np_class_mean((1 - index) ** (1 / gamma), count, classes, None)


def np_binary(logits, labels):
    x, y = np.asarray(logits, np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    keep = (y == 0) | (y == 1)
    return x[keep], y[keep].astype(np.float64)


def np_binary_cross_entropy(logits, labels, pos_weight=1.0):
    x, y = np_binary(logits, labels)
    return (pos_weight * y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)).mean()


def np_binary_dice(logits, labels, smooth=1.0):
    x, y = np_binary(logits, labels)
    p = 1 / (1 + np.exp(-x))
    return 1 - (2 * (p * y).sum() + smooth) / (p.sum() + y.sum() + smooth)


# The published formula of each rule case, in float64 numpy, over all the batch's pixels.
REFERENCE = {
    'cross_entropy_smooth_weighted': functools.partial(
        np_cross_entropy, label_smoothing=0.1, class_weights=(0.5, 2.0, 1.0)),
    'top_k_cross_entropy': functools.partial(np_top_k, top_k_percent=0.3),
    'ohem_cross_entropy': functools.partial(np_ohem, thresh=0.4, min_kept=20),
    'focal_loss': functools.partial(np_focal, gamma=2.0, alpha=(0.5, 1.0, 2.0)),
    'boundary_cross_entropy': functools.partial(np_boundary_cross_entropy, boundary_weight=3.0),
    'dice_loss_all_squared_weighted': functools.partial(
        np_dice, classes='all', exponent=2, class_weights=(1.0, 2.0, 0.5)),
    'jaccard_loss': functools.partial(np_tversky, alpha=1.0, beta=1.0),
    'tversky_loss': np_tversky,
    'focal_tversky_loss': functools.partial(np_tversky, gamma=4 / 3, classes='all'),
    'lovasz_softmax': np_lovasz_softmax,
    'weighted_sum': lambda x, y: np_cross_entropy(x, y) + 0.5 * np_dice(x, y),
    'binary_cross_entropy': functools.partial(np_binary_cross_entropy, pos_weight=2.0),
    'binary_dice_loss': np_binary_dice,
    'lovasz_hinge': np_lovasz_hinge,
}


def test_every_rule_case_has_a_reference():
    assert sorted(REFERENCE) == sorted(ALL)


def test_cross_entropy_options_match_reference():
    logits, labels = random_batch(seed=6)
    w = np.array([0.5, 1.0, 2.0, 1.5])
    eps = 0.1
    log_p, y = np_flat(logits, labels)
    nll = -log_p[np.arange(len(y)), y]
    smooth = -(log_p * w).sum(-1)
    per_pixel = (1 - eps) * w[y] * nll + eps / 4 * smooth  # PyTorch's label_smoothing with weight
    for normalize_by, den in [('weight', w[y].sum()), ('valid', len(y)), ('all', labels.size)]:
        np.testing.assert_allclose(
            run(cross_entropy, logits, labels, class_weights=w, label_smoothing=eps,
                          normalize_by=normalize_by), per_pixel.sum() / den, rtol=1e-5)
    with pytest.raises(ValueError, match='normalize_by'):
        run(cross_entropy, logits, labels, normalize_by='pixels')


def test_ohem_losses_match_reference():
    logits, labels = random_batch(seed=7, shape=(4, 5, 6))
    log_p, y = np_flat(logits, labels)
    nll = -log_p[np.arange(len(y)), y]
    # DeepLab: k = int(p * all pixels), the k largest valid losses, mean.
    for fraction in [0.05, 0.3, 1.0]:
        k = max(1, int(fraction * labels.size))
        expected = np.sort(nll)[::-1][:k].mean()
        np.testing.assert_allclose(
            run(losses.top_k_cross_entropy, logits, labels, top_k_percent=fraction), expected,
            rtol=1e-5)
    np.testing.assert_allclose(run(losses.top_k_cross_entropy, logits, labels, top_k_percent=1.0),
                               run(cross_entropy, logits, labels), rtol=1e-6)
    # Threshold with min_kept (HRNet): below thresh, or among the min_kept lowest probabilities.
    prob = np.exp(-nll)
    rank = np.argsort(np.argsort(prob))
    for thresh, min_kept in [(0.2, 0), (0.2, 30), (0.0, 1000)]:
        keep = (prob < thresh) | (rank < min_kept)
        np.testing.assert_allclose(
            run(losses.ohem_cross_entropy, logits, labels, thresh=thresh, min_kept=min_kept),
            nll[keep].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match='top_k_percent'):
        run(losses.top_k_cross_entropy, logits, labels, top_k_percent=0.0)


def test_focal_loss_matches_reference_and_reduces_to_cross_entropy():
    logits, labels = random_batch(seed=8)
    alpha = np.array([0.25, 1.0, 2.0, 0.5])
    log_p, y = np_flat(logits, labels)
    lp = log_p[np.arange(len(y)), y]
    expected = (-alpha[y] * (1 - np.exp(lp)) ** 1.5 * lp).mean()
    np.testing.assert_allclose(run(losses.focal_loss, logits, labels, gamma=1.5, alpha=alpha),
                               expected, rtol=1e-5)
    np.testing.assert_allclose(run(losses.focal_loss, logits, labels, gamma=0.0),
                               run(cross_entropy, logits, labels), rtol=1e-6)
    # A certain pixel (p = 1 exactly in float32) keeps a finite gradient for gamma < 1.
    certain = jnp.array([[100.0, 0.0, 0.0]])
    grad = jax.jit(jax.grad(functools.partial(losses.focal_loss, gamma=0.5)))(
        certain, jnp.array([0]))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('fn, options, score', [
    (losses.dice_loss, {'smooth': 0.0}, lambda tp, fp, fn: 2 * tp / (2 * tp + fp + fn)),
    (losses.dice_loss, {'smooth': 1.0}, lambda tp, fp, fn: (2 * tp + 1) / (2 * tp + fp + fn + 1)),
    (losses.jaccard_loss, {'smooth': 0.5}, lambda tp, fp, fn: (tp + 0.5) / (tp + fp + fn + 0.5)),
    (losses.tversky_loss, {'smooth': 0.0, 'alpha': 0.2, 'beta': 0.8},
     lambda tp, fp, fn: tp / (tp + 0.2 * fp + 0.8 * fn)),
], ids=['dice', 'dice_smooth', 'jaccard', 'tversky'])
def test_region_losses_match_the_formula_over_the_whole_batch(fn, options, score):
    logits, labels = random_batch(seed=9, shape=(4, 5, 6), num_classes=5)
    labels = jnp.where(labels == 3, 255, labels)  # class 3 absent: not counted ('present')
    np.testing.assert_allclose(run(fn, logits, labels, **options), np_region(logits, labels, score),
                               rtol=1e-5)


def test_region_loss_pools_the_batch_rather_than_averaging_images():
    two = jnp.stack([P2, P2[::-1]])[:, None]  # two 1x2 images, one class each
    y = jnp.array([[[0, 0]], [[1, 1]]])
    batch = float(run(losses.dice_loss, two, y, smooth=0.0))
    per_image = (float(run(losses.dice_loss, two[0], y[0], smooth=0.0))
                 + float(run(losses.dice_loss, two[1], y[1], smooth=0.0))) / 2
    # Over the batch: class 0 has TP .5 + .75 and sum p 2.5; class 1 TP .25 + .5, sum p 1.5.
    np.testing.assert_allclose(batch, 1 - (2.5 / 4.5 + 1.5 / 3.5) / 2, rtol=1e-6)
    # Per image (one class present in each): 1 - D_0 of image 0 and 1 - D_1 of image 1.
    np.testing.assert_allclose(per_image, 1 - (2.5 / 3.25 + 1.5 / 2.75) / 2, rtol=1e-6)


def test_tversky_special_cases_are_dice_and_jaccard():
    logits, labels = random_batch(seed=10)
    np.testing.assert_allclose(
        run(losses.tversky_loss, logits, labels, alpha=0.5, beta=0.5, smooth=0.0),
        run(losses.dice_loss, logits, labels, smooth=0.0), rtol=1e-5)
    np.testing.assert_allclose(
        run(losses.tversky_loss, logits, labels, alpha=1.0, beta=1.0, smooth=0.3),
        run(losses.jaccard_loss, logits, labels, smooth=0.3), rtol=1e-5)
    np.testing.assert_allclose(
        run(losses.focal_tversky_loss, logits, labels, gamma=1.0),
        run(losses.tversky_loss, logits, labels), rtol=1e-6)


def test_dice_classes_rule_for_absent_classes():
    logits, labels = random_batch(seed=11)
    labels = jnp.where(labels == 2, 0, labels)  # class 2 absent
    present = run(losses.dice_loss, logits, labels, classes='present')
    everything = run(losses.dice_loss, logits, labels, classes='all')
    # 'all' adds the absent class's term, 1 - s / (sum p_2 + s): mass on class 2 is penalised.
    probs = np.exp(np_log_softmax(logits))
    sum_p2 = probs[..., 2][np.asarray(labels) != 255].sum()
    np.testing.assert_allclose(everything, (3 * present + 1 - 1 / (sum_p2 + 1)) / 4, rtol=1e-5)
    with pytest.raises(ValueError, match='classes'):
        run(losses.dice_loss, logits, labels, classes='some')
    # smooth=0 and a class with no ground truth and exactly zero predicted mass (its probability
    # underflows): D = 0/0 is defined as 1, so the class adds 0, with finite gradients.
    empty = logits.at[..., 2].set(-1e4)
    value, grad = jax.jit(jax.value_and_grad(functools.partial(
        losses.dice_loss, smooth=0.0, classes='all')))(empty, labels)
    np.testing.assert_allclose(
        value, 3 / 4 * run(losses.dice_loss, empty, labels, smooth=0.0), rtol=1e-6)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('classes', ['present', 'all'])
def test_lovasz_softmax_matches_reference_implementation(classes):
    logits, labels = random_batch(seed=12, shape=(3, 5, 6), num_classes=5)
    labels = jnp.where(labels == 4, 255, labels)
    np.testing.assert_allclose(run(losses.lovasz_softmax, logits, labels, classes=classes),
                               np_lovasz_softmax(logits, labels, classes), rtol=1e-5)
    per_image = np.mean([np_lovasz_softmax(logits[i], labels[i], classes) for i in range(3)])
    np.testing.assert_allclose(
        run(losses.lovasz_softmax, logits, labels, classes=classes, per_image=True), per_image,
        rtol=1e-5)


def test_binary_losses_match_references():
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32) * 2
    labels = rng.integers(0, 2, size=(3, 4, 5))
    labels[rng.random(labels.shape) < 0.2] = 255
    x, y = logits[labels != 255].astype(np.float64), labels[labels != 255].astype(np.float64)
    log_sig, log_one_minus = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    np.testing.assert_allclose(run(losses.binary_cross_entropy, logits, labels, pos_weight=2.5),
                               -(2.5 * y * log_sig + (1 - y) * log_one_minus).mean(), rtol=1e-5)
    p = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(run(losses.binary_dice_loss, logits, labels, smooth=0.5),
                               1 - (2 * (p * y).sum() + 0.5) / (p.sum() + y.sum() + 0.5),
                               rtol=1e-5)
    np.testing.assert_allclose(run(losses.lovasz_hinge, logits, labels),
                               np_lovasz_hinge(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(
        run(losses.lovasz_hinge, logits, labels, per_image=True),
        np.mean([np_lovasz_hinge(logits[i], labels[i]) for i in range(3)]), rtol=1e-5)
    # [..., 1] and [...] logits are the same thing.
    for fn in [losses.binary_cross_entropy, losses.binary_dice_loss, losses.lovasz_hinge]:
        np.testing.assert_allclose(run(fn, logits[..., None], labels), run(fn, logits, labels),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match='binary logits'):
        run(losses.binary_cross_entropy, logits[..., None].repeat(2, -1), labels)


def test_dict_outputs_need_with_aux():
    with pytest.raises(TypeError, match='with_aux'):
        run(losses.dice_loss, {'logits': P2, 'aux': P2}, jnp.array([0, 1]))


# ----------------------------------------------------------------------------- composition

def test_weighted_sum_terms_forms_and_unweighted_reporting():
    logits, labels = random_batch(seed=14)
    ce = run(cross_entropy, logits, labels)
    dice = run(losses.dice_loss, logits, labels, smooth=0.5)
    lovasz = run(losses.lovasz_softmax, logits, labels)
    out = jax.jit(functools.partial(losses.weighted_sum, terms={
        'ce': cross_entropy,                                         # weight 1
        'dice': {'fn': losses.dice_loss, 'weight': 0.5, 'smooth': 0.5},  # with an option
        'lovasz': (losses.lovasz_softmax, 2.0),                      # (fn, weight)
    }))(logits, labels)
    assert list(out) == ['ce', 'dice', 'loss', 'lovasz']  # jit returns dicts key-sorted
    np.testing.assert_allclose(out['ce'], ce, rtol=1e-6)
    np.testing.assert_allclose(out['dice'], dice, rtol=1e-6)
    np.testing.assert_allclose(out['loss'], ce + 0.5 * dice + 2.0 * lovasz, rtol=1e-6)
    # train_step logs each term under loss/<name>.
    assert sorted(step.loss_terms(out)) == ['loss', 'loss/ce', 'loss/dice', 'loss/lovasz']


def test_weighted_sum_nested_and_ignore_index_passed_to_every_term():
    logits, labels = random_batch(seed=15)
    labels7 = jnp.where(labels == 255, 7, labels)
    inner = {'fn': losses.weighted_sum, 'weight': 2.0, 'terms': CE_DICE}
    out = run(losses.weighted_sum, logits, labels7, ignore_index=7,
                              terms={'region': inner, 'focal': losses.focal_loss})
    assert sorted(out) == ['focal', 'loss', 'region', 'region/ce', 'region/dice']
    expected = run(losses.weighted_sum, logits, labels, terms=CE_DICE)
    np.testing.assert_allclose(out['region'], expected['loss'], rtol=1e-6)
    np.testing.assert_allclose(
        out['loss'], 2 * expected['loss'] + run(losses.focal_loss, logits, labels), rtol=1e-6)


@pytest.mark.parametrize('terms, error, message', [
    ({'dice': {'fn': losses.dice_loss, 'smoth': 1.0}}, TypeError,
     "weighted_sum term 'dice': dice_loss takes no option 'smoth' (did you mean 'smooth'?)"),
    ({'loss': cross_entropy}, ValueError, "other than 'loss'"),
    ({'ce': {'weight': 1.0}}, ValueError, "needs 'fn'"),
    ({'ce': {'fn': cross_entropy, 'ignore_index': 0}}, ValueError, 'ignore_index is set once'),
    ({'ce': 'cross_entropy'}, TypeError, 'expected a loss function'),
    ({}, ValueError, 'at least one term'),
])
def test_weighted_sum_errors_name_the_term(terms, error, message):
    with pytest.raises(error) as info:
        run(losses.weighted_sum, P2, jnp.array([0, 1]), terms=terms)
    assert message in str(info.value)


def test_with_aux_main_plus_weighted_aux_heads():
    logits, labels = random_batch(seed=16)
    aux_a = logits[..., ::-1]
    aux_b = jnp.zeros_like(logits)
    out = run(losses.with_aux, {'logits': logits, 'aux': aux_a}, labels, aux_weight=0.4)
    assert sorted(out) == ['aux', 'loss', 'main']
    np.testing.assert_allclose(out['main'], run(cross_entropy, logits, labels), rtol=1e-6)
    np.testing.assert_allclose(out['aux'], run(cross_entropy, aux_a, labels), rtol=1e-6)
    np.testing.assert_allclose(out['loss'], out['main'] + 0.4 * out['aux'], rtol=1e-6)
    # Several heads, one weight each; a composite main loss also names its parts.
    out = run(losses.with_aux, {'logits': logits, 'aux': [aux_a, aux_b]}, labels,
                          main={'fn': losses.weighted_sum, 'terms': CE_DICE},
                          aux=losses.focal_loss, aux_weight=(0.4, 0.2))
    assert sorted(out) == ['aux/0', 'aux/1', 'loss', 'main', 'main/ce', 'main/dice']
    focal_a, focal_b = run(losses.focal_loss, aux_a, labels), run(losses.focal_loss, aux_b, labels)
    np.testing.assert_allclose(out['loss'], out['main'] + 0.4 * focal_a + 0.2 * focal_b,
                               rtol=1e-6)


def test_with_aux_resizes_low_resolution_aux_logits():
    logits, labels = random_batch(seed=17, shape=(2, 4, 6))
    low = jax.random.normal(jax.random.key(1), (2, 2, 3, 4))
    out = jax.jit(losses.with_aux)({'logits': logits, 'aux': low}, labels)
    up = jax.jit(jax.image.resize, static_argnums=(1, 2))(low, (2, 4, 6, 4), 'bilinear')
    np.testing.assert_allclose(out['aux'], run(cross_entropy, up, labels), rtol=1e-6)


def test_with_aux_errors():
    with pytest.raises(TypeError, match='use the main loss directly'):
        run(losses.with_aux, P2, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="no 'weight'"):
        run(losses.with_aux, {'logits': P2, 'aux': P2}, jnp.array([0, 1]),
                        main={'fn': cross_entropy, 'weight': 2.0})
    with pytest.raises(ValueError, match='2 weights for 1 aux heads'):
        run(losses.with_aux, {'logits': P2, 'aux': P2}, jnp.array([0, 1]), aux_weight=(0.4, 0.2))


# A 1x3 image whose last two pixels are an edge, plus an ignored pixel (see the doctests).
EDGE_LOGITS = jnp.zeros((1, 1, 4, 2)).at[0, 0, 0, 0].set(math.log(3.0))
EDGE_LABELS = jnp.array([[[0, 0, 1, 255]]])


@pytest.mark.parametrize('fn, options, denominator', [
    (cross_entropy, {}, 3.0),                                            # valid pixels
    (cross_entropy, {'class_weights': (2.0, 0.5)}, 2 * 2.0 + 0.5),       # sum of weights
    (cross_entropy, {'class_weights': (2.0, 0.5), 'normalize_by': 'valid'}, 3.0),
    (cross_entropy, {'normalize_by': 'all'}, 4.0),                       # every pixel
    (losses.focal_loss, {'alpha': (2.0, 0.5)}, 3.0),
    (losses.boundary_cross_entropy, {'boundary_weight': 4.0}, 1 + 5 + 5),
    (losses.binary_cross_entropy, {'pos_weight': 3.0}, 3.0),
])
def test_declared_denominators_golden(fn, options, denominator):
    assert losses.declares_denominators(fn)
    plain = run(fn, EDGE_LOGITS[..., :1] if fn is losses.binary_cross_entropy else EDGE_LOGITS,
                EDGE_LABELS, **options)
    out = run(fn, EDGE_LOGITS[..., :1] if fn is losses.binary_cross_entropy else EDGE_LOGITS,
              EDGE_LABELS, with_denominators=True, **options)
    assert sorted(out) == ['denominators', 'loss']
    ((term, d),) = out['denominators']
    np.testing.assert_allclose([out['loss'], term, d], [plain, plain, denominator], rtol=1e-6)
    # Declared denominators depend on the labels only and carry no gradient.
    grad = jax.grad(lambda z: fn(z, EDGE_LABELS, with_denominators=True, **options)
                    ['denominators'][0][1])(EDGE_LOGITS[..., :1] if fn is
                                            losses.binary_cross_entropy else EDGE_LOGITS)
    assert not np.any(grad)


@pytest.mark.parametrize('fn', [losses.dice_loss, losses.lovasz_softmax, losses.jaccard_loss,
                                losses.ohem_cross_entropy, losses.top_k_cross_entropy])
def test_region_losses_and_hard_example_mining_declare_no_denominator(fn):
    # Their normaliser is not a sum over pixels of the labels (Dice pools the batch; OHEM and
    # top-k select pixels by their logits): nothing to declare, accumulation averages them.
    assert not losses.declares_denominators(fn)


def test_composites_collect_the_weighted_terms_and_denominators_of_declaring_terms():
    logits, labels = random_batch(seed=18)
    aux = logits[..., ::-1]
    weights = (0.5, 1.0, 2.0, 1.5)
    terms = {'ce': {'fn': cross_entropy, 'class_weights': weights},
             'focal': {'fn': losses.focal_loss, 'weight': 0.5},
             'dice': {'fn': losses.dice_loss, 'weight': 2.0}}
    plain = run(losses.with_aux, {'logits': logits, 'aux': aux}, labels, aux_weight=0.4,
                main={'fn': losses.weighted_sum, 'terms': terms})
    out = run(losses.with_aux, {'logits': logits, 'aux': aux}, labels, aux_weight=0.4,
              main={'fn': losses.weighted_sum, 'terms': terms}, with_denominators=True)
    assert losses.declares_denominators(functools.partial(losses.with_aux, aux_weight=0.4))
    assert sorted(out) == sorted([*plain, 'denominators'])
    for key in plain:
        np.testing.assert_allclose(out[key], plain[key], rtol=1e-6)
    valid = (labels != 255)
    weight_sum = float(jnp.sum(jnp.where(valid, jnp.asarray(weights)[jnp.where(valid, labels,
                                                                                0)], 0.0)))
    count = float(valid.sum())
    # (w_k L_k, D_k) of ce and focal (0.5) in the main loss and in the aux head's (0.4; the
    # aux loss defaults to the main one); Dice declares none.
    expected = [(plain['main/ce'], weight_sum), (0.5 * plain['main/focal'], count),
                (0.4 * plain['aux/ce'], weight_sum), (0.4 * 0.5 * plain['aux/focal'], count)]
    assert len(out['denominators']) == 4
    for (term, d), (want_term, want_d) in zip(out['denominators'], expected, strict=True):
        np.testing.assert_allclose([term, d], [want_term, want_d], rtol=1e-6)
    # train_step's logged terms never include the denominators.
    assert 'loss/denominators' not in step.loss_terms(out)
    with pytest.raises(ValueError, match='with_denominators is set by the composite'):
        losses.weighted_sum(logits, labels, terms={
            'ce': {'fn': cross_entropy, 'with_denominators': True}})


def test_composite_config_loads_overrides_and_jits():
    config = config_lib.load('experiments/composite_loss_example.py', [
        'loss.terms.dice.weight=0.25', 'loss.terms.dice.classes=all',
        'loss.terms.ce.class_weights=(1, 2, 1, 1, 1, 1, 1, 1)'])
    loss_fn = experiment.make_loss(config)
    logits, labels = random_batch(seed=18, num_classes=8)
    out = jax.jit(loss_fn)(logits, labels)
    weights = (1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    np.testing.assert_allclose(out['ce'], run(cross_entropy, logits, labels, class_weights=weights),
                               rtol=1e-6)
    np.testing.assert_allclose(out['dice'], run(losses.dice_loss, logits, labels, classes='all'),
                               rtol=1e-6)
    np.testing.assert_allclose(out['loss'], out['ce'] + 0.25 * out['dice'], rtol=1e-6)


def test_with_aux_config_from_an_experiment_file(tmp_path):
    path = tmp_path / 'aux_experiment.py'
    path.write_text(
        'from experiments.unet_synthetic import get_config as base\n'
        'from segjax import losses\n'
        'def get_config():\n'
        '    config = base()\n'
        "    config.loss = {'fn': losses.with_aux, 'aux_weight': 0.4,\n"
        "                   'main': {'fn': losses.cross_entropy, 'label_smoothing': 0.0}}\n"
        '    return config\n')
    config = config_lib.load(str(path), ['loss.aux_weight=0.2', 'loss.main.label_smoothing=0.1'])
    loss_fn = experiment.make_loss(config)
    logits, labels = random_batch(seed=19, num_classes=8)
    out = jax.jit(loss_fn)({'logits': logits, 'aux': logits * 0.5}, labels)
    main = run(cross_entropy, logits, labels, label_smoothing=0.1)
    aux = run(cross_entropy, logits * 0.5, labels, label_smoothing=0.1)
    np.testing.assert_allclose(out['loss'], main + 0.2 * aux, rtol=1e-6)


class _TinyAuxNet(nn.Module):
    """A 1x1 conv with an auxiliary head at half resolution."""

    @nn.compact
    def __call__(self, images, train=False):
        logits = nn.Conv(3, (1, 1))(images)
        aux = nn.Conv(3, (1, 1), name='aux')(images[:, ::2, ::2])
        return {'logits': logits, 'aux': aux}


def test_train_step_logs_every_term_of_a_composite():
    model, tx = _TinyAuxNet(), optax.sgd(0.1)
    state = step.create_state(model, tx, jax.random.key(0), (1, 4, 4, 3))
    loss_fn = functools.partial(losses.with_aux, main={'fn': losses.weighted_sum,
                                                       'terms': CE_DICE}, aux_weight=0.4)
    rng = np.random.default_rng(20)
    labels = rng.integers(0, 3, size=(2, 4, 4))
    labels[0, 0] = 255
    batch = {'image': jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32),
             'label': jnp.asarray(labels)}
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx, loss_fn=loss_fn))
    _, stats = train_step(state, batch, jax.random.key(1))
    for key in ['loss', 'loss/main', 'loss/main/ce', 'loss/main/dice', 'loss/aux',
                'loss/aux/ce', 'loss/aux/dice']:
        assert key in stats and np.isfinite(stats[key]), key
    np.testing.assert_allclose(stats['loss'], stats['loss/main'] + 0.4 * stats['loss/aux'],
                               rtol=1e-6)


def test_parity_with_torch_losses():
    torch = pytest.importorskip('torch')
    F = torch.nn.functional
    logits, labels = random_batch(seed=21)
    weights = np.array([0.5, 1.0, 2.0, 1.5], np.float32)
    t_logits = torch.tensor(np.moveaxis(np.asarray(logits), -1, 1))
    t_labels = torch.tensor(np.asarray(labels), dtype=torch.int64)
    expected = F.cross_entropy(t_logits, t_labels, weight=torch.tensor(weights),
                               ignore_index=255, label_smoothing=0.1)
    np.testing.assert_allclose(run(cross_entropy, logits, labels, class_weights=weights,
                                             label_smoothing=0.1), expected.item(), rtol=1e-5)
    # Focal loss as commonly written on top of F.cross_entropy(reduction='none').
    ce = F.cross_entropy(t_logits, t_labels, ignore_index=255, reduction='none')
    valid = t_labels != 255
    focal = ((1 - torch.exp(-ce)) ** 2 * ce)[valid].mean()
    np.testing.assert_allclose(run(losses.focal_loss, logits, labels, gamma=2.0), focal.item(),
                               rtol=1e-5)
    binary = jnp.where(labels == 255, 255, labels % 2)
    x = torch.tensor(np.asarray(logits[..., 0]))
    y = torch.tensor(np.asarray(binary), dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor(2.0),
                                             reduction='none')[y != 255].mean()
    np.testing.assert_allclose(run(losses.binary_cross_entropy, logits[..., :1], binary,
                                                           pos_weight=2.0), bce.item(), rtol=1e-5)
