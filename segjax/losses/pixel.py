"""Pixel losses: per-pixel cross-entropy and its hard-mining, focal and boundary-weighted
variants, averaged over the batch's valid pixels (see `segjax.losses`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from segjax.losses._common import (
    _TINY,
    _class_vector,
    _count,
    _declared,
    _is_zero,
    _pixel_nll,
    _prepare,
    _safe_div,
    _safe_pow,
)


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
