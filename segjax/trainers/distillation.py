"""Knowledge distillation: a student network learns from the labels and from a trained,
frozen teacher (Hinton, Vinyals & Dean 2015; Liu et al. 2019, "Structured Knowledge
Distillation for Semantic Segmentation"). The student's loss:

  configured loss(student outputs, labels)
  + kd_weight       x losses.pixelwise_kd(student logits, teacher logits, labels, T)
  + pairwise_weight x losses.pairwise_similarity_kd(student logits, teacher logits, labels)

The teacher is another experiment's trained workdir: its config file (`teacher_config`, with
`teacher_overrides`, the --config overrides it was trained with) and its checkpoint
(`teacher_workdir`, latest or `teacher_step`), read by segjax's own restore path
(experiment.restore_state) with its EMA weights where it kept them. It runs in eval mode
(train=False: BatchNorm's running statistics, no dropout) on the student's batch, and no
gradient reaches it.

Where the teacher lives: not in the TrainState (every checkpoint would hold a copy) and not
closed over by the step (jit would compile its weights into the program as constants). The
Trainer's `load_frozen` loads it once when training starts and the loop passes it to every step
as an argument; a checkpoint holds the student only, and resuming reloads the same teacher
checkpoint, so a resumed run equals an uninterrupted one. Evaluation and prediction of the
student never read the teacher's checkpoint (the teacher's config file must still load).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import config as config_lib
from segjax import experiment, step
from segjax.losses import distillation as distillation_losses
from segjax.trainers import Trainer
from segjax.trainers.adversarial import check_no_accumulation, pixel_accuracy

WHERE = 'config.trainer'


def load_teacher_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The teacher's experiment config, as it was trained (its file plus `overrides`)."""
    if not isinstance(path, str) or not path:
        raise config_lib.ConfigError(
            f'{WHERE}.teacher_config={path!r}: expected the path of the teacher\'s experiment '
            'file, e.g. experiments/unet_synthetic.py')
    try:
        return config_lib.load(path, tuple(overrides))
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f'{WHERE}.teacher_config: {e}') from None


def check_teacher(teacher_config: ml_collections.ConfigDict, *, num_classes: int,
                  image_mean: Sequence[float], image_std: Sequence[float]) -> None:
    """ConfigError unless the teacher predicts the student's classes from images normalised
    the student's way (its logits would otherwise be about other inputs or other classes)."""
    if teacher_config.data.num_classes != num_classes:
        raise config_lib.ConfigError(
            f'{WHERE}.teacher_config: the teacher predicts {teacher_config.data.num_classes} '
            f'classes (its config.data.num_classes), the student {num_classes}; distillation '
            'needs the same classes')
    for key, student in (('mean', image_mean), ('std', image_std)):
        teacher = tuple(float(v) for v in teacher_config.data[key])
        if student is None:
            raise config_lib.ConfigError(
                f'{WHERE}.image_{key} is not set: link it to the student\'s normalisation, '
                f"config.trainer.image_{key} = config.data.get_ref('{key}'), so the teacher's "
                f'can be checked against it')
        if tuple(float(v) for v in student) != teacher:
            raise config_lib.ConfigError(
                f'{WHERE}.teacher_config: the teacher was trained on images normalised with '
                f'config.data.{key}={teacher}, the student\'s are normalised with {tuple(student)}'
                f' ({WHERE}.image_{key}); set config.data.{key} to the teacher\'s')


def load_teacher_variables(teacher_config: ml_collections.ConfigDict, workdir: str,
                           step_number: int | None, mesh) -> dict:
    """The teacher's {'params', 'batch_stats'} from its checkpoint (the EMA weights where it
    kept them), on `mesh` with the teacher config's shardings."""
    try:
        _, state = experiment.restore_state(teacher_config, workdir, mesh, step_number)
    except FileNotFoundError as e:
        raise config_lib.ConfigError(
            f'{WHERE}.teacher_workdir={workdir!r} holds no usable teacher checkpoint ({e}); '
            'train the teacher first: python -m segjax.train --config <teacher_config> '
            f'--workdir {workdir}') from None
    if state.ema:  # the weights the teacher's own evaluation reported best
        state = step.ema_view(state)
    return {'params': state.params, 'batch_stats': state.batch_stats}


def teacher_logits(teacher: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """float32 [B,H,W,C]: the teacher's main logits in eval mode, with no gradient."""
    outputs = teacher.apply(variables, images, train=False)
    return jax.lax.stop_gradient(step.main_logits(outputs).astype(jnp.float32))


def train_step(state: step.TrainState, batch: dict, rng: jax.Array,
               teacher_variables: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               loss_fn: Callable, ignore_index: int, ema_decay: float, teacher: nn.Module,
               kd_weight: float, temperature: float, pairwise_weight: float,
               pairwise_pool_size: int) -> tuple[step.TrainState, dict]:
    """One student step on a labelled batch {'image', 'label'}."""
    rng = jax.random.fold_in(rng, state.step)
    images, labels = batch['image'], batch['label']
    targets = teacher_logits(teacher, teacher_variables, images)

    def objective(params):
        outputs, updates = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
            mutable=['batch_stats'], rngs={'dropout': rng})
        terms = step.loss_terms(loss_fn(outputs, labels))
        logits = step.main_logits(outputs)
        parts = {'loss/supervised': terms['loss'],
                 'loss/pixelwise_kd': distillation_losses.pixelwise_kd(
                     logits, targets, labels, temperature=temperature,
                     ignore_index=ignore_index)}
        total = terms['loss'] + kd_weight * parts['loss/pixelwise_kd']
        if pairwise_weight:  # a static option: the (H W / pool^2)^2 pairs cost nothing when off
            parts['loss/pairwise_kd'] = distillation_losses.pairwise_similarity_kd(
                logits, targets, labels, pool_size=pairwise_pool_size,
                ignore_index=ignore_index)
            total = total + pairwise_weight * parts['loss/pairwise_kd']
        return total, (terms, parts, logits, updates.get('batch_stats', {}))

    (total, (terms, parts, logits, batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    finite = jnp.isfinite(total) & step.all_finite(grads)
    new_state = step.apply_gradients(state, grads, batch_stats, finite, tx=tx,
                                     ema_decay=ema_decay)
    # A skipped step's accuracy is NaN, as in step.train_step: its logits are not to be trusted.
    accuracy = jnp.where(finite, pixel_accuracy(logits, labels, ignore_index), jnp.nan)
    stats = {**{k: v for k, v in terms.items() if k != 'loss'}, **parts, 'loss': total,
             'grad_norm': optax.tree.norm(grads), 'pixel_accuracy': accuracy,
             'skipped_steps': new_state.skipped_steps, 'nonfinite_run': new_state.nonfinite_run}
    return new_state, stats


def trainer(*, model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
            num_classes: int, ignore_index: int, image_shape: tuple[int, ...],
            grad_accum_steps: int = 1, ema_decay: float = 0.0, teacher_config: str = '',
            teacher_workdir: str = '', teacher_step: int | None = None,
            teacher_overrides: Sequence[str] = (), image_mean: Sequence[float] | None = None,
            image_std: Sequence[float] | None = None, kd_weight: float = 1.0,
            temperature: float = 1.0, pairwise_weight: float = 0.0,
            pairwise_pool_size: int = 8) -> Trainer:
    """Distillation from a trained teacher, for `config.trainer.fn`.

    teacher_config: the teacher's experiment file; teacher_overrides: the --config overrides
      it was trained with that change its model or data (e.g. ('model.base_width=8',)).
    teacher_workdir / teacher_step: its run directory and checkpoint step (None: the latest).
    image_mean / image_std: the student's image normalisation, to check the teacher's against;
      an experiment links them, config.trainer.image_mean = config.data.get_ref('mean').
    kd_weight, temperature: the pixel-wise term's weight and softmax temperature T.
    pairwise_weight, pairwise_pool_size: the pair-wise term's weight (0: off) and node size.
    """
    check_no_accumulation(grad_accum_steps, 'segjax.trainers.distillation')
    for key, value in (('kd_weight', kd_weight), ('pairwise_weight', pairwise_weight)):
        if not value >= 0:
            raise config_lib.ConfigError(f'{WHERE}.{key}={value!r}: expected a weight >= 0')
    if not temperature > 0:
        raise config_lib.ConfigError(f'{WHERE}.temperature={temperature!r}: expected T > 0')
    teacher_cfg = load_teacher_config(teacher_config, teacher_overrides)
    check_teacher(teacher_cfg, num_classes=num_classes, image_mean=image_mean,
                  image_std=image_std)
    if not isinstance(teacher_workdir, str) or not teacher_workdir:
        raise config_lib.ConfigError(
            f'{WHERE}.teacher_workdir={teacher_workdir!r}: expected the teacher\'s run directory '
            f'(python -m segjax.train --config {teacher_config} --workdir <dir>)')
    return Trainer(
        init=functools.partial(step.create_state, model, tx, image_shape=image_shape,
                               ema=ema_decay > 0),
        step=functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                               ignore_index=ignore_index, ema_decay=ema_decay,
                               teacher=experiment.make_model(teacher_cfg), kd_weight=kd_weight,
                               temperature=temperature, pairwise_weight=pairwise_weight,
                               pairwise_pool_size=pairwise_pool_size),
        load_frozen=functools.partial(load_teacher_variables, teacher_cfg, teacher_workdir,
                                      teacher_step))
