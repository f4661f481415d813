"""Binary losses from one sigmoid logit channel: cross-entropy and soft Dice (the binary
Lovasz hinge is in `segjax.losses.lovasz`) (see `segjax.losses`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from segjax.losses._common import _count, _declared, _prepare_binary, _safe_div


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
