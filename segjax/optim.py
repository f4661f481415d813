"""Optax optimizers and learning-rate schedules named by experiment configs.

Weight decay never touches biases, normalisation scales or position embeddings: only parameters
with two or more dimensions (convolution and dense kernels) are decayed, minus those whose path
names a position embedding (`no_decay`).

Parameter groups (both optimizers, as options of `config.optimizer`):

- `lr_multipliers={'decode_head': 10.0}`: a parameter whose '/'-joined path (e.g.
  'decode_head/conv_seg/kernel') contains a pattern as a substring trains at that multiple of the
  learning rate; where several patterns match, the longest wins (mmsegmentation's `custom_keys`
  rule). A pattern that matches no parameter is a ConfigError.
- `layer_decay=0.65, layer_id_fn=f`: layer-wise learning-rate decay (BEiT). `f(path) -> int | None`
  is the model's: the layer a parameter belongs to (0 = the embeddings, block i -> i + 1) or None
  above every block (head, final norm). With top = 1 + the largest id, a parameter trains at
  `layer_decay ** (top - id)` of the learning rate, None at the full rate.

Both multiply the whole update of a parameter (the optimizer's direction and its weight-decay
term, as a per-group `lr` does in PyTorch), after the schedule; they keep no state, and without
them the optimizer (and its checkpointed state) is exactly the plain one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import config as config_lib

# Substrings of parameter paths that are never decayed, when a model has them (ViT, SegFormer).
NO_DECAY_NAMES = ('pos_embed', 'position_embeddings')


def parameter_path(key_path) -> str:
    """A jax.tree_util key path as the '/'-joined names the options match, e.g.
    'backbone/layer1/conv/kernel'."""
    names = []
    for key in key_path:
        name = getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key)))
        names.append(str(name))
    return '/'.join(names)


def parameter_paths(params) -> list[str]:
    return [parameter_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def _check_patterns_match(patterns: Sequence[str], paths: Sequence[str], option: str) -> None:
    for pattern in patterns:
        if not any(pattern in path for path in paths):
            examples = ', '.join(repr(p) for p in paths[:4])
            raise config_lib.ConfigError(
                f'config.optimizer.{option}: pattern {pattern!r} matches no parameter (patterns '
                f'are substrings of the \'/\'-joined parameter paths, e.g. {examples})')


def decay_mask(params, *, no_decay: Sequence[str] = NO_DECAY_NAMES) -> object:
    """True for kernels (ndim >= 2) whose path contains none of `no_decay`; False for biases,
    norm scales/offsets and position embeddings. A `no_decay` pattern other than the built-in
    NO_DECAY_NAMES must match some parameter (else ConfigError: a typo would decay silently)."""
    _check_patterns_match([p for p in no_decay if p not in NO_DECAY_NAMES],
                          parameter_paths(params), 'no_decay')
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not any(name in parameter_path(path)
                                                 for name in no_decay), params)


def _lr_multiplier(path: str, multipliers: Mapping[str, float]) -> float:
    """The factor of the longest pattern contained in `path` (ties: alphabetical), else 1."""
    matches = sorted((p for p in multipliers if p in path), key=lambda p: (-len(p), p))
    return float(multipliers[matches[0]]) if matches else 1.0


def _layer_ids(paths: Sequence[str], layer_id_fn: Callable) -> list[int | None]:
    ids = []
    for path in paths:
        layer = layer_id_fn(path)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or layer < 0):
            name = getattr(layer_id_fn, '__name__', layer_id_fn)
            raise config_lib.ConfigError(
                f'config.optimizer.layer_id_fn={name}: for parameter {path!r} it returned '
                f'{layer!r}; expected an int >= 0, or None above every layer')
        ids.append(layer)
    return ids


def lr_factors(params, *, lr_multipliers: Mapping[str, float] | None = None,
               layer_decay: float | None = None,
               layer_id_fn: Callable[[str], int | None] | None = None) -> object:
    """The tree of per-parameter learning-rate factors the options give (module docstring)."""
    paths = parameter_paths(params)
    multipliers = dict(lr_multipliers or {})
    _check_patterns_match(sorted(multipliers), paths, 'lr_multipliers')
    factors = [_lr_multiplier(path, multipliers) for path in paths]
    if layer_decay is not None:
        ids = _layer_ids(paths, layer_id_fn)
        top = 1 + max((i for i in ids if i is not None), default=-1)
        factors = [f * layer_decay ** (top - (top if i is None else i))
                   for f, i in zip(factors, ids, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(params), factors)


def scale_by_factors(factors_of: Callable[[object], object]) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's factor, `factors_of(params)` (a tree of
    floats computed from the tree's paths, at trace time); stateless."""

    def init(params):
        factors_of(params)  # a misconfigured option fails at init, before any step
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        factors = factors_of(updates)  # same paths as the parameters
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(init, update)


def _with_groups(tx: optax.GradientTransformation, lr_multipliers, layer_decay,
                 layer_id_fn) -> optax.GradientTransformation:
    """`tx` followed by the parameter groups' factors; `tx` itself when there are none."""
    if layer_decay is not None:
        if (isinstance(layer_decay, bool) or not isinstance(layer_decay, int | float)
                or not 0 < layer_decay <= 1):
            raise config_lib.ConfigError(
                f'config.optimizer.layer_decay={layer_decay!r}: expected a factor in (0, 1], '
                'e.g. 0.65')
        if not callable(layer_id_fn):
            raise config_lib.ConfigError(
                'config.optimizer.layer_decay needs config.optimizer.layer_id_fn, the model\'s '
                f'function from a parameter path to its layer id (got {layer_id_fn!r})')
    elif layer_id_fn is not None:
        raise config_lib.ConfigError('config.optimizer.layer_id_fn is set but '
                                     'config.optimizer.layer_decay is not: set both or neither')
    for pattern, factor in (lr_multipliers or {}).items():
        if (isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0):
            raise config_lib.ConfigError(
                f'config.optimizer.lr_multipliers[{pattern!r}]={factor!r}: expected a number '
                '>= 0')
    if not lr_multipliers and layer_decay is None:
        return tx
    factors_of = functools.partial(lr_factors, lr_multipliers=lr_multipliers,
                                   layer_decay=layer_decay, layer_id_fn=layer_id_fn)
    return optax.chain(tx, scale_by_factors(factors_of))


def sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float = 0.9,
        weight_decay: float = 5e-4, nesterov: bool = False,
        no_decay: Sequence[str] = NO_DECAY_NAMES,
        lr_multipliers: Mapping[str, float] | None = None, layer_decay: float | None = None,
        layer_id_fn: Callable[[str], int | None] | None = None) -> optax.GradientTransformation:
    """SGD with momentum and (coupled, L2-style) weight decay, as in mmsegmentation's recipes;
    parameter groups as in the module docstring."""
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay,
                                  mask=functools.partial(decay_mask, no_decay=tuple(no_decay))),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
    return _with_groups(tx, lr_multipliers, layer_decay, layer_id_fn)


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 1e-4,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          no_decay: Sequence[str] = NO_DECAY_NAMES,
          lr_multipliers: Mapping[str, float] | None = None, layer_decay: float | None = None,
          layer_id_fn: Callable[[str], int | None] | None = None) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019); parameter groups as in the
    module docstring."""
    tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                     mask=functools.partial(decay_mask, no_decay=tuple(no_decay)))
    return _with_groups(tx, lr_multipliers, layer_decay, layer_id_fn)


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
