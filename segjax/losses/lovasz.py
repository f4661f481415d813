"""Lovasz losses: the convex Lovasz extension of the Jaccard loss, on softmax errors
(multi-class) and on hinge errors (one logit channel) (see `segjax.losses`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from segjax.losses._common import _class_mean, _count, _prepare, _prepare_binary


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
