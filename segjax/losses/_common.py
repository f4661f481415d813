"""What every loss family shares: the type aliases, the denominators contract, input
preparation (float32, valid mask) and arithmetic that stays finite on empty batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

LossFn = Callable[..., Any]
# A term of a composite: a loss function, (loss function, weight), or a mapping
# {'fn': loss function, 'weight': w, **options of that loss} (the form a config can override).
LossSpec = LossFn | tuple[LossFn, float] | Mapping[str, Any]

_TINY = jnp.finfo(jnp.float32).tiny
# The key under which a loss called with with_denominators=True returns its (term, D) pairs.
DENOMINATORS = 'denominators'


def _reject_dict(logits) -> None:
    if isinstance(logits, Mapping):
        raise TypeError(
            f'got a dict of model outputs (keys {sorted(logits)}), expected a logits array; '
            "for a model with auxiliary heads wrap the loss: losses.with_aux(..., main=<loss>)")


def _prepare(logits, labels, ignore_index: int):
    """(float32 logits zeroed at invalid pixels, valid mask, labels with invalid -> 0)."""
    _reject_dict(logits)
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f'labels {labels.shape} do not match logits {logits.shape} [..., C]')
    num_classes = logits.shape[-1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    # Whatever an ignored pixel's logits hold (even inf/NaN), nothing reaches the loss or its
    # gradient: jnp.where's gradient to the unselected branch is an exact zero.
    logits = jnp.where(valid[..., None], logits, 0.0)
    return logits, valid, jnp.where(valid, labels, 0)


def _prepare_binary(logits, labels, ignore_index: int):
    """(float32 logits [...] zeroed at invalid pixels, valid mask, float32 targets in {0, 1})."""
    _reject_dict(logits)
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if logits.shape == labels.shape + (1,):
        logits = logits[..., 0]
    if logits.shape != labels.shape:
        raise ValueError(f'labels {labels.shape} do not match binary logits {logits.shape} '
                         '([...] or [..., 1])')
    valid = (labels != ignore_index) & ((labels == 0) | (labels == 1))
    return jnp.where(valid, logits, 0.0), valid, jnp.where(valid, labels, 0).astype(jnp.float32)


def _count(mask: jax.Array, axis=None) -> jax.Array:
    # Count in int32: a float32 sum of ones loses exactness past 2**24 pixels.
    return jnp.sum(mask, axis=axis, dtype=jnp.int32).astype(jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array, fallback: float = 0.0) -> jax.Array:
    """num / den where den > 0, else `fallback`, with finite gradients in both cases."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def _safe_pow(x: jax.Array, power) -> jax.Array:
    """x ** power for x >= 0, with a finite (zero) gradient at x = 0 for any power >= 0."""
    positive = x > 0
    at_zero = jnp.where(jnp.asarray(power) == 0, 1.0, 0.0)  # 0 ** 0 = 1
    return jnp.where(positive, jnp.where(positive, x, 1.0) ** power, at_zero)


def _class_vector(values, num_classes: int, name: str) -> jax.Array:
    values = jnp.asarray(values, jnp.float32)
    if values.ndim == 0:
        return jnp.broadcast_to(values, (num_classes,))
    if values.shape != (num_classes,):
        raise ValueError(f'{name} has shape {values.shape}; expected ({num_classes},) or a scalar')
    return values


def _pixel_nll(logits, safe_labels):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_p = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    return log_probs, -log_p


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and value == 0


def declares_denominators(fn: LossFn) -> bool:
    """Whether a loss (or a partial of one) takes ``with_denominators`` (see the module doc)."""
    try:
        return 'with_denominators' in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature declares nothing
        return False


def _declared(value: jax.Array, denominator: jax.Array, with_denominators: bool):
    """The loss value, or with `with_denominators` {'loss': value, 'denominators': ((value, D),)}:
    D is what the value divides the batch's sum by, a function of the labels only."""
    if not with_denominators:
        return value
    return {'loss': value, DENOMINATORS: ((value, jax.lax.stop_gradient(denominator)),)}



def _class_mean(per_class: jax.Array, ground_truth: jax.Array, classes: str,
                class_weights) -> jax.Array:
    """Weighted mean of per-class losses over the counted classes; 0.0 when none counts."""
    if classes == 'present':
        counted = ground_truth > 0
    elif classes == 'all':
        counted = jnp.ones(per_class.shape, jnp.bool_)
    else:
        raise ValueError(f"classes={classes!r}: expected 'present' or 'all'")
    weights = counted.astype(jnp.float32)
    if class_weights is not None:
        weights = weights * _class_vector(class_weights, per_class.shape[0], 'class_weights')
    return _safe_div(jnp.sum(jnp.where(counted, weights * per_class, 0.0)), jnp.sum(weights))
