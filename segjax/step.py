"""The pure functions the loops jit: state creation, train_step, eval_step, predict_step.

No I/O and no globals: the model, optimizer and loss are bound with functools.partial by the
caller, and randomness comes from `fold_in(rng, step)`, so the rng never lives in the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax import metrics


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, ...]) -> TrainState:
    """Initialises parameters, BatchNorm statistics and optimizer state (float32 parameters)."""
    variables = model.init({'params': rng, 'dropout': rng}, jnp.zeros(image_shape, jnp.float32),
                           train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


def loss_terms(output) -> dict:
    """A loss returns a scalar, or (a composite) a dict of named terms with the total at 'loss'.

    The terms are logged as train/loss/<name>; only 'loss' is differentiated.
    """
    if isinstance(output, dict):
        if 'loss' not in output:
            raise ValueError(f"a loss returning a dict must hold the total at 'loss'; got "
                             f'{sorted(output)}')
        return {('loss' if k == 'loss' else f'loss/{k}'): v for k, v in output.items()}
    return {'loss': output}


def main_logits(outputs) -> jax.Array:
    """The logits of a model's output: the array itself, or 'logits' of a dict with aux heads."""
    return outputs['logits'] if isinstance(outputs, dict) else outputs


def _variables(state: TrainState) -> dict:
    return {'params': state.params, 'batch_stats': state.batch_stats}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_fn: Callable,
               ignore_index: int = 255) -> tuple[TrainState, dict]:
    """One optimizer step on a (global) batch; BatchNorm statistics are over the global batch."""
    rng = jax.random.fold_in(rng, state.step)

    def compute_loss(params):
        outputs, updates = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
            mutable=['batch_stats'], rngs={'dropout': rng})
        # Models with auxiliary heads hand the loss their whole output dict.
        terms = loss_terms(loss_fn(outputs, batch['label']))
        return terms['loss'], (terms, main_logits(outputs), updates)

    (loss, (terms, logits, updates)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates.get('batch_stats', state.batch_stats), opt_state=opt_state)
    valid = batch['label'] != ignore_index
    correct = (jnp.argmax(logits, -1) == batch['label']) & valid
    stats = {**terms, 'grad_norm': optax.tree.norm(grads),
             'pixel_accuracy': correct.sum() / jnp.maximum(valid.sum(), 1)}
    return new_state, stats


def predict_step(state: TrainState, images: jax.Array, *, model: nn.Module) -> jax.Array:
    """Class index per pixel, [B,H,W] int32."""
    logits = main_logits(model.apply(_variables(state), images, train=False))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, num_classes: int,
              ignore_index: int = 255) -> jax.Array:
    """The batch's [C, C] confusion matrix; padded examples (valid False) count nowhere."""
    pred = predict_step(state, batch['image'], model=model)
    label = jnp.where(batch['valid'][:, None, None], batch['label'], ignore_index)
    return metrics.confusion_matrix(pred, label, num_classes, ignore_index=ignore_index)
