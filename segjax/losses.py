"""Pure, jit-safe segmentation losses: `loss(logits, labels, *, ignore_index=255, **options)`.

Every loss takes logits [..., C] (any float dtype, computed in float32) and integer labels [...],
returns a float32 scalar, gives exactly zero loss and zero gradient at ignored pixels (label
`ignore_index`, or outside [0, C)) whatever their logits hold, and returns 0.0 with zero, finite
gradients when a batch has no valid pixel. Options are keyword-only and never branched on as
array values, so every loss jit-compiles.

Pixel losses average over the batch's valid pixels. Region losses (Dice, Jaccard, Tversky,
Lovasz) are computed per class over all the batch's valid pixels at once, so a data-parallel
batch gives the value of the formula over the global batch, however it is split over devices.

  pixel:     cross_entropy, top_k_cross_entropy, ohem_cross_entropy, focal_loss,
             boundary_cross_entropy
  region:    dice_loss, jaccard_loss, tversky_loss, focal_tversky_loss, lovasz_softmax
  binary:    binary_cross_entropy, binary_dice_loss, lovasz_hinge (one logit channel)
  composite: weighted_sum, with_aux (return {'loss': total, <name>: term, ...}; train_step logs
             each term as train/loss/<name>)
  helper:    label_boundaries (the edge mask boundary_cross_entropy weights)

Losses normalised by a count that depends on the batch (cross_entropy, focal_loss,
boundary_cross_entropy, binary_cross_entropy) declare it: called with
``with_denominators=True`` they return ``{'loss': L, 'denominators': ((L, D),)}``, D the label-only
normaliser L divides by, so that gradient accumulation can weight each micro-batch by its share
of the whole batch's D (see `segjax.step.train_step`); the composites pass the flag on to every
term that declares one (:func:`declares_denominators`) and collect ``(w_k L_k, D_k)`` pairs.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from segjax.models.layers import resize_bilinear

LossFn = Callable[..., Any]
# A term of a composite: a loss function, (loss function, weight), or a mapping
# {'fn': loss function, 'weight': w, **options of that loss} (the form a config can override).
LossSpec = LossFn | tuple[LossFn, float] | Mapping[str, Any]

_TINY = jnp.finfo(jnp.float32).tiny
# The key under which a loss called with with_denominators=True returns its (term, D) pairs.
DENOMINATORS = 'denominators'


# ----------------------------------------------------------------------------- shared helpers

def _reject_dict(logits) -> None:
    if isinstance(logits, Mapping):
        raise TypeError(
            f'got a dict of model outputs (keys {sorted(logits)}), expected a logits array; '
            "for a model with auxiliary heads wrap the loss: losses.with_aux(..., main=<loss>)")


def _prepare(logits, labels, ignore_index: int):
    """(float32 logits zeroed at invalid pixels, valid mask, labels with invalid -> 0)."""
    _reject_dict(logits)
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f'labels {labels.shape} do not match logits {logits.shape} [..., C]')
    num_classes = logits.shape[-1]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    # Whatever an ignored pixel's logits hold (even inf/NaN), nothing reaches the loss or its
    # gradient: jnp.where's gradient to the unselected branch is an exact zero.
    logits = jnp.where(valid[..., None], logits, 0.0)
    return logits, valid, jnp.where(valid, labels, 0)


def _prepare_binary(logits, labels, ignore_index: int):
    """(float32 logits [...] zeroed at invalid pixels, valid mask, float32 targets in {0, 1})."""
    _reject_dict(logits)
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if logits.shape == labels.shape + (1,):
        logits = logits[..., 0]
    if logits.shape != labels.shape:
        raise ValueError(f'labels {labels.shape} do not match binary logits {logits.shape} '
                         '([...] or [..., 1])')
    valid = (labels != ignore_index) & ((labels == 0) | (labels == 1))
    return jnp.where(valid, logits, 0.0), valid, jnp.where(valid, labels, 0).astype(jnp.float32)


def _count(mask: jax.Array, axis=None) -> jax.Array:
    # Count in int32: a float32 sum of ones loses exactness past 2**24 pixels.
    return jnp.sum(mask, axis=axis, dtype=jnp.int32).astype(jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array, fallback: float = 0.0) -> jax.Array:
    """num / den where den > 0, else `fallback`, with finite gradients in both cases."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def _safe_pow(x: jax.Array, power) -> jax.Array:
    """x ** power for x >= 0, with a finite (zero) gradient at x = 0 for any power >= 0."""
    positive = x > 0
    at_zero = jnp.where(jnp.asarray(power) == 0, 1.0, 0.0)  # 0 ** 0 = 1
    return jnp.where(positive, jnp.where(positive, x, 1.0) ** power, at_zero)


def _class_vector(values, num_classes: int, name: str) -> jax.Array:
    values = jnp.asarray(values, jnp.float32)
    if values.ndim == 0:
        return jnp.broadcast_to(values, (num_classes,))
    if values.shape != (num_classes,):
        raise ValueError(f'{name} has shape {values.shape}; expected ({num_classes},) or a scalar')
    return values


def _pixel_nll(logits, safe_labels):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_p = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    return log_probs, -log_p


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and value == 0


def declares_denominators(fn: LossFn) -> bool:
    """Whether a loss (or a partial of one) takes ``with_denominators`` (see the module doc)."""
    try:
        return 'with_denominators' in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature declares nothing
        return False


def _declared(value: jax.Array, denominator: jax.Array, with_denominators: bool):
    """The loss value, or with `with_denominators` {'loss': value, 'denominators': ((value, D),)}:
    D is what the value divides the batch's sum by, a function of the labels only."""
    if not with_denominators:
        return value
    return {'loss': value, DENOMINATORS: ((value, jax.lax.stop_gradient(denominator)),)}


# ----------------------------------------------------------------------------- pixel losses

def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: jax.Array | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    normalize_by: str = 'weight',
    with_denominators: bool = False,
) -> jax.Array:
    r"""Per-pixel softmax cross-entropy with integer labels, averaged over valid pixels.

    With logits :math:`z_i \in \mathbb{R}^C`, label :math:`y_i`, log-probabilities
    :math:`\log p_{ic}`, valid pixels :math:`V` (label not ``ignore_index`` and in [0, C)),
    class weights :math:`w` (ones by default) and label smoothing :math:`\varepsilon`:

    .. math::
      \ell_i = (1 - \varepsilon)\, w_{y_i} (-\log p_{i y_i})
               + \frac{\varepsilon}{C} \sum_c w_c (-\log p_{ic}), \qquad
      L = \frac{\sum_{i \in V} \ell_i}{D}

    with the normaliser :math:`D` chosen by ``normalize_by``: ``'weight'``
    :math:`\sum_{i \in V} w_{y_i}` (PyTorch's weighted mean; the number of valid pixels when
    unweighted), ``'valid'`` :math:`|V|` (mmsegmentation's ``avg_non_ignore=True``) or ``'all'``
    the number of pixels including ignored ones (mmsegmentation's default
    ``avg_non_ignore=False``). The default is exactly PyTorch's
    ``F.cross_entropy(logits, labels, weight=w, ignore_index=..., label_smoothing=eps)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0], [5.0, -5.0]])
      >>> labels = jnp.array([0, 0, 255])  # the last pixel is ignored
      >>> print(f'{float(cross_entropy(logits, labels)):.4f}')  # (log 2 + log 4/3) / 2
      0.4904
      >>> print(f'{float(cross_entropy(logits, labels, normalize_by="all")):.4f}')  # over 3
      0.3269

    Args:
      logits: [..., C] unnormalised scores (e.g. [B, H, W, C]), any float dtype.
      labels: [...] integer class indices (any integer dtype, e.g. uint8).
      ignore_index: label value whose pixels are ignored; labels outside [0, C) are ignored too.
      class_weights: optional [C] per-class weights.
      label_smoothing: :math:`\varepsilon` in [0, 1]; the target is
        :math:`(1 - \varepsilon)\,\text{onehot} + \varepsilon / C`.
      normalize_by: ``'weight'``, ``'valid'`` or ``'all'`` (see above).
      with_denominators: also return :math:`D` (see the module doc; for gradient
        accumulation).

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      PyTorch, `torch.nn.functional.cross_entropy`,
      https://pytorch.org/docs/stable/generated/torch.nn.functional.cross_entropy.html;
      Szegedy et al., Rethinking the Inception Architecture for Computer Vision (label
      smoothing), CVPR 2016.
    """
    if normalize_by not in ('weight', 'valid', 'all'):
        raise ValueError(f"normalize_by={normalize_by!r}: expected 'weight', 'valid' or 'all'")
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    num_classes = logits.shape[-1]
    log_probs, nll = _pixel_nll(logits, safe)
    if class_weights is None:
        class_w = jnp.ones((num_classes,), jnp.float32)
        pixel_w = valid.astype(jnp.float32)
    else:
        class_w = _class_vector(class_weights, num_classes, 'class_weights')
        pixel_w = jnp.where(valid, class_w[safe], 0.0)
    per_pixel = pixel_w * nll
    if not _is_zero(label_smoothing):
        smooth = -jnp.sum(log_probs * class_w, axis=-1)
        per_pixel = ((1.0 - label_smoothing) * per_pixel
                     + (label_smoothing / num_classes) * smooth)
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    if normalize_by == 'weight':
        denominator = _count(valid) if class_weights is None else jnp.sum(pixel_w)
    elif normalize_by == 'valid':
        denominator = _count(valid)
    else:
        denominator = jnp.float32(valid.size)
    # No valid pixel: total is 0, so 0 / tiny = 0 and the gradient is 0 too, never NaN.
    return _declared(total / jnp.maximum(denominator, _TINY), denominator, with_denominators)


def top_k_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    top_k_percent: float = 0.25,
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Online hard example mining: cross-entropy averaged over the hardest pixels only.

    With per-pixel losses :math:`\ell_i = w_{y_i}(-\log p_{i y_i})` on valid pixels and
    :math:`N` the (static) number of pixels in the batch, the :math:`k = \max(1, \lfloor
    \text{top\_k\_percent} \cdot N \rfloor)` largest valid losses form the set :math:`K`:

    .. math::
      L = \frac{1}{|K|} \sum_{i \in K} \ell_i

    Ignored pixels are never selected; when fewer than :math:`k` pixels are valid, all valid
    pixels are kept (so ``top_k_percent=1`` is the plain mean over valid pixels). As in DeepLab,
    :math:`k` counts all pixels of the batch and selection is over the whole batch; DeepLab
    divides by the number of non-zero selected losses, this by the number of selected valid
    pixels (the same unless a selected loss underflows to exactly 0).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0], [0.0, 0.0], [1.0, 1.0]])
      >>> labels = jnp.array([0, 0, 1, 255])
      >>> # k = 2 of 4 pixels: the two log 2 losses, not log 4/3
      >>> print(f'{float(top_k_cross_entropy(logits, labels, top_k_percent=0.5)):.4f}')
      0.6931

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      top_k_percent: fraction in (0, 1] of the batch's pixels to keep (a Python number: it sets
        the static k).
      class_weights: optional [C] weights scaling each pixel's loss before selection.

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      Chen et al., DeepLab (``top_k_percent_pixels`` in ``deeplab/utils/train_utils.py``);
      Shrivastava et al., Training Region-based Object Detectors with Online Hard Example
      Mining, CVPR 2016.
    """
    if not 0.0 < top_k_percent <= 1.0:
        raise ValueError(f'top_k_percent={top_k_percent}: expected a fraction in (0, 1]')
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    _, nll = _pixel_nll(logits, safe)
    if class_weights is not None:
        nll = nll * _class_vector(class_weights, logits.shape[-1], 'class_weights')[safe]
    k = max(1, int(top_k_percent * valid.size))
    # -inf keeps ignored pixels below every valid one; the mask drops any that are selected.
    scores = jnp.where(valid, nll, -jnp.inf).reshape(-1)
    top, _ = jax.lax.top_k(scores, k)
    selected = top > -jnp.inf
    return jnp.sum(jnp.where(selected, top, 0.0)) / jnp.maximum(_count(selected), 1.0)


def ohem_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Online hard example mining by probability threshold, keeping at least ``min_kept`` pixels.

    A valid pixel is kept when the softmax probability of its label is below ``thresh``, or is
    among the ``min_kept`` lowest of the batch (ties at the ``min_kept``-th value all kept):

    .. math::
      K = \{ i \in V : p_{i y_i} < \text{thresh} \ \lor\ p_{i y_i} \le p_{(m)} \}, \qquad
      L = \frac{1}{|K|} \sum_{i \in K} w_{y_i} (-\log p_{i y_i})

    where :math:`p_{(m)}` is the :math:`m`-th smallest label probability over valid pixels,
    :math:`m = \min(\text{min\_kept}, N)` (all valid pixels are kept when fewer than :math:`m`
    are valid). Selection carries no gradient. ``min_kept`` counts pixels over the whole batch
    (HRNet's OhemCrossEntropy; mmsegmentation's ``OHEMPixelSampler`` counts per image, i.e.
    ``min_kept * batch_size`` here). Unlike those, ``min_kept`` is honoured exactly even when it
    reaches the number of valid pixels.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0], [jnp.log(9.0), 0.0]])
      >>> labels = jnp.array([0, 0, 0])  # label probabilities 0.5, 0.75, 0.9
      >>> print(f'{float(ohem_cross_entropy(logits, labels, thresh=0.6, min_kept=0)):.4f}')
      0.6931
      >>> # min_kept=2 also keeps the 0.75 pixel: (log 2 + log 4/3) / 2
      >>> print(f'{float(ohem_cross_entropy(logits, labels, thresh=0.6, min_kept=2)):.4f}')
      0.4904

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      thresh: keep pixels whose label probability is below this.
      min_kept: keep at least this many pixels of the batch (a Python int; 0 = threshold only).
      class_weights: optional [C] weights scaling each kept pixel's loss.

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      Wu, Shen and van den Hengel, High-performance Semantic Segmentation Using Very Deep Fully
      Convolutional Networks, 2016 (online bootstrapping); Zhao et al., PSPNet, CVPR 2017;
      mmsegmentation ``OHEMPixelSampler`` and HRNet-Semantic-Segmentation ``OhemCrossEntropy``.
    """
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    _, nll = _pixel_nll(logits, safe)
    prob = jax.lax.stop_gradient(jnp.exp(-nll))
    keep = prob < thresh
    m = min(int(min_kept), valid.size)
    if m > 0:
        # m-th smallest label probability over valid pixels (ignored ones sort last as +inf).
        lowest, _ = jax.lax.top_k(-jnp.where(valid, prob, jnp.inf).reshape(-1), m)
        keep = keep | (prob <= -lowest[m - 1])
    keep = keep & valid
    if class_weights is not None:
        nll = nll * _class_vector(class_weights, logits.shape[-1], 'class_weights')[safe]
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(_count(keep), 1.0)


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    gamma: float = 2.0,
    alpha: float | jax.Array | Sequence[float] | None = None,
    with_denominators: bool = False,
) -> jax.Array:
    r"""Softmax focal loss: cross-entropy down-weighting well-classified pixels.

    With :math:`p_i = p_{i y_i}` the softmax probability of the label and :math:`\alpha` a
    scalar or per-class weight (1 by default):

    .. math::
      L = \frac{1}{|V|} \sum_{i \in V} -\alpha_{y_i} (1 - p_i)^\gamma \log p_i

    ``gamma=0`` and no ``alpha`` is the cross-entropy. :math:`1 - p_i` is computed as
    ``-expm1(log p_i)`` for accuracy, and the gradient stays finite at :math:`p_i = 1` for any
    :math:`\gamma \ge 0`.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])  # p = 1/2, 3/4 for class 0
      >>> labels = jnp.array([0, 0])
      >>> # (0.5**2 log 2 + 0.25**2 log 4/3) / 2
      >>> print(f'{float(focal_loss(logits, labels, gamma=2.0)):.4f}')
      0.0956

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      gamma: focusing parameter :math:`\gamma \ge 0`.
      alpha: optional balancing weight, a scalar or [C] per-class weights.
      with_denominators: also return :math:`|V|` (see the module doc).

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.
    """
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    _, nll = _pixel_nll(logits, safe)
    per_pixel = _safe_pow(-jnp.expm1(-nll), gamma) * nll
    if alpha is not None:
        per_pixel = per_pixel * _class_vector(alpha, logits.shape[-1], 'alpha')[safe]
    count = _count(valid)
    value = jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(count, 1.0)
    return _declared(value, count, with_denominators)


def label_boundaries(labels: jax.Array, *, ignore_index: int = 255, radius: int = 1,
                     num_classes: int | None = None) -> jax.Array:
    """[..., H, W] bool: valid pixels with a differently-labelled valid pixel within `radius`.

    The neighbourhood is the (2r+1) x (2r+1) window over the last two axes; ignored pixels
    (and, given `num_classes`, labels outside [0, C)) neither are nor make a boundary, and the
    image border is not a boundary.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    if labels.ndim < 2:
        raise ValueError(f'labels {labels.shape} need two spatial axes [..., H, W]')
    valid = labels != ignore_index
    if num_classes is not None:
        valid = valid & (labels >= 0) & (labels < num_classes)
    info = jnp.iinfo(jnp.int32)
    window = (1,) * (labels.ndim - 2) + (2 * radius + 1,) * 2
    strides = (1,) * labels.ndim
    highest = jax.lax.reduce_window(jnp.where(valid, labels, info.min), info.min, jax.lax.max,
                                    window, strides, 'SAME')
    lowest = jax.lax.reduce_window(jnp.where(valid, labels, info.max), info.max, jax.lax.min,
                                   window, strides, 'SAME')
    return valid & (highest > lowest)


def boundary_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    boundary_weight: float = 5.0,
    radius: int = 1,
    with_denominators: bool = False,
) -> jax.Array:
    r"""Cross-entropy with extra weight on pixels near label edges (boundary-aware).

    A valid pixel is on a boundary, :math:`b_i = 1`, when a valid pixel within ``radius`` (a
    :math:`(2r+1)^2` window over the last two label axes, H and W) has another label. Ignored
    pixels never create a boundary. With :math:`u_i = 1 + \beta\, b_i`:

    .. math::
      L = \frac{\sum_{i \in V} u_i (-\log p_{i y_i})}{\sum_{i \in V} u_i}

    A binary band of width :math:`r` standing in for U-Net's distance-based border weight map
    :math:`w_0 \exp(-(d_1 + d_2)^2 / 2\sigma^2)`; the weights depend on the labels only, so they
    carry no gradient. Normalised by the weights, the value stays on the cross-entropy's scale.

    Examples:
      >>> import jax.numpy as jnp
      >>> labels = jnp.array([[[0, 0, 1]]])  # one 1x3 image: the last two pixels are an edge
      >>> logits = jnp.zeros((1, 1, 3, 2)).at[0, 0, 0, 0].set(jnp.log(3.0))
      >>> # (log 4/3 + 5 log 2 + 5 log 2) / 11
      >>> print(f'{float(boundary_cross_entropy(logits, labels, boundary_weight=4.0)):.4f}')
      0.6563

    Args:
      logits: [..., H, W, C] unnormalised scores, any float dtype.
      labels: [..., H, W] integer class indices.
      ignore_index: label value whose pixels are ignored.
      boundary_weight: :math:`\beta`, the extra weight of a boundary pixel.
      radius: half-width of the neighbourhood in pixels (a Python int).
      with_denominators: also return :math:`\sum_{i \in V} u_i` (see the module doc).

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      Ronneberger, Fischer and Brox, U-Net: Convolutional Networks for Biomedical Image
      Segmentation, MICCAI 2015 (border weight map).
    """
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    _, nll = _pixel_nll(logits, safe)
    boundary = label_boundaries(labels, ignore_index=ignore_index, radius=radius,
                                num_classes=logits.shape[-1])
    weight = jnp.where(valid, 1.0 + boundary_weight * boundary, 0.0)
    denominator = jnp.sum(weight)
    value = _safe_div(jnp.sum(jnp.where(valid, weight * nll, 0.0)), denominator)
    return _declared(value, denominator, with_denominators)


# ----------------------------------------------------------------------------- region losses

def _soft_counts(logits, valid, safe):
    """(probabilities zeroed at invalid pixels, per-class soft TP, per-class label count, axes)."""
    probs = jnp.where(valid[..., None], jax.nn.softmax(logits, axis=-1), 0.0)
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.bool_) & valid[..., None]
    axes = tuple(range(probs.ndim - 1))
    tp = jnp.sum(jnp.where(onehot, probs, 0.0), axis=axes)
    return probs, tp, _count(onehot, axis=axes), axes


def _class_mean(per_class: jax.Array, ground_truth: jax.Array, classes: str,
                class_weights) -> jax.Array:
    """Weighted mean of per-class losses over the counted classes; 0.0 when none counts."""
    if classes == 'present':
        counted = ground_truth > 0
    elif classes == 'all':
        counted = jnp.ones(per_class.shape, jnp.bool_)
    else:
        raise ValueError(f"classes={classes!r}: expected 'present' or 'all'")
    weights = counted.astype(jnp.float32)
    if class_weights is not None:
        weights = weights * _class_vector(class_weights, per_class.shape[0], 'class_weights')
    return _safe_div(jnp.sum(jnp.where(counted, weights * per_class, 0.0)), jnp.sum(weights))


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    exponent: int = 1,
    classes: str = 'present',
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Soft multi-class Dice loss from logits, over the whole batch's valid pixels per class.

    With softmax probabilities :math:`p_{ic}`, one-hot labels :math:`g_{ic}`, sums over valid
    pixels :math:`V` of the batch, smoothing :math:`s` and exponent :math:`e`:

    .. math::
      D_c = \frac{2 \sum_i p_{ic} g_{ic} + s}{\sum_i p_{ic}^e + \sum_i g_{ic} + s}, \qquad
      L = \frac{\sum_{c \in K} w_c (1 - D_c)}{\sum_{c \in K} w_c}

    :math:`K` is set by ``classes``: ``'present'`` (default, as Lovasz's ``classes='present'``)
    counts the classes that occur in the batch's valid labels; ``'all'`` counts every class, so
    probability mass on an absent class is penalised (when :math:`s > 0`). A class with no
    prediction and no ground truth has :math:`D_c = 1` even at :math:`s = 0`. ``exponent=2`` is
    V-Net's squared denominator. 0.0 when no class counts.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
      >>> labels = jnp.array([0, 1])
      >>> # D_0 = 1 / 2.25, D_1 = 0.5 / 1.75: 1 - (4/9 + 2/7) / 2 = 40/63
      >>> print(f'{float(dice_loss(logits, labels, smooth=0.0)):.4f}')
      0.6349

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      smooth: :math:`s \ge 0`, added to numerator and denominator.
      exponent: :math:`e`, 1 (Dice/F1) or 2 (V-Net).
      classes: ``'present'`` or ``'all'`` (see above).
      class_weights: optional [C] weights of the per-class terms.

    Returns:
      A float32 scalar in [0, 1].

    References:
      Milletari, Navab and Ahmadi, V-Net, 3DV 2016; Sudre et al., Generalised Dice overlap as a
      deep learning loss function for highly unbalanced segmentations, DLMIA 2017.
    """
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    probs, tp, count, axes = _soft_counts(logits, valid, safe)
    sum_p = jnp.sum(probs if exponent == 1 else probs ** exponent, axis=axes)
    score = _safe_div(2.0 * tp + smooth, sum_p + count + smooth, fallback=1.0)
    return _class_mean(1.0 - score, count, classes, class_weights)


def jaccard_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    classes: str = 'present',
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Soft IoU (Jaccard) loss from logits, over the whole batch's valid pixels per class.

    .. math::
      J_c = \frac{\sum_i p_{ic} g_{ic} + s}
                 {\sum_i p_{ic} + \sum_i g_{ic} - \sum_i p_{ic} g_{ic} + s}, \qquad
      L = \frac{\sum_{c \in K} w_c (1 - J_c)}{\sum_{c \in K} w_c}

    with the notation and the ``classes`` rule of :func:`dice_loss` (a class with no prediction
    and no ground truth has :math:`J_c = 1`).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
      >>> labels = jnp.array([0, 1])
      >>> # J_0 = 0.5 / 1.75, J_1 = 0.25 / 1.5: 1 - (2/7 + 1/6) / 2
      >>> print(f'{float(jaccard_loss(logits, labels, smooth=0.0)):.4f}')
      0.7738

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      smooth: :math:`s \ge 0`.
      classes: ``'present'`` or ``'all'``.
      class_weights: optional [C] weights of the per-class terms.

    Returns:
      A float32 scalar in [0, 1].

    References:
      Rahman and Wang, Optimizing Intersection-Over-Union in Deep Neural Networks for Image
      Segmentation, ISVC 2016.
    """
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    probs, tp, count, axes = _soft_counts(logits, valid, safe)
    union = jnp.sum(probs, axis=axes) + count - tp
    score = _safe_div(tp + smooth, union + smooth, fallback=1.0)
    return _class_mean(1.0 - score, count, classes, class_weights)


def _tversky_index(logits, labels, ignore_index, alpha, beta, smooth):
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    probs, tp, count, axes = _soft_counts(logits, valid, safe)
    fp = jnp.sum(probs, axis=axes) - tp
    fn = count - tp
    return _safe_div(tp + smooth, tp + alpha * fp + beta * fn + smooth, fallback=1.0), count


def tversky_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
    classes: str = 'present',
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Tversky loss: Dice with separate weights on false positives and false negatives.

    With soft counts over the batch's valid pixels :math:`TP_c = \sum_i p_{ic} g_{ic}`,
    :math:`FP_c = \sum_i p_{ic}(1 - g_{ic})`, :math:`FN_c = \sum_i (1 - p_{ic}) g_{ic}`:

    .. math::
      T_c = \frac{TP_c + s}{TP_c + \alpha FP_c + \beta FN_c + s}, \qquad
      L = \frac{\sum_{c \in K} w_c (1 - T_c)}{\sum_{c \in K} w_c}

    :math:`\alpha = \beta = 1/2` is the Dice loss and :math:`\alpha = \beta = 1` the Jaccard
    loss (at :math:`s = 0`); :math:`\beta > \alpha` favours recall. ``classes`` as in
    :func:`dice_loss`.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
      >>> labels = jnp.array([0, 1])
      >>> # T_0 = .5 / (.5 + .3 * .75 + .7 * .5), T_1 = .25 / (.25 + .3 * .5 + .7 * .75)
      >>> print(f'{float(tversky_loss(logits, labels, smooth=0.0)):.4f}')
      0.6323

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      alpha: weight of false positives.
      beta: weight of false negatives.
      smooth: :math:`s \ge 0`.
      classes: ``'present'`` or ``'all'``.
      class_weights: optional [C] weights of the per-class terms.

    Returns:
      A float32 scalar.

    References:
      Salehi, Erdogmus and Gholipour, Tversky loss function for image segmentation using 3D
      fully convolutional deep networks, MLMI 2017.
    """
    score, count = _tversky_index(logits, labels, ignore_index, alpha, beta, smooth)
    return _class_mean(1.0 - score, count, classes, class_weights)


def focal_tversky_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 4.0 / 3.0,
    smooth: float = 1.0,
    classes: str = 'present',
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Focal Tversky loss: the Tversky loss per class raised to :math:`1/\gamma`.

    .. math::
      L = \frac{\sum_{c \in K} w_c (1 - T_c)^{1/\gamma}}{\sum_{c \in K} w_c}

    with :math:`T_c` the Tversky index of :func:`tversky_loss` (the paper sums over classes;
    this is the mean, like the other region losses). :math:`\gamma > 1` focuses on classes that
    are still poorly segmented; the gradient stays finite (zero) where :math:`T_c = 1`.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])
      >>> labels = jnp.array([0, 1])
      >>> print(f'{float(focal_tversky_loss(logits, labels, smooth=0.0, gamma=1.0)):.4f}')
      0.6323
      >>> print(f'{float(focal_tversky_loss(logits, labels, smooth=0.0)):.4f}')
      0.7075

    Args:
      logits: [..., C] unnormalised scores, any float dtype.
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      alpha: weight of false positives.
      beta: weight of false negatives.
      gamma: focal parameter; the exponent is :math:`1/\gamma` (the paper's best: 4/3).
      smooth: :math:`s \ge 0`.
      classes: ``'present'`` or ``'all'``.
      class_weights: optional [C] weights of the per-class terms.

    Returns:
      A float32 scalar.

    References:
      Abraham and Khan, A Novel Focal Tversky Loss Function with Improved Attention U-Net for
      Lesion Segmentation, ISBI 2019.
    """
    score, count = _tversky_index(logits, labels, ignore_index, alpha, beta, smooth)
    per_class = _safe_pow(jnp.maximum(1.0 - score, 0.0), 1.0 / gamma)
    return _class_mean(per_class, count, classes, class_weights)


def _lovasz_grad(gt_sorted: jax.Array) -> jax.Array:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted descending.

    gt_sorted: [N, ...] 0/1 ground truth in the order of decreasing error, along axis 0.
    """
    gt = gt_sorted.astype(jnp.int32)
    gts = jnp.sum(gt, axis=0)
    intersection = (gts - jnp.cumsum(gt, axis=0)).astype(jnp.float32)
    # >= 1 everywhere: either gts >= 1 or the first element is a negative.
    union = (gts + jnp.cumsum(1 - gt, axis=0)).astype(jnp.float32)
    jaccard = 1.0 - intersection / union
    return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)


def _lovasz_softmax_flat(probs, valid, safe, classes, class_weights):
    """probs [N, C]; ignored pixels get error 0 and no ground truth, so they add nothing."""
    num_classes = probs.shape[-1]
    fg = jax.nn.one_hot(safe, num_classes, dtype=jnp.bool_) & valid[:, None]
    errors = jnp.where(valid[:, None], jnp.abs(fg.astype(jnp.float32) - probs), 0.0)
    order = jnp.argsort(errors, axis=0, descending=True)
    errors_sorted = jnp.take_along_axis(errors, order, axis=0)
    grad = jax.lax.stop_gradient(_lovasz_grad(jnp.take_along_axis(fg, order, axis=0)))
    per_class = jnp.sum(errors_sorted * grad, axis=0)
    return _class_mean(per_class, _count(fg, axis=0), classes, class_weights)


def lovasz_softmax(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    classes: str = 'present',
    per_image: bool = False,
    class_weights: jax.Array | Sequence[float] | None = None,
) -> jax.Array:
    r"""Lovasz-softmax: the convex Lovasz extension of the Jaccard loss, per class.

    For class :math:`c`, with errors :math:`m_i(c) = |g_{ic} - p_{ic}|` over the valid pixels
    sorted in decreasing order :math:`\pi`, and :math:`\Delta_{J_c}` the Jaccard loss of the
    set of the first :math:`k` pixels (predicted as foreground):

    .. math::
      \overline{\Delta_{J_c}}(m(c)) = \sum_k m_{\pi_k}(c)\,
        \big(\Delta_{J_c}(\{\pi_1..\pi_k\}) - \Delta_{J_c}(\{\pi_1..\pi_{k-1}\})\big), \qquad
      L = \frac{\sum_{c \in K} w_c \overline{\Delta_{J_c}}}{\sum_{c \in K} w_c}

    computed over all the batch's valid pixels at once (the reference's ``per_image=False``) or,
    with ``per_image=True``, per image (leading axis) and then averaged over images (an image
    with no valid pixel counts as 0). ``classes='present'`` (the reference's default) averages
    over the classes present in the labels, ``'all'`` over all classes. Ignored pixels take part
    in the sort with error 0 and no ground truth, which leaves the value unchanged, and their
    gradient is exactly 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0]])  # p = [.5, .5], [.75, .25]
      >>> labels = jnp.array([0, 1])
      >>> # class 0: errors [.5, .75] -> .75 * 1/2 + .5 * 1/2; class 1: .75 * 1
      >>> print(f'{float(lovasz_softmax(logits, labels)):.4f}')
      0.6875

    Args:
      logits: [..., C] unnormalised scores, any float dtype ([B, ..., C] for ``per_image``).
      labels: [...] integer class indices.
      ignore_index: label value whose pixels are ignored.
      classes: ``'present'`` or ``'all'``.
      per_image: average per-image losses instead of one loss over the batch.
      class_weights: optional [C] weights of the per-class terms.

    Returns:
      A float32 scalar; 0.0 when no class counts.

    References:
      Berman, Rannen Triki and Blaschko, The Lovasz-Softmax loss: A tractable surrogate for the
      optimization of the intersection-over-union measure in neural networks, CVPR 2018;
      https://github.com/bermanmaxim/LovaszSoftmax
    """
    logits, valid, safe = _prepare(logits, labels, ignore_index)
    probs = jax.nn.softmax(logits, axis=-1)
    num_classes = probs.shape[-1]

    def flat(p, v, s):
        return _lovasz_softmax_flat(p.reshape(-1, num_classes), v.reshape(-1), s.reshape(-1),
                                    classes, class_weights)

    if per_image:
        return jnp.mean(jax.vmap(flat)(probs, valid, safe))
    return flat(probs, valid, safe)


# ----------------------------------------------------------------------------- binary losses

def binary_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    pos_weight: float | None = None,
    with_denominators: bool = False,
) -> jax.Array:
    r"""Sigmoid binary cross-entropy from one logit channel, averaged over valid pixels.

    With logit :math:`x_i`, target :math:`y_i \in \{0, 1\}` and positive weight :math:`w_+`:

    .. math::
      L = \frac{1}{|V|} \sum_{i \in V}
          -\big(w_+ y_i \log \sigma(x_i) + (1 - y_i) \log(1 - \sigma(x_i))\big)

    computed stably with softplus. Labels other than 0, 1 and ``ignore_index`` are ignored too.
    PyTorch's ``F.binary_cross_entropy_with_logits(x, y, pos_weight=w)`` over valid pixels.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([0.0, jnp.log(3.0), 7.0])  # sigmoid: 1/2, 3/4, -
      >>> labels = jnp.array([1, 0, 255])
      >>> print(f'{float(binary_cross_entropy(logits, labels)):.4f}')  # (log 2 + log 4) / 2
      1.0397

    Args:
      logits: [...] or [..., 1] logits of the positive class, any float dtype.
      labels: [...] integer 0/1 targets.
      ignore_index: label value whose pixels are ignored.
      pos_weight: optional weight :math:`w_+` of the positive term.
      with_denominators: also return :math:`|V|` (see the module doc).

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      PyTorch, `torch.nn.functional.binary_cross_entropy_with_logits`,
      https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html
    """
    logits, valid, target = _prepare_binary(logits, labels, ignore_index)
    positive = jax.nn.softplus(-logits)  # -log sigmoid(x)
    if pos_weight is not None:
        positive = pos_weight * positive
    per_pixel = target * positive + (1.0 - target) * jax.nn.softplus(logits)
    count = _count(valid)
    value = jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(count, 1.0)
    return _declared(value, count, with_denominators)


def binary_dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    smooth: float = 1.0,
    exponent: int = 1,
) -> jax.Array:
    r"""Soft Dice loss of the positive class from one sigmoid logit channel, over the batch.

    .. math::
      L = 1 - \frac{2 \sum_{i \in V} \sigma(x_i) y_i + s}
                   {\sum_{i \in V} \sigma(x_i)^e + \sum_{i \in V} y_i + s}

    0 when the denominator is 0 (no valid positive and nothing predicted, :math:`s = 0`).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([0.0, jnp.log(3.0)])  # sigmoid: 1/2, 3/4
      >>> labels = jnp.array([1, 0])
      >>> print(f'{float(binary_dice_loss(logits, labels, smooth=0.0)):.4f}')  # 1 - 1 / 2.25
      0.5556

    Args:
      logits: [...] or [..., 1] logits of the positive class, any float dtype.
      labels: [...] integer 0/1 targets.
      ignore_index: label value whose pixels are ignored.
      smooth: :math:`s \ge 0`.
      exponent: :math:`e`, 1 or 2 (V-Net).

    Returns:
      A float32 scalar in [0, 1].

    References:
      Milletari, Navab and Ahmadi, V-Net, 3DV 2016.
    """
    logits, valid, target = _prepare_binary(logits, labels, ignore_index)
    probs = jnp.where(valid, jax.nn.sigmoid(logits), 0.0)
    tp = jnp.sum(probs * target)
    sum_p = jnp.sum(probs if exponent == 1 else probs ** exponent)
    return 1.0 - _safe_div(2.0 * tp + smooth, sum_p + jnp.sum(target) + smooth, fallback=1.0)


def _lovasz_hinge_flat(logits, valid, target):
    signs = 2.0 * target - 1.0
    # Ignored pixels get error 0: after every positive error, so they add nothing.
    errors = jnp.where(valid, 1.0 - logits * signs, 0.0)
    order = jnp.argsort(errors, descending=True)
    grad = jax.lax.stop_gradient(_lovasz_grad(target[order]))
    return jnp.sum(jax.nn.relu(errors[order]) * grad)


def lovasz_hinge(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    per_image: bool = False,
) -> jax.Array:
    r"""Lovasz hinge: the Lovasz extension of the binary Jaccard loss on hinge errors.

    With signs :math:`s_i = 2y_i - 1`, hinge errors :math:`m_i = 1 - x_i s_i` over valid pixels
    sorted decreasingly by :math:`\pi`, and :math:`\Delta_J` the Jaccard loss of the positive
    class:

    .. math::
      L = \sum_k \max(m_{\pi_k}, 0)\,
          \big(\Delta_J(\{\pi_1..\pi_k\}) - \Delta_J(\{\pi_1..\pi_{k-1}\})\big)

    over all the batch's valid pixels, or per image (leading axis) and averaged with
    ``per_image=True`` (the reference implementation's default for this loss).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([2.0, -1.0, 0.5])
      >>> labels = jnp.array([1, 1, 0])  # errors -1, 2, 1.5
      >>> # sorted 2, 1.5, -1 with Jaccard increments 1/2, 1/6, 1/3: 2/2 + 1.5/6
      >>> print(f'{float(lovasz_hinge(logits, labels)):.4f}')
      1.2500

    Args:
      logits: [...] or [..., 1] logits of the positive class, any float dtype.
      labels: [...] integer 0/1 targets.
      ignore_index: label value whose pixels are ignored.
      per_image: average per-image losses instead of one loss over the batch.

    Returns:
      A float32 scalar; 0.0 with zero gradients when no pixel is valid.

    References:
      Berman, Rannen Triki and Blaschko, The Lovasz-Softmax loss, CVPR 2018;
      https://github.com/bermanmaxim/LovaszSoftmax
    """
    logits, valid, target = _prepare_binary(logits, labels, ignore_index)

    def flat(x, v, t):
        return _lovasz_hinge_flat(x.reshape(-1), v.reshape(-1), t.reshape(-1))

    if per_image:
        return jnp.mean(jax.vmap(flat)(logits, valid, target))
    return flat(logits, valid, target)


# ----------------------------------------------------------------------------- composition

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
