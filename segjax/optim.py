"""Optax optimizers and learning-rate schedules named by experiment configs.

Weight decay never touches biases or normalisation scales: only parameters with two or more
dimensions (convolution and dense kernels) are decayed.
"""

from __future__ import annotations

import jax
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


def warmup_cosine(peak_value: float, total_steps: int, *, warmup_steps: int = 0,
                  end_value: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_value`, then cosine decay to `end_value` at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak_value, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=end_value)


def warmup_poly(peak_value: float, total_steps: int, *, warmup_steps: int = 0,
                power: float = 0.9, end_value: float = 1e-4) -> optax.Schedule:
    """Linear warm-up, then poly decay lr = (peak - end) * (1 - t/T)**power + end (DeepLab)."""
    warmup = optax.linear_schedule(0.0, peak_value, max(warmup_steps, 1))
    decay = optax.polynomial_schedule(peak_value, end_value, power,
                                      max(total_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [warmup_steps])


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
