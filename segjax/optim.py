"""Optax optimizers and learning-rate schedules named by experiment configs.

Weight decay never touches biases or normalisation scales: only parameters with two or more
dimensions (convolution and dense kernels) are decayed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import config as config_lib


def decay_mask(params) -> object:
    """True for kernels (ndim >= 2), False for biases and norm scales/offsets."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9,
        weight_decay: float = 5e-4, nesterov: bool = False) -> optax.GradientTransformation:
    """SGD with momentum and (coupled, L2-style) weight decay, as in mmsegmentation's recipes."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 1e-4,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019)."""
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=decay_mask)


def _warmup(peak_value: float, warmup_steps: int, count: jax.Array) -> jax.Array:
    """Linear warm-up whose first update (count 0) already moves: peak * (count + 1) / warmup."""
    return peak_value * (count + 1.0) / max(warmup_steps, 1)


def _decay_progress(count: jax.Array, warmup_steps: int, total_steps: int) -> jax.Array:
    """0 at the end of warm-up, 1 at total_steps."""
    decay_steps = max(total_steps - warmup_steps, 1)
    return jnp.clip(count - warmup_steps, 0, decay_steps) / decay_steps


def warmup_cosine(peak_value: float, total_steps: int, *, warmup_steps: int = 0,
                  end_value: float = 0.0) -> optax.Schedule:
    """Linear warm-up to `peak_value` (step k of warmup_steps at peak * k / warmup_steps), then
    cosine decay to `end_value` at total_steps."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = _decay_progress(count, warmup_steps, total_steps)
        cosine = end_value + (peak_value - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup_steps, _warmup(peak_value, warmup_steps, count), cosine)

    return schedule


def warmup_poly(peak_value: float, total_steps: int, *, warmup_steps: int = 0,
                power: float = 0.9, end_value: float = 1e-4) -> optax.Schedule:
    """Linear warm-up as warmup_cosine's, then poly decay
    lr = (peak - end) * (1 - t/T)**power + end (DeepLab), t counted from the end of warm-up."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = _decay_progress(count, warmup_steps, total_steps)
        poly = (peak_value - end_value) * (1.0 - progress) ** power + end_value
        return jnp.where(count < warmup_steps, _warmup(peak_value, warmup_steps, count), poly)

    return schedule


def constant(peak_value: float, total_steps: int) -> optax.Schedule:
    del total_steps
    return optax.constant_schedule(peak_value)


def make(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                     optax.Schedule]:
    """The optimizer and schedule of an experiment config; `optimizer.lr` is the peak LR."""
    opt_options = config_lib.options(config.optimizer)
    peak_lr = opt_options.pop('lr')
    schedule = config.schedule.fn(peak_lr, config.num_steps,
                                  **config_lib.options(config.schedule))
    return config.optimizer.fn(schedule, **opt_options), schedule
