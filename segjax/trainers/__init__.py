"""Kinds of training the one train loop (`segjax.train`) runs, named by `config.trainer.fn`.

A trainer function takes what segjax supplies (keyword arguments: the model, its optimizer `tx`,
the configured loss, the data's `num_classes`, `ignore_index` and crop `image_shape`, and
`grad_accum_steps`, `ema_decay`) plus its own options from `config.trainer`, and returns a
`Trainer`: how the train state is created and the pure step that advances it. The loop jits,
shards, checkpoints, logs and evaluates every trainer alike; evaluation and prediction use the
state's `params` and `batch_stats` (the segmentation network) only.

  supervised                 the default: `segjax.step.train_step` on labelled batches
  adversarial.trainer        Luc et al. 2016: a discriminator tells (image, label map) pairs apart
  semisupervised.trainer     Hung et al. 2018: a pixel-wise discriminator's confidence on
                             unlabelled images drives an adversarial and a self-training loss
  distillation.trainer       Hinton et al. 2015 / Liu et al. 2019: a frozen teacher's softened
                             per-pixel distribution (and pairwise similarities) next to labels
  instance.trainer           He et al. 2017: Mask R-CNN's own losses on instance annotations,
                             evaluated by COCO box / mask AP (its own batches and evaluation)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import optax

from segjax import step


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a kind of training gives the loop: both pure, both jitted by the loop."""

    init: Callable  # rng -> step.TrainState (params/batch_stats: the segmentation network)
    step: Callable  # (state, batch, rng) -> (state, stats); stats hold at least 'loss'
    # The batches also carry 'unlabelled_image' [B, H, W, 3] from the train split's images
    # outside config.data.labelled_fraction (their labels are never read).
    unlabelled_images: bool = False
    # mesh -> arrays the step reads but never changes (a distillation teacher's weights): the
    # loop calls it once and passes its result to every step as a 4th argument, so it is never
    # checkpointed nor compiled into the step as constants. None: the step takes 3 arguments.
    load_frozen: Callable | None = None
    # (config, builder, *, local_batch_size, start_step) -> this process's train batches from
    # batch start_step on, for a trainer with its own data layout (instance annotations).
    # None: segjax.experiment.train_batches ({'image', 'label'}).
    train_batches: Callable | None = None
    # (state, builder, config, mesh) -> {name: float} dataset-level metrics of the eval split
    # (COCO AP for instance segmentation), for train and evaluate. None: the confusion matrix.
    evaluate: Callable | None = None


def supervised(*, model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
               num_classes: int, ignore_index: int, image_shape: tuple[int, ...],
               grad_accum_steps: int = 1, ema_decay: float = 0.0) -> Trainer:
    """Supervised training: the configured loss on labelled batches (`step.train_step`)."""
    del num_classes  # the model's own; supervised training needs nothing more
    return Trainer(
        init=functools.partial(step.create_state, model, tx, image_shape=image_shape,
                               ema=ema_decay > 0),
        step=functools.partial(step.train_step, model=model, tx=tx, loss_fn=loss_fn,
                               ignore_index=ignore_index, grad_accum_steps=grad_accum_steps,
                               ema_decay=ema_decay))
