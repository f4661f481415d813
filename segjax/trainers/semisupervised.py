"""Semi-supervised adversarial learning (Hung, Tsai, Liou, Lin & Yang 2018, "Adversarial
Learning for Semi-Supervised Semantic Segmentation").

A fully-convolutional discriminator maps class-probability maps to a per-pixel confidence
(logit) of being ground truth. Each step sees a labelled batch {'image', 'label'} and as many
unlabelled images ('unlabelled_image', from the train split outside
config.data.labelled_fraction; their labels are never loaded). The segmentation network's loss:

  supervised loss(labelled)
  + adversarial_weight            x generator loss(D(S(labelled)), ignored pixels masked)
  + unlabelled_adversarial_weight x generator loss(D(S(unlabelled)))
  + self_training_weight          x cross-entropy of S(unlabelled) against its own argmax on
                                    pixels whose confidence sigmoid(D) > confidence_threshold,
                                    from step `self_training_start` on

The discriminator learns one-hot ground truth (valid pixels) as real and both batches'
predictions as fake (AdvSemiSeg's D_remain). Both networks update in one jitted step. The
labelled and unlabelled images go through the segmentation network as one batch, so BatchNorm
normalises over both (the paper ran two passes through a network with frozen BatchNorm).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax import step
from segjax.losses import adversarial as adversarial_losses
from segjax.models.discriminator import PixelDiscriminator
from segjax.trainers import Trainer
from segjax.trainers.adversarial import (
    apply_discriminator,
    check_no_accumulation,
    discriminator_optimizer,
    discriminator_step,
    finish_step,
    init_with_discriminator,
    pixel_accuracy,
    real_label_maps,
)


def train_step(state: step.TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_fn: Callable, ignore_index: int,
               ema_decay: float, discriminator: nn.Module,
               discriminator_tx: optax.GradientTransformation,
               adversarial_loss: adversarial_losses.AdversarialLoss,
               adversarial_weight: float, unlabelled_adversarial_weight: float,
               self_training_weight: float, confidence_threshold: float,
               self_training_start: int) -> tuple[step.TrainState, dict]:
    """One step of both networks on {'image', 'label', 'unlabelled_image'}."""
    rng = jax.random.fold_in(rng, state.step)
    labels = batch['label']
    num_labelled = labels.shape[0]
    images = jnp.concatenate([batch['image'], batch['unlabelled_image']])
    valid = labels != ignore_index
    # Self-training starts once the discriminator's confidence means something.
    self_training_on = (state.step >= self_training_start).astype(jnp.float32)

    def objective(params):
        outputs, updates = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
            mutable=['batch_stats'], rngs={'dropout': rng})
        labelled = jax.tree.map(lambda x: x[:num_labelled], outputs)
        terms = step.loss_terms(loss_fn(labelled, labels))
        logits = step.main_logits(outputs).astype(jnp.float32)
        probabilities = jax.nn.softmax(logits, axis=-1)
        confidence, _ = apply_discriminator(discriminator, state.discriminator, probabilities,
                                            train=False)
        confidence = confidence.astype(jnp.float32)
        labelled_confidence = confidence[:num_labelled]
        unlabelled_confidence = confidence[num_labelled:]
        adversarial = adversarial_loss.generator(labelled_confidence, mask=valid)
        unlabelled_adversarial = adversarial_loss.generator(unlabelled_confidence)
        self_training = adversarial_losses.self_training_cross_entropy(
            logits[num_labelled:], jax.lax.stop_gradient(unlabelled_confidence),
            threshold=confidence_threshold)
        total = (terms['loss'] + adversarial_weight * adversarial
                 + unlabelled_adversarial_weight * unlabelled_adversarial
                 + self_training_on * self_training_weight * self_training)
        confident = jnp.mean(jax.nn.sigmoid(unlabelled_confidence) > confidence_threshold)
        parts = {'loss/supervised': terms['loss'], 'loss/adversarial': adversarial,
                 'loss/unlabelled_adversarial': unlabelled_adversarial,
                 'loss/self_training': self_training, 'self_training/confident_pixels': confident}
        return total, (terms, parts, logits, probabilities, updates.get('batch_stats', {}))

    (total, (terms, parts, logits, probabilities, batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    fake = jax.lax.stop_gradient(probabilities)
    real = real_label_maps(labels, fake[:num_labelled], ignore_index)
    num_unlabelled = images.shape[0] - num_labelled
    fake_mask = jnp.concatenate([valid, jnp.ones((num_unlabelled, *valid.shape[1:]), bool)])
    discriminator_state, discriminator_stats = discriminator_step(
        discriminator, state.discriminator, discriminator_tx, adversarial_loss,
        (real,), (fake,), mask_real=valid, mask_fake=fake_mask)
    stats = {**{k: v for k, v in terms.items() if k != 'loss'}, **parts, 'loss': total,
             **discriminator_stats,
             'pixel_accuracy': pixel_accuracy(logits[:num_labelled], labels, ignore_index)}
    return finish_step(state, grads, batch_stats, discriminator_state, stats, tx=tx,
                       ema_decay=ema_decay)


def trainer(*, model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
            num_classes: int, ignore_index: int, image_shape: tuple[int, ...],
            grad_accum_steps: int = 1, ema_decay: float = 0.0,
            discriminator: Callable[..., nn.Module] = PixelDiscriminator,
            discriminator_features: int = 64, discriminator_lr: float = 1e-4,
            adversarial_loss: adversarial_losses.AdversarialLoss = adversarial_losses.bce_gan,
            adversarial_weight: float = 0.01, unlabelled_adversarial_weight: float = 0.001,
            self_training_weight: float = 0.1, confidence_threshold: float = 0.2,
            self_training_start: int = 5000) -> Trainer:
    """Hung et al.'s semi-supervised training, for `config.trainer.fn`; the defaults are the
    paper's (lambda_adv 0.01, lambda_semi_adv 0.001, lambda_semi 0.1, T_semi 0.2, self-training
    from iteration 5000, discriminator Adam 1e-4). The labelled share of the train split is
    config.data.labelled_fraction.

    discriminator: a module class taking probability maps [B,H,W,C] -> logits [B,H,W], built
      with `features=discriminator_features`.
    """
    check_no_accumulation(grad_accum_steps, 'segjax.trainers.semisupervised')
    module = discriminator(features=discriminator_features)
    discriminator_tx = discriminator_optimizer(discriminator_lr)

    def zero_inputs(shape):
        return (jnp.zeros((*shape[:-1], num_classes), jnp.float32),)

    return Trainer(
        init=functools.partial(init_with_discriminator, model=model, tx=tx,
                               image_shape=image_shape, ema_decay=ema_decay,
                               discriminator=module, discriminator_tx=discriminator_tx,
                               discriminator_inputs=zero_inputs),
        step=functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                               ignore_index=ignore_index, ema_decay=ema_decay,
                               discriminator=module, discriminator_tx=discriminator_tx,
                               adversarial_loss=adversarial_loss,
                               adversarial_weight=adversarial_weight,
                               unlabelled_adversarial_weight=unlabelled_adversarial_weight,
                               self_training_weight=self_training_weight,
                               confidence_threshold=confidence_threshold,
                               self_training_start=self_training_start),
        unlabelled_images=True)
