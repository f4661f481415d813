"""Pure, jit-safe segmentation losses: `loss(logits, labels, *, ignore_index=255, **options)`.

Every loss returns a float32 scalar averaged over valid (non-ignored) pixels, gives exactly zero
gradient at ignored pixels and stays finite when a batch has no valid pixel. Compose losses as
plain functions (a weighted sum), not through a registry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    class_weights: jax.Array | None = None,
) -> jax.Array:
    r"""Per-pixel softmax cross-entropy with integer labels, averaged over valid pixels.

    With logits :math:`z_i \in \mathbb{R}^C` and label :math:`y_i` at pixel :math:`i`, valid pixels
    :math:`V = \{i : y_i \ne \text{ignore\_index},\ 0 \le y_i < C\}` and class weights :math:`w`
    (all ones by default):

    .. math::
      \ell_i = \log \sum_c e^{z_{ic}} - z_{i y_i}, \qquad
      L = \frac{\sum_{i \in V} w_{y_i} \ell_i}{\sum_{i \in V} w_{y_i}}

    This is PyTorch's ``F.cross_entropy(logits, labels, weight=w, ignore_index=...)`` with
    ``reduction='mean'``. Ignored pixels contribute exactly zero loss and zero gradient; a batch
    with no valid pixel gives 0.0 with finite (zero) gradients. Computed in float32, so bfloat16
    logits are upcast first.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [jnp.log(3.0), 0.0], [5.0, -5.0]])
      >>> labels = jnp.array([0, 0, 255])  # the last pixel is ignored
      >>> print(f'{float(cross_entropy(logits, labels)):.4f}')  # (log 2 + log 4/3) / 2
      0.4904

    Args:
      logits: [..., C] unnormalised scores (e.g. [B, H, W, C]), any float dtype.
      labels: [...] integer class indices (any integer dtype, e.g. uint8).
      ignore_index: label value whose pixels are ignored; labels outside [0, C) are ignored too.
      class_weights: optional [C] per-class weights.

    Returns:
      A float32 scalar.

    References:
      PyTorch, `torch.nn.functional.cross_entropy`,
      https://pytorch.org/docs/stable/generated/torch.nn.functional.cross_entropy.html
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels).astype(jnp.int32)
    num_classes = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f'labels {labels.shape} do not match logits {logits.shape} [..., C]')

    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    # A safe in-range index keeps the gather defined; the mask zeroes those pixels afterwards.
    safe_labels = jnp.where(valid, labels, 0)
    label_logits = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logits

    if class_weights is None:
        weights = valid.astype(jnp.float32)
        # Count in int32: a float32 sum of ones loses exactness past 2**24 pixels.
        denominator = jnp.sum(valid, dtype=jnp.int32).astype(jnp.float32)
    else:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        weights = jnp.where(valid, class_weights[safe_labels], 0.0)
        denominator = jnp.sum(weights)
    # jnp.where rather than a product alone, so a non-finite nll at an ignored pixel stays out.
    total = jnp.sum(jnp.where(valid, weights * nll, 0.0))
    # No valid pixel: total is 0, so 0 / tiny = 0 and the gradient is 0 too, never NaN.
    return total / jnp.maximum(denominator, jnp.finfo(jnp.float32).tiny)
