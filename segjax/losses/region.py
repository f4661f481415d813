"""Region losses: soft Dice, Jaccard, Tversky and focal Tversky, per class over the whole
batch's valid pixels (see `segjax.losses`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from segjax.losses._common import _class_mean, _count, _prepare, _safe_div, _safe_pow


def _soft_counts(logits, valid, safe):
    """(probabilities zeroed at invalid pixels, per-class soft TP, per-class label count, axes)."""
    probs = jnp.where(valid[..., None], jax.nn.softmax(logits, axis=-1), 0.0)
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.bool_) & valid[..., None]
    axes = tuple(range(probs.ndim - 1))
    tp = jnp.sum(jnp.where(onehot, probs, 0.0), axis=axes)
    return probs, tp, _count(onehot, axis=axes), axes



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
