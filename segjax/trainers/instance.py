"""Instance segmentation: Mask R-CNN (He et al. 2017) trained as torchvision's reference does.

The model (`segjax.instance.maskrcnn.MaskRCNN`, config.model.fn) computes its own five losses
(`maskrcnn.train_losses`: RPN objectness and box regression, RoI classification and box
regression, mask BCE); the step differentiates their sum. What else differs from semantic
training, and where this trainer puts it:

  state       a step.TrainState (params + batch_stats), so checkpoints, resume and FSDP work
              unchanged; batch_stats are FrozenBatchNorm statistics and never change
  optimizer   config.optimizer's, updating only what torchvision trains: the FPN, the heads
              and the last `trainable_backbone_layers` ResNet stages, never a BatchNorm
              (fpn.trainable_mask); the frozen rest gets no update and no weight decay
  rng         fold_in(rng, step) draws the RPN and RoI samples
  data        `train_batches`: instance examples resized (min_size / max_size, aspect kept),
              flipped, padded to config.data.crop_size and `max_instances` rows with 'valid'
              (instance_transforms.instance_train_transform); the loop asks for them
  evaluation  `evaluate`: COCO box and mask AP through pycocotools over config.data.eval_split
              (segjax.instance.evaluation), for the loop and segjax.evaluate

    config.model.fn = maskrcnn.MaskRCNN           # config.loss.fn stays None
    config.trainer.fn = segjax.trainers.instance.trainer
    config.trainer.min_size, config.trainer.max_size = 800, 1333
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax import config as config_lib
from segjax import step
from segjax.data import instance_transforms
from segjax.instance import evaluation, fpn, maskrcnn
from segjax.trainers import Trainer
from segjax.trainers.adversarial import check_no_accumulation

WHERE = 'config.trainer'
TARGET_KEYS = ('boxes', 'labels', 'masks', 'valid')


def create_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
                 image_shape: tuple[int, ...], ema: bool) -> step.TrainState:
    """Mask R-CNN's parameters and (frozen) BatchNorm statistics from an eval-mode init."""
    variables = model.init({'params': rng, 'sampling': rng}, jnp.zeros(image_shape, jnp.float32))
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    zero = jnp.zeros((), jnp.int32)
    return step.TrainState(step=zero, params=params, batch_stats=batch_stats,
                           opt_state=tx.init(params),
                           ema={'params': params, 'batch_stats': batch_stats} if ema else {},
                           nonfinite_run=zero, skipped_steps=zero)


def trainable_labels(params, *, trainable_backbone_layers: int):
    """'trainable' / 'frozen' per parameter, as torchvision's requires_grad (fpn.trainable_mask)."""
    mask = fpn.trainable_mask(params, trainable_backbone_layers)
    return jax.tree.map(lambda trained: 'trainable' if trained else 'frozen', mask)


def masked_optimizer(tx: optax.GradientTransformation, *,
                     trainable_backbone_layers: int) -> optax.GradientTransformation:
    """`tx` on the trainable parameters; the frozen ones get a zero update (no weight decay, no
    optimizer state)."""
    return optax.multi_transform(
        {'trainable': tx, 'frozen': optax.set_to_zero()},
        functools.partial(trainable_labels, trainable_backbone_layers=trainable_backbone_layers))


def train_step(state: step.TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, ema_decay: float,
               trainable_backbone_layers: int) -> tuple[step.TrainState, dict]:
    """One step on an instance batch {'image', 'image_size', 'boxes', 'labels', 'masks',
    'valid'}: the gradient of the sum of Mask R-CNN's five losses."""
    rng = jax.random.fold_in(rng, state.step)
    targets = {key: batch[key] for key in TARGET_KEYS}

    def objective(params):
        terms = maskrcnn.train_losses(model, {'params': params, 'batch_stats': state.batch_stats},
                                      batch['image'], batch['image_size'], targets, rng)
        return sum(terms.values()), terms

    (total, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    # Frozen parameters' gradients are never used: zero, so they neither count in the norm nor
    # make a step non-finite (and XLA drops their backward pass).
    trained = fpn.trainable_mask(state.params, trainable_backbone_layers)
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trained)
    finite = jnp.isfinite(total) & step.all_finite(grads)
    new_state = step.apply_gradients(state, grads, state.batch_stats, finite, tx=tx,
                                     ema_decay=ema_decay)
    stats = {'loss': total, **{f'loss/{k.removeprefix("loss_")}': v for k, v in terms.items()},
             'grad_norm': optax.tree.norm(grads), 'skipped_steps': new_state.skipped_steps,
             'nonfinite_run': new_state.nonfinite_run}
    return new_state, stats


def instance_train_batches(builder, *, split: str, local_batch_size: int, seed: int,
                           start_step: int = 0, process_index: int = 0, process_count: int = 1,
                           shuffle_buffer: int = 1000, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                           **transform_options) -> Iterator[dict]:
    """Infinite batches of this host's slice of `split`, from batch `start_step` on: the same
    arguments give the same batches (a seeded shuffle of the fixed read order; each example's
    flip is seeded by (seed, process_index, its position in the stream)). transform_options:
    those of `instance_transforms.instance_train_transform` but the seed."""
    host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                            process_count=process_count, drop_remainder=True)
    num_examples = builder.info.splits[host_split].num_examples
    ds = builder.as_dataset(split=host_split, shuffle_files=False)
    # Built afresh on every call, so the seeded shuffle replays the same epoch orders.
    ds = ds.shuffle(min(num_examples, shuffle_buffer), seed=seed,
                    reshuffle_each_iteration=True).repeat()
    ds = ds.enumerate().skip(start_step * local_batch_size)
    host_seed = tf.constant([seed, process_index], tf.int64)

    def transform(index: tf.Tensor, example: dict) -> dict:
        key = tf.random.experimental.stateless_fold_in(host_seed, index)
        example = instance_transforms.instance_train_transform(example, key, **transform_options)
        return {**example, 'image': evaluation.normalise(example['image'], mean, std)}

    options = tf.data.Options()
    options.deterministic = True
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(options).as_numpy_iterator()


def batches_for_config(config: ml_collections.ConfigDict, builder, *, local_batch_size: int,
                       start_step: int, min_size: int, max_size: int, max_instances: int,
                       shuffle_buffer: int) -> Iterator[dict]:
    """The loop's hook: `instance_train_batches` from the config's data section."""
    data = config.data
    height, width = (int(s) for s in data.crop_size)
    return instance_train_batches(
        builder, split=data.train_split, local_batch_size=local_batch_size, seed=config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), shuffle_buffer=shuffle_buffer,
        mean=tuple(data.mean), std=tuple(data.std), num_classes=data.num_classes,
        min_size=min_size, max_size=max_size, height=height, width=width,
        max_instances=max_instances, flip=data.flip)


def trainer(*, model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable | None,
            num_classes: int, ignore_index: int, image_shape: tuple[int, ...],
            grad_accum_steps: int = 1, ema_decay: float = 0.0, min_size: int = 800,
            max_size: int = 1333, max_instances: int = 100, trainable_backbone_layers: int = 3,
            shuffle_buffer: int = 1000) -> Trainer:
    """Mask R-CNN training, for `config.trainer.fn` (module docstring).

    min_size / max_size: images resized so the short side is min_size unless the long side
      would pass max_size (torchvision's GeneralizedRCNNTransform; 800 / 1333 on COCO), in
      training and evaluation; config.data.crop_size is the canvas they are padded to.
    max_instances: instance rows per image (more is an error naming this option).
    trainable_backbone_layers: ResNet stages trained, from layer4 down (torchvision: 3).
    shuffle_buffer: decoded examples the training shuffle holds.
    """
    del ignore_index  # no ignored pixels: padding instances carry valid=False
    check_no_accumulation(grad_accum_steps, 'segjax.trainers.instance')
    if not isinstance(model, maskrcnn.MaskRCNN):
        raise config_lib.ConfigError(
            f'config.model.fn makes a {type(model).__name__}; segjax.trainers.instance trains '
            'a segjax.instance.maskrcnn.MaskRCNN')
    if loss_fn is not None:
        raise config_lib.ConfigError(
            'config.loss.fn is set, and Mask R-CNN computes its own losses '
            '(maskrcnn.train_losses): leave config.loss.fn None')
    if model.num_classes != num_classes:  # make_model passes config.data.num_classes
        raise config_lib.ConfigError(f'the model predicts {model.num_classes} classes, '
                                     f'config.data.num_classes is {num_classes}')
    if not 0 <= trainable_backbone_layers <= 5:
        raise config_lib.ConfigError(f'{WHERE}.trainable_backbone_layers='
                                     f'{trainable_backbone_layers!r}: expected 0..5')
    if not 0 < min_size <= max_size:
        raise config_lib.ConfigError(f'{WHERE}.min_size={min_size!r}, max_size={max_size!r}: '
                                     'expected 0 < min_size <= max_size')
    if any(s % 32 for s in image_shape[1:3]):
        raise config_lib.ConfigError(f'config.data.crop_size={tuple(image_shape[1:3])}: Mask '
                                     'R-CNN needs a canvas of multiples of 32')
    tx = masked_optimizer(tx, trainable_backbone_layers=trainable_backbone_layers)
    detect_fn = jax.jit(functools.partial(evaluation.detect, model=model))
    return Trainer(
        init=functools.partial(create_state, model=model, tx=tx, image_shape=image_shape,
                               ema=ema_decay > 0),
        step=functools.partial(train_step, model=model, tx=tx, ema_decay=ema_decay,
                               trainable_backbone_layers=trainable_backbone_layers),
        train_batches=functools.partial(batches_for_config, min_size=min_size,
                                        max_size=max_size, max_instances=max_instances,
                                        shuffle_buffer=shuffle_buffer),
        evaluate=functools.partial(evaluation.coco_metrics_over_split, detect_fn=detect_fn,
                                   min_size=min_size, max_size=max_size))
