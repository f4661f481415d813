"""The pure functions the loops jit: state creation, train_step, eval_step, predict_step.

No I/O and no globals: the model, optimizer and loss are bound with functools.partial by the
caller, and randomness comes from `fold_in(rng, step)`, so the rng never lives in the state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax import crf, inference, losses, metrics


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # batches consumed: also the data position and the rng fold-in
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any  # {'params', 'batch_stats'} moving averages of the weights, or {} when off
    nonfinite_run: jax.Array  # consecutive steps skipped for a non-finite loss or gradient
    skipped_steps: jax.Array  # all steps skipped so far
    # A second network's {'params', 'batch_stats', 'opt_state'} trained alongside (the
    # discriminator of segjax.trainers.adversarial / semisupervised), or {} when none.
    discriminator: Any = flax.struct.field(default_factory=dict)


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                 image_shape: tuple[int, ...], *, ema: bool = False) -> TrainState:
    """Initialises parameters, BatchNorm statistics and optimizer state (float32 parameters)."""
    variables = model.init({'params': rng, 'dropout': rng}, jnp.zeros(image_shape, jnp.float32),
                           train=False)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params),
                      ema={'params': params, 'batch_stats': batch_stats} if ema else {},
                      nonfinite_run=zero, skipped_steps=zero)


def ema_view(state: TrainState) -> TrainState:
    """The state with its EMA weights in place of the raw ones, for evaluation."""
    return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])


def loss_terms(output) -> dict:
    """A loss returns a scalar, or (a composite) a dict of named terms with the total at 'loss'.

    The terms are logged as train/loss/<name>; only 'loss' is differentiated.
    """
    if isinstance(output, dict):
        if 'loss' not in output:
            raise ValueError(f"a loss returning a dict must hold the total at 'loss'; got "
                             f'{sorted(output)}')
        return {('loss' if k == 'loss' else f'loss/{k}'): v for k, v in output.items()
                if k != losses.DENOMINATORS}
    return {'loss': output}


def main_logits(outputs) -> jax.Array:
    """The logits of a model's output: the array itself, or 'logits' of a dict with aux heads."""
    return outputs['logits'] if isinstance(outputs, dict) else outputs


def _variables(state: TrainState) -> dict:
    return {'params': state.params, 'batch_stats': state.batch_stats}


def _gradients(params, batch_stats, batch: dict, rng: jax.Array, shares=None, *,
               model: nn.Module, loss_fn: Callable, ignore_index: int,
               micro_batches: int = 1):
    """(loss terms, [correct, valid] pixel counts, gradients, new BatchNorm statistics).

    For micro-batch i of k (micro_batches > 1) the terms are divided by k and the gradient is
    that of `_micro_objective`, so that summing over the micro-batches gives the update.
    """

    def compute_loss(params):
        outputs, updates = model.apply(
            {'params': params, 'batch_stats': batch_stats}, batch['image'], train=True,
            mutable=['batch_stats'], rngs={'dropout': rng})
        # Models with auxiliary heads hand the loss their whole output dict.
        output = loss_fn(outputs, batch['label'])
        terms = loss_terms(output)
        objective = terms['loss']
        if micro_batches > 1:
            objective = _micro_objective(output, shares, micro_batches)
            terms = {**jax.tree.map(lambda t: t / micro_batches, terms), 'loss': objective}
        return objective, (terms, main_logits(outputs), updates)

    (_, (terms, logits, updates)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    counts = pixel_counts(logits, batch['label'], ignore_index)
    return terms, counts, grads, updates.get('batch_stats', batch_stats)


def pixel_counts(logits: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
    """[correct, valid]: pixels whose argmax is the label, and pixels not ignored."""
    valid = labels != ignore_index
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return jnp.stack([correct.sum(), valid.sum()])


def _microbatches(batch: dict, num: int) -> dict:
    """[B, ...] -> [num, B/num, ...], micro-batch i taking rows i, i+num, ... so that every
    micro-batch keeps rows on every device of the data-sharded batch."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), batch)


def _micro_objective(output, shares, micro_batches: int) -> jax.Array:
    """Micro-batch i's part of the whole batch's loss: its terms that declare a denominator D
    weighted by D_i / sum_j D_j (`shares`), the rest of its loss by 1/k.

    A declared term of the whole batch is N / D with N and D sums over the micro-batches, so it
    equals sum_i (N_i / D_i) * D_i / D; D depends on the labels only, so it has no gradient.
    """
    total = output['loss'] if isinstance(output, dict) else output
    objective = total / micro_batches
    pairs = output.get(losses.DENOMINATORS, ()) if isinstance(output, dict) else ()
    for (term, _), share in zip(pairs, shares, strict=True):
        objective = objective + term * (share - 1.0 / micro_batches)
    return objective


def _denominator_shares(micro: dict, output_shapes, loss_fn: Callable) -> tuple:
    """Each declared denominator's share per micro-batch: a [k] array D_i / sum_j D_j per term
    (1/k where the whole batch's D is 0), from the labels alone: the loss runs on zero logits
    of the model's output shapes, and XLA drops everything that does not reach D."""
    micro_batches = micro['label'].shape[0]

    def denominators(labels):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), output_shapes)
        return tuple(d for _, d in loss_fn(zeros, labels)[losses.DENOMINATORS])

    shares = []
    for per_micro in jax.vmap(denominators)(micro['label']):
        whole = jnp.sum(per_micro)
        shares.append(jnp.where(whole > 0, per_micro / jnp.where(whole > 0, whole, 1.0),
                                1.0 / micro_batches))
    return tuple(shares)


def _accumulated_gradients(params, batch_stats, batch: dict, rng: jax.Array, *,
                           model: nn.Module, loss_fn: Callable, ignore_index: int,
                           micro_batches: int):
    """`_gradients` of the whole batch summed over `micro_batches` micro-batches in a scan."""
    micro = _microbatches(batch, micro_batches)
    shares = ()
    if losses.declares_denominators(loss_fn):
        loss_fn = functools.partial(loss_fn, with_denominators=True)
        output_shapes = jax.eval_shape(
            lambda variables, images: model.apply(variables, images, train=True,
                                                  mutable=['batch_stats'],
                                                  rngs={'dropout': rng})[0],
            {'params': params, 'batch_stats': batch_stats}, micro['image'][0])
        shares = _denominator_shares(micro, output_shapes, loss_fn)
    gradients = functools.partial(_gradients, model=model, loss_fn=loss_fn,
                                  ignore_index=ignore_index, micro_batches=micro_batches)

    def accumulate(carry, inputs):
        sums, batch_stats = carry
        micro, index, micro_shares = inputs
        *values, batch_stats = gradients(params, batch_stats, micro,
                                         jax.random.fold_in(rng, index), micro_shares)
        return (jax.tree.map(jnp.add, sums, tuple(values)), batch_stats), None

    first_micro, first_shares = jax.tree.map(lambda x: x[0], (micro, shares))
    shapes = jax.eval_shape(gradients, params, batch_stats, first_micro, rng, first_shares)[:3]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (sums, batch_stats), _ = jax.lax.scan(
        accumulate, (zeros, batch_stats), (micro, jnp.arange(micro_batches), shares))
    return (*sums, batch_stats)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_fn: Callable, ignore_index: int = 255,
               grad_accum_steps: int = 1, ema_decay: float = 0.0) -> tuple[TrainState, dict]:
    """One optimizer step on a (global) batch; BatchNorm statistics are over the global batch.

    With grad_accum_steps=k the batch is split into k micro-batches (scanned, one in memory at
    a time) whose gradients are summed, each weighted so that the update is the whole batch's
    where the loss allows: a loss normalised by a label-dependent count (cross-entropy by
    class weight, valid or all pixels; focal, boundary and binary cross-entropy; each term of
    `losses.with_aux` / `losses.weighted_sum` that is one of these) declares that count D
    (`losses.declares_denominators`), and micro-batch i's term is weighted by D_i / sum_j D_j,
    which gives exactly the whole batch's loss and gradient whatever the micro-batches' pixel
    counts. What still differs from one step on the whole batch: the rest of the loss (region
    losses such as Dice and Lovasz, top-k and OHEM cross-entropy, whose selection is per
    micro-batch, and any loss that declares nothing) is averaged over the micro-batches with
    weight 1/k; BatchNorm normalises each micro-batch by its own statistics and updates its
    running averages k times; dropout draws differ. Logged: 'loss' is the whole batch's value
    so weighted, the 'loss/<name>' terms are micro-batch means. A step whose loss or gradients
    are not finite changes nothing but the step and the skip counters, and logs its pixel
    accuracy as NaN (its logits are not to be trusted).
    """
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
        terms, counts, grads, batch_stats = _gradients(
            state.params, state.batch_stats, batch, rng, model=model, loss_fn=loss_fn,
            ignore_index=ignore_index)
    else:
        terms, counts, grads, batch_stats = _accumulated_gradients(
            state.params, state.batch_stats, batch, rng, model=model, loss_fn=loss_fn,
            ignore_index=ignore_index, micro_batches=grad_accum_steps)

    finite = jnp.isfinite(terms['loss']) & all_finite(grads)
    new_state = apply_gradients(state, grads, batch_stats, finite, tx=tx, ema_decay=ema_decay)
    # A skipped step's accuracy is NaN: its logits may be NaN, and argmax of NaN is made up.
    accuracy = jnp.where(finite, counts[0] / jnp.maximum(counts[1], 1), jnp.nan)
    stats = {**terms, 'grad_norm': optax.tree.norm(grads), 'pixel_accuracy': accuracy,
             'skipped_steps': new_state.skipped_steps, 'nonfinite_run': new_state.nonfinite_run}
    return new_state, stats


def apply_gradients(state: TrainState, grads, batch_stats, finite: jax.Array, *,
                    tx: optax.GradientTransformation, ema_decay: float = 0.0,
                    discriminator=None) -> TrainState:
    """The state after one step: the update (and EMA) where `finite`, else only the step and
    the skip counters change. `discriminator`: its new sub-state, taken where `finite` too."""
    discriminator = state.discriminator if discriminator is None else discriminator

    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema_decay:
            # Bias-corrected early on (TF's num_updates rule) so the average does not lag at start.
            decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
            ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema,
                               {'params': params, 'batch_stats': batch_stats})
        return params, batch_stats, opt_state, ema, discriminator

    def skip(_):
        return (state.params, state.batch_stats, state.opt_state, state.ema,
                state.discriminator)

    # A branch, not a per-element select over every parameter and optimizer value: compiles
    # about 3x faster (DeepLabV3+) and XLA makes fewer copies of the donated state.
    params, batch_stats, opt_state, ema, discriminator = jax.lax.cond(
        finite, update, skip, None)
    return state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        ema=ema, discriminator=discriminator,
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))


def _split_crf(inference_options: dict | None) -> tuple[dict, dict | None]:
    """(inference.probabilities' options, the CRF's options or None)."""
    options = dict(inference_options or {})
    return options, options.pop('crf', None)


def network_scores(state: TrainState, images: jax.Array, *, model: nn.Module,
                   options: dict) -> jax.Array:
    """[B,H,W,C] float32: the logits of one whole-image pass (`options` empty), else the class
    probabilities of inference.probabilities(**options) (sliding window, multi-scale + flip)."""

    def apply_fn(x):
        return main_logits(model.apply(_variables(state), x, train=False))

    if not options:
        return apply_fn(images).astype(jnp.float32)
    return inference.probabilities(apply_fn, images, **options)


def crf_refined(scores: jax.Array, images: jax.Array, crf_options: dict, *,
                probabilities: bool) -> jax.Array:
    """log Q [B,H,W,C] of segjax.crf.dense_crf on `scores` (logits, or class probabilities
    whose log is the unary) and the normalised `images` mapped back to RGB 0..255 with
    crf_options' 'mean' and 'std'; its other entries are dense_crf's keyword options."""
    options = dict(crf_options)
    mean = jnp.asarray(options.pop('mean'), jnp.float32)
    std = jnp.asarray(options.pop('std'), jnp.float32)
    rgb = images.astype(jnp.float32) * std + mean
    # A probability that underflowed to 0 would make the unary -inf.
    unary = jnp.log(jnp.maximum(scores, jnp.finfo(jnp.float32).tiny)) if probabilities else scores
    return crf.dense_crf(unary, rgb, **options)


def predict_step(state: TrainState, images: jax.Array, *, model: nn.Module,
                 inference_options: dict | None = None) -> jax.Array:
    """Class index per pixel, [B,H,W] int32. `inference_options` (experiment.inference_options)
    selects whole-image or sliding-window inference and multi-scale/flip test-time
    augmentation (inference.probabilities' options), then, under 'crf', dense CRF refinement
    (crf_refined); None runs the model once on the whole image."""
    options, crf_options = _split_crf(inference_options)
    scores = network_scores(state, images, model=model, options=options)
    if crf_options is not None:
        scores = crf_refined(scores, images, crf_options, probabilities=bool(options))
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def predict_with_and_without_crf(state: TrainState, images: jax.Array, *, model: nn.Module,
                                 inference_options: dict) -> tuple[jax.Array, jax.Array]:
    """(predict_step's classes with the CRF, the same network pass's classes without it)."""
    options, crf_options = _split_crf(inference_options)
    if crf_options is None:
        raise ValueError("inference_options hold no 'crf' options (config.eval.crf.iterations "
                         'is 0)')
    scores = network_scores(state, images, model=model, options=options)
    refined = crf_refined(scores, images, crf_options, probabilities=bool(options))
    return (jnp.argmax(refined, axis=-1).astype(jnp.int32),
            jnp.argmax(scores, axis=-1).astype(jnp.int32))


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, num_classes: int,
              ignore_index: int = 255, inference_options: dict | None = None,
              boundary_dilation_ratio: float = metrics.BOUNDARY_DILATION_RATIO,
              ) -> dict[str, jax.Array]:
    """The batch's counts, each summable over batches, devices and hosts:

      'confusion_matrix'       [C, C] (metrics.confusion_matrix)
      'boundary_intersection'  [C]    (metrics.boundary_counts, band width d =
      'boundary_union'         [C]     boundary_dilation_ratio x the batch's image diagonal)

    Padded examples (valid False) count nowhere.
    """
    pred = predict_step(state, batch['image'], model=model, inference_options=inference_options)
    label = jnp.where(batch['valid'][:, None, None], batch['label'], ignore_index)
    height, width = label.shape[1:3]
    dilation = metrics.boundary_dilation(height, width, boundary_dilation_ratio)
    return {'confusion_matrix': metrics.confusion_matrix(pred, label, num_classes,
                                                         ignore_index=ignore_index),
            **metrics.boundary_counts(pred, label, num_classes, ignore_index,
                                      dilation=dilation)}
