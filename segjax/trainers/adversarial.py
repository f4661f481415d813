"""Adversarial training (Luc, Couprie, Chintala & Verbeek 2016, "Semantic Segmentation using
Adversarial Networks"): the segmentation network is the generator; a discriminator tells
(image, ground-truth one-hot map) pairs from (image, predicted softmax map) pairs, and the
segmentation network's loss is its supervised loss plus `adversarial_weight` x the generator
loss of fooling the discriminator.

Both networks step together in one jitted step (the discriminator on the segmentation
network's pre-update predictions); the discriminator's parameters, BatchNorm statistics and
Adam state live in `TrainState.discriminator` and are checkpointed with the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax import config as config_lib
from segjax import step
from segjax.losses import adversarial as adversarial_losses
from segjax.models.discriminator import ImageLabelDiscriminator
from segjax.trainers import Trainer


def discriminator_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam with beta2 0.99 at a constant rate: Hung et al.'s discriminator optimizer."""
    return optax.adam(lr, b1=0.9, b2=0.99)


def init_discriminator(discriminator: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, *inputs) -> dict:
    """A discriminator's sub-state {'params', 'batch_stats', 'opt_state'} for `inputs`' shapes."""
    variables = discriminator.init(rng, *inputs, train=False)
    params = variables['params']
    return {'params': params, 'batch_stats': variables.get('batch_stats', {}),
            'opt_state': tx.init(params)}


def init_with_discriminator(rng: jax.Array, *, model: nn.Module,
                            tx: optax.GradientTransformation, image_shape: tuple[int, ...],
                            ema_decay: float, discriminator: nn.Module,
                            discriminator_tx: optax.GradientTransformation,
                            discriminator_inputs: Callable) -> step.TrainState:
    """step.create_state's state with the discriminator's sub-state filled in;
    `discriminator_inputs(image_shape)` gives zero inputs of the shapes it takes."""
    model_rng, discriminator_rng = jax.random.split(rng)
    state = step.create_state(model, tx, model_rng, image_shape, ema=ema_decay > 0)
    return state.replace(discriminator=init_discriminator(
        discriminator, discriminator_tx, discriminator_rng,
        *discriminator_inputs(image_shape)))


def apply_discriminator(discriminator: nn.Module, sub_state: dict, *inputs, train: bool):
    """(logits, new BatchNorm statistics); in training mode the statistics are updated."""
    variables = {'params': sub_state['params'], 'batch_stats': sub_state['batch_stats']}
    if not train or not sub_state['batch_stats']:
        return discriminator.apply(variables, *inputs, train=train), sub_state['batch_stats']
    logits, updates = discriminator.apply(variables, *inputs, train=True,
                                          mutable=['batch_stats'])
    return logits, updates['batch_stats']


def real_label_maps(labels: jax.Array, fake: jax.Array, ignore_index: int) -> jax.Array:
    """One-hot [B,H,W,C] ground truth; at ignored pixels the (gradient-free) prediction, so
    that the discriminator cannot tell real from fake by where the labels are missing."""
    num_classes = fake.shape[-1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=jnp.float32)
    return jnp.where(valid[..., None], one_hot, jax.lax.stop_gradient(fake))


def discriminator_step(discriminator: nn.Module, sub_state: dict,
                       tx: optax.GradientTransformation, loss: adversarial_losses.AdversarialLoss,
                       real_inputs: tuple, fake_inputs: tuple, *, mask_real=None,
                       mask_fake=None) -> tuple[dict, dict]:
    """(new sub-state, stats): one update of the discriminator on real and fake inputs, run as
    one batch (so BatchNorm, if any, sees both). Stats: its loss, the gradient norm, and its
    accuracy on real (logit > 0) and fake (logit < 0) examples."""
    num_real = real_inputs[0].shape[0]

    def objective(params):
        both = [jnp.concatenate([r, f]) for r, f in zip(real_inputs, fake_inputs, strict=True)]
        logits, batch_stats = apply_discriminator(
            discriminator, {**sub_state, 'params': params}, *both, train=True)
        logits = logits.astype(jnp.float32)
        real_logits, fake_logits = logits[:num_real], logits[num_real:]
        value = loss.discriminator(real_logits, fake_logits, mask_real=mask_real,
                                   mask_fake=mask_fake)
        return value, (real_logits, fake_logits, batch_stats)

    (value, (real_logits, fake_logits, batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(sub_state['params'])
    updates, opt_state = tx.update(grads, sub_state['opt_state'], sub_state['params'])
    new = {'params': optax.apply_updates(sub_state['params'], updates),
           'batch_stats': batch_stats, 'opt_state': opt_state}
    stats = {'loss/discriminator': value, 'discriminator/grad_norm': optax.tree.norm(grads),
             'discriminator/real_accuracy': _mean(real_logits > 0, mask_real),
             'discriminator/fake_accuracy': _mean(fake_logits < 0, mask_fake)}
    return new, stats


def _mean(values: jax.Array, mask) -> jax.Array:
    weights = jnp.ones(values.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def pixel_accuracy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
    correct, valid = step.pixel_counts(logits, labels, ignore_index)
    return correct / jnp.maximum(valid, 1)


def finish_step(state: step.TrainState, grads, batch_stats, discriminator_state: dict,
                stats: dict, *, tx: optax.GradientTransformation,
                ema_decay: float) -> tuple[step.TrainState, dict]:
    """Applies both networks' updates where every loss and gradient is finite (else skips the
    step for both, as step.train_step does) and completes the logged stats."""
    finite = (jnp.isfinite(stats['loss']) & jnp.isfinite(stats['loss/discriminator'])
              & step.all_finite(grads) & step.all_finite(discriminator_state['params']))
    new_state = step.apply_gradients(state, grads, batch_stats, finite, tx=tx,
                                     ema_decay=ema_decay, discriminator=discriminator_state)
    stats = {**stats, 'grad_norm': optax.tree.norm(grads),
             'pixel_accuracy': jnp.where(finite, stats['pixel_accuracy'], jnp.nan),
             'skipped_steps': new_state.skipped_steps, 'nonfinite_run': new_state.nonfinite_run}
    return new_state, stats


def check_no_accumulation(grad_accum_steps: int, name: str) -> None:
    if grad_accum_steps != 1:
        raise config_lib.ConfigError(
            f'config.grad_accum_steps={grad_accum_steps}: {name} does not accumulate '
            'gradients over micro-batches (its step takes the whole batch); use 1')


def train_step(state: step.TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_fn: Callable, ignore_index: int,
               ema_decay: float, discriminator: nn.Module,
               discriminator_tx: optax.GradientTransformation,
               adversarial_loss: adversarial_losses.AdversarialLoss,
               adversarial_weight: float) -> tuple[step.TrainState, dict]:
    """One step of both networks on a labelled batch {'image', 'label'}."""
    rng = jax.random.fold_in(rng, state.step)
    images, labels = batch['image'], batch['label']

    def objective(params):
        outputs, updates = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
            mutable=['batch_stats'], rngs={'dropout': rng})
        terms = step.loss_terms(loss_fn(outputs, labels))
        logits = step.main_logits(outputs)
        fake = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        fake_logits, _ = apply_discriminator(discriminator, state.discriminator, images, fake,
                                             train=False)
        adversarial = adversarial_loss.generator(fake_logits.astype(jnp.float32))
        total = terms['loss'] + adversarial_weight * adversarial
        return total, (terms, adversarial, logits, fake, updates.get('batch_stats', {}))

    (total, (terms, adversarial, logits, fake, batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    fake = jax.lax.stop_gradient(fake)
    real = real_label_maps(labels, fake, ignore_index)
    discriminator_state, discriminator_stats = discriminator_step(
        discriminator, state.discriminator, discriminator_tx, adversarial_loss,
        (images, real), (images, fake))
    stats = {**{k: v for k, v in terms.items() if k != 'loss'},
             'loss': total, 'loss/supervised': terms['loss'], 'loss/adversarial': adversarial,
             **discriminator_stats, 'pixel_accuracy': pixel_accuracy(logits, labels, ignore_index)}
    return finish_step(state, grads, batch_stats, discriminator_state, stats, tx=tx,
                       ema_decay=ema_decay)


def trainer(*, model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
            num_classes: int, ignore_index: int, image_shape: tuple[int, ...],
            grad_accum_steps: int = 1, ema_decay: float = 0.0,
            discriminator: Callable[..., nn.Module] = ImageLabelDiscriminator,
            discriminator_features: int = 64, discriminator_lr: float = 1e-4,
            adversarial_loss: adversarial_losses.AdversarialLoss = adversarial_losses.bce_gan,
            adversarial_weight: float = 0.1) -> Trainer:
    """Luc et al.'s adversarial training, for `config.trainer.fn`.

    discriminator: a module class taking (images, label maps) -> one logit per image, built
      with `features=discriminator_features`; trained with Adam(discriminator_lr, 0.9, 0.99).
    adversarial_loss: a losses.adversarial pair (bce_gan, hinge_gan or least_squares_gan).
    adversarial_weight: lambda, the generator loss's weight next to the supervised loss.
    """
    check_no_accumulation(grad_accum_steps, 'segjax.trainers.adversarial')
    module = discriminator(features=discriminator_features)
    discriminator_tx = discriminator_optimizer(discriminator_lr)

    def zero_inputs(shape):
        return (jnp.zeros(shape, jnp.float32), jnp.zeros((*shape[:-1], num_classes),
                                                         jnp.float32))

    return Trainer(
        init=functools.partial(init_with_discriminator, model=model, tx=tx,
                               image_shape=image_shape, ema_decay=ema_decay,
                               discriminator=module, discriminator_tx=discriminator_tx,
                               discriminator_inputs=zero_inputs),
        step=functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                               ignore_index=ignore_index, ema_decay=ema_decay,
                               discriminator=module, discriminator_tx=discriminator_tx,
                               adversarial_loss=adversarial_loss,
                               adversarial_weight=adversarial_weight))
