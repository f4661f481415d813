"""The function every export format holds: uint8 RGB images in, class map and probabilities out.

    serving(images uint8 [B,H,W,3]) -> {'classes': int32 [B,H,W],
                                        'probabilities': float32 [B,H,W,C]}

Normalisation (config.data.mean/std), the network (its weights as constants), and the argmax
and softmax are all inside, so a deployed model needs no segjax code. The batch is symbolic
(`b`); the spatial size is fixed at export time, since the models resize to static shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from segjax import experiment, step

INPUT_NAME = 'image'
OUTPUT_NAMES = ('classes', 'probabilities')


class ExportError(ValueError):
    """A config, checkpoint or request that cannot be exported, with what to change."""


def first_argmax(scores: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum), int32, built from a max
    and a min reduction: TFLite cannot lower the variadic reduce that jnp.argmax becomes."""
    top = jnp.max(scores, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
    return jnp.min(jnp.where(scores == top, index, scores.shape[-1]), axis=-1)


def softmax(logits: jax.Array) -> jax.Array:
    """exp(logits - logsumexp): no division, which int8 TFLite quantizes badly (a zero divisor
    at run time) where the same graph with jax.nn.softmax's division converts but fails."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    return jnp.exp(shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)))


def network_options(config: ml_collections.ConfigDict) -> dict:
    """step.network_scores' options from config.eval; an ExportError for what export lacks."""
    if config.eval.crf.iterations > 0:
        raise ExportError(
            f'config.eval.crf.iterations={config.eval.crf.iterations}: the exported function has '
            'no dense CRF; export with --config.eval.crf.iterations=0')
    options = experiment.inference_options(config, crf=False) or {}
    if options and options['mode'] != 'whole':
        raise ExportError(
            f"config.eval.mode={options['mode']!r}: sliding-window inference needs a static "
            "batch size; export with --config.eval.mode=whole")
    return options


def model_variables(state: step.TrainState, *, ema: bool) -> dict:
    """{'params', 'batch_stats'} of the checkpoint (its EMA weights with `ema`) on the host."""
    if ema and not state.ema:
        raise ExportError('--ema: this checkpoint holds no EMA weights (trained with '
                          'config.ema_decay=0, or restored without --config.ema_decay as '
                          'trained); drop --ema or pass the config.ema_decay it was trained with')
    chosen = step.ema_view(state) if ema else state
    return jax.device_get({'params': chosen.params, 'batch_stats': chosen.batch_stats})


def serving_function(model, variables: dict, *, mean, std,
                     options: dict | None = None) -> Callable[[jax.Array], dict]:
    """images uint8 [B,H,W,3] -> {'classes', 'probabilities'}, `variables` as constants.

    The classes are step.predict_step's on images normalised as segjax.predict does;
    `options` are step.network_scores' (network_options: multi-scale and flip, or none).
    """
    options = dict(options or {})
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    # Only the weights: no optimizer state or EMA copy is closed over.
    state = step.TrainState(step=0, params=variables['params'],
                            batch_stats=variables['batch_stats'], opt_state={}, ema={},
                            nonfinite_run=0, skipped_steps=0)

    def serving(images: jax.Array) -> dict:
        normalised = (images.astype(jnp.float32) - mean) / std
        scores = step.network_scores(state, normalised, model=model, options=options)
        # Test-time augmentation returns probabilities already; one pass returns logits.
        probabilities = scores if options else softmax(scores)
        return {'classes': first_argmax(scores), 'probabilities': probabilities}

    return serving


def input_spec(height: int, width: int, size_multiple: int | None = None
               ) -> jax.ShapeDtypeStruct:
    """uint8 [b, height, width, 3] with a symbolic batch `b`; with `size_multiple` m, the
    spatial size symbolic too: [b, m*h, m*w, 3] (any multiple of m; `height`, `width` unused).
    m is what the model's shape arithmetic needs to be provable for every size (a U-Net of
    depth d pads to multiples of 2**d and concatenates: m = 2**d; DeepLabV3+: m = 1)."""
    if size_multiple is None:
        (batch,) = jax.export.symbolic_shape('b')
        return jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
    batch, rows, columns = jax.export.symbolic_shape(f'b, {size_multiple}*h, {size_multiple}*w')
    return jax.ShapeDtypeStruct((batch, rows, columns, 3), jnp.uint8)


def output_shapes(height: int, width: int, num_classes: int) -> dict:
    """The JSON spec of the outputs (None: the symbolic batch)."""
    return {'classes': {'dtype': 'int32', 'shape': [None, height, width]},
            'probabilities': {'dtype': 'float32', 'shape': [None, height, width, num_classes]}}
