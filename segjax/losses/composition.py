"""Composite losses: a weighted sum of named terms and the main-plus-auxiliary-heads loss,
each returning {'loss': total, <name>: term, ...} (see `segjax.losses`)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from segjax.losses._common import DENOMINATORS, LossFn, LossSpec, declares_denominators
from segjax.losses.pixel import cross_entropy
from segjax.models.layers import resize_bilinear


def _term(spec: LossSpec, where: str, allow_weight: bool = True) -> tuple[LossFn, Any, dict]:
    """(loss function, weight, options) of a term given as fn, (fn, weight) or {'fn': ...}."""
    if hasattr(spec, 'to_dict'):  # an ml_collections.ConfigDict passed directly
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        if 'fn' not in spec:
            raise ValueError(f"{where}: a mapping term needs 'fn' (the loss); got {sorted(spec)}")
        options = {k: v for k, v in spec.items() if k not in ('fn', 'weight')}
        fn, weight = spec['fn'], spec.get('weight', 1.0)
        if 'weight' in spec and not allow_weight:
            raise ValueError(f"{where}: no 'weight' here (the main loss has weight 1, the "
                             'auxiliary heads aux_weight)')
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and allow_weight:
        (fn, weight), options = spec, {}
    else:
        fn, weight, options = spec, 1.0, {}
    if not callable(fn):
        raise TypeError(f'{where}: expected a loss function, (fn, weight) or '
                        f"{{'fn': fn, 'weight': w, **options}}; got {spec!r}")
    if 'ignore_index' in options:
        raise ValueError(f'{where}: ignore_index is set once for all terms (config.data.'
                         'ignore_index), not per term')
    if 'with_denominators' in options:
        raise ValueError(f'{where}: with_denominators is set by the composite itself, not per '
                         'term')
    _check_options(fn, options, where)
    return fn, weight, options


def _check_options(fn: LossFn, options: dict, where: str) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in params:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            raise TypeError(f'{where}: {getattr(fn, "__name__", fn)} takes no option {key!r}'
                            f'{hint}; it takes {accepted}')


def _total_and_parts(value) -> tuple[jax.Array, dict]:
    """A loss's total and its named sub-terms (a composite's dict), or (scalar, {})."""
    if isinstance(value, Mapping):
        return value['loss'], {k: v for k, v in value.items() if k not in ('loss', DENOMINATORS)}
    return value, {}


def _call_term(fn: LossFn, options: dict, with_denominators: bool, *args, **kwargs):
    """fn(*args, **options, **kwargs), asked for its denominators when wanted and declared;
    returns (value, its (term, D) pairs, an empty tuple when it declares none)."""
    if with_denominators and declares_denominators(fn):
        value = fn(*args, **options, **kwargs, with_denominators=True)
        return value, tuple(value[DENOMINATORS])
    return fn(*args, **options, **kwargs), ()


def _add_term(result: dict, name: str, value) -> jax.Array:
    total, parts = _total_and_parts(value)
    result[name] = total
    result.update({f'{name}/{k}': v for k, v in parts.items()})
    return total


def weighted_sum(
    logits: Any,
    labels: jax.Array,
    *,
    terms: Mapping[str, LossSpec],
    ignore_index: int = 255,
    with_denominators: bool = False,
) -> dict[str, jax.Array]:
    r"""A weighted sum of losses that reports every term by name.

    .. math::
      L = \sum_k w_k L_k(\text{logits}, \text{labels})

    ``terms`` maps a name to a loss function (weight 1), a ``(fn, weight)`` pair, or a mapping
    ``{'fn': fn, 'weight': w, **options of fn}``; the mapping form is the one to use in a
    config, because each of its fields can then be overridden from the command line
    (``--config.loss.terms.dice.weight=0.5``). Options are checked against ``fn``'s signature.
    Returns ``{'loss': L, name: L_k, ...}`` with each term **unweighted**; ``train_step`` logs
    them as ``train/loss/<name>``. A term that is itself a composite adds its parts as
    ``<name>/<part>``. Partially apply it to get a plain loss:
    ``functools.partial(weighted_sum, terms=...)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])
      >>> labels = jnp.array([0, 1])
      >>> out = weighted_sum(logits, labels, terms={
      ...     'ce': cross_entropy, 'dice': {'fn': dice_loss, 'weight': 0.5, 'smooth': 0.0}})
      >>> print({k: round(float(v), 4) for k, v in sorted(out.items())})
      {'ce': 1.0397, 'dice': 0.6349, 'loss': 1.3572}

    Args:
      logits: whatever the terms take (usually [..., C] logits).
      labels: [...] integer class indices.
      terms: name -> term, as above (names must not be ``'loss'``).
      ignore_index: passed to every term.
      with_denominators: also return ``'denominators'``: the ``(w_k L_k, D_k)`` pairs of the
        terms that declare a denominator (see the module doc); the other terms add none.

    Returns:
      A dict of float32 scalars: the total at ``'loss'`` and each term by name.

    References:
      The composite losses of e.g. mmsegmentation (``loss_decode`` as a list of losses, each
      logged by name).
    """
    if not terms:
        raise ValueError('weighted_sum needs at least one term')
    result, total, pairs = {}, jnp.float32(0.0), ()
    for name, spec in terms.items():
        if not isinstance(name, str) or name in ('loss', DENOMINATORS):
            raise ValueError(f"weighted_sum term name {name!r}: use a string other than 'loss' "
                             f"and {DENOMINATORS!r}")
        fn, weight, options = _term(spec, f'weighted_sum term {name!r}')
        value, declared = _call_term(fn, options, with_denominators, logits, labels,
                                     ignore_index=ignore_index)
        total = total + weight * _add_term(result, name, value)
        pairs += tuple((weight * term, d) for term, d in declared)
    return {'loss': total, **result, **({DENOMINATORS: pairs} if with_denominators else {})}


def _match_labels(head: jax.Array, labels: jax.Array) -> jax.Array:
    """Auxiliary logits resized to the labels' spatial size with `resize_bilinear` (half-pixel
    centres, no antialiasing), as mmsegmentation does."""
    head = jnp.asarray(head)
    target = tuple(labels.shape) + head.shape[-1:]
    if head.shape == target:
        return head
    if head.ndim != len(target) or head.shape[0] != target[0]:
        raise ValueError(f'auxiliary logits {head.shape} cannot be resized to labels '
                         f'{labels.shape} [..., C]')
    return resize_bilinear(head.astype(jnp.float32), *target[1:-1])


def with_aux(
    outputs: Mapping[str, Any],
    labels: jax.Array,
    *,
    main: LossSpec = cross_entropy,
    aux: LossSpec | None = None,
    aux_weight: float | Sequence[float] = 0.4,
    ignore_index: int = 255,
    with_denominators: bool = False,
) -> dict[str, jax.Array]:
    r"""The main-plus-auxiliary-head loss of a model returning ``{'logits': ..., 'aux': ...}``.

    .. math::
      L = L_\text{main}(\text{logits}, y) + \sum_h \lambda_h L_\text{aux}(\text{aux}_h, y)

    ``main`` and ``aux`` are a loss function or ``{'fn': fn, **options}`` (``aux`` defaults to
    ``main``; either may be a composite such as :func:`weighted_sum`). ``outputs['aux']`` is one
    array or a sequence of arrays (one per head, with ``aux_weight`` a number or one weight per
    head). Auxiliary logits at a lower resolution are resized bilinearly to the labels' size
    before the loss, as in mmsegmentation. Returns ``{'loss': L, 'main': L_main, 'aux':
    L_aux}`` (``'aux/0'``, ``'aux/1'``, ... for several heads; a composite's parts as
    ``'main/<part>'``), each unweighted and logged as ``train/loss/<name>``.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])
      >>> labels = jnp.array([0, 0])
      >>> out = with_aux({'logits': logits, 'aux': jnp.zeros((2, 2))}, labels, aux_weight=0.4)
      >>> print({k: round(float(v), 4) for k, v in sorted(out.items())})  # aux: log 2
      {'aux': 0.6931, 'loss': 0.7677, 'main': 0.4904}

    Args:
      outputs: the model's output dict with ``'logits'`` and ``'aux'``.
      labels: [...] integer class indices.
      main: the loss of the main logits.
      aux: the loss of the auxiliary logits (default: ``main``).
      aux_weight: :math:`\lambda`, a number or one per auxiliary head.
      ignore_index: passed to every loss.
      with_denominators: also return ``'denominators'``, the ``(weighted term, D)`` pairs of
        the losses that declare a denominator (see the module doc; for gradient accumulation).

    Returns:
      A dict of float32 scalars: the total at ``'loss'``, ``'main'`` and ``'aux'``.

    References:
      Zhao et al., Pyramid Scene Parsing Network (auxiliary loss, weight 0.4), CVPR 2017.
    """
    if not isinstance(outputs, Mapping) or 'logits' not in outputs or 'aux' not in outputs:
        got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise TypeError(f"with_aux needs the model's output dict {{'logits', 'aux'}}; got {got}."
                        ' For a model without auxiliary heads, use the main loss directly.')
    main_fn, _, main_options = _term(main, 'with_aux main', allow_weight=False)
    aux_fn, _, aux_options = _term(main if aux is None else aux, 'with_aux aux',
                                   allow_weight=False)
    labels = jnp.asarray(labels)
    heads = outputs['aux']
    several = isinstance(heads, (tuple, list))
    heads = list(heads) if several else [heads]
    weights = list(aux_weight) if isinstance(aux_weight, (tuple, list)) else (
        [aux_weight] * len(heads))
    if len(weights) != len(heads):
        raise ValueError(f'aux_weight has {len(weights)} weights for {len(heads)} aux heads')

    result = {}
    value, pairs = _call_term(main_fn, main_options, with_denominators, outputs['logits'],
                              labels, ignore_index=ignore_index)
    total = _add_term(result, 'main', value)
    for i, (head, weight) in enumerate(zip(heads, weights, strict=True)):
        value, declared = _call_term(aux_fn, aux_options, with_denominators,
                                     _match_labels(head, labels), labels,
                                     ignore_index=ignore_index)
        total = total + weight * _add_term(result, f'aux/{i}' if several else 'aux', value)
        pairs += tuple((weight * term, d) for term, d in declared)
    return {'loss': total, **result, **({DENOMINATORS: pairs} if with_denominators else {})}
