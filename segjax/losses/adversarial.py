"""Adversarial losses for GAN-based segmentation: a discriminator scores label maps (one logit
per element, real = ground truth, fake = the segmenter's prediction) and the segmenter is trained
to fool it (Luc et al. 2016), or, semi-supervised, to fit its own confident predictions on
unlabelled images (Hung et al. 2018).

Three GAN objectives, each a pair of plain functions

  discriminator loss  (real_logits, fake_logits, *, mask_real=None, mask_fake=None) -> scalar
  generator loss      (fake_logits, *, mask=None) -> scalar

named ``<objective>_discriminator_loss`` / ``<objective>_generator_loss`` for objective ``bce``
(non-saturating), ``hinge`` and ``least_squares``; :class:`AdversarialLoss` bundles a pair so a
config names one value (``bce_gan``, ``hinge_gan``, ``least_squares_gan``), and
:func:`self_training_cross_entropy` is Hung et al.'s masked self-training term.

Every loss is pure and jit-safe, computes in float32 whatever the input dtype, and takes an
optional mask of the logits' shape (bool or float; a nonzero element counts), or of the pixels'
shape for a one-channel map ``[..., 1]``. Masked elements count nowhere, whatever they hold (even
inf/NaN), and get exactly zero gradient; each mean is over its own unmasked elements, and a term
with none is 0.0 with finite zero gradients. Which network a loss trains is the caller's choice:
the discriminator step passes ``stop_gradient`` fakes (or differentiates only the
discriminator's parameters); these functions never cut a gradient except where documented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from segjax.losses._common import _count, _pixel_nll


def _matched(array, shape: tuple[int, ...], name: str) -> jax.Array:
    """`array` with shape `shape`, also accepting a trailing unit axis more or fewer (a
    per-pixel mask for a one-channel map [..., 1], or a [..., 1] map for [...] pixels)."""
    if isinstance(array, Mapping):
        raise TypeError(f'{name}: got a dict (keys {sorted(array)}), expected an array; pass '
                        "the logits themselves, e.g. outputs['logits']")
    array = jnp.asarray(array)
    if array.shape == shape:
        return array
    if array.shape == shape + (1,):
        return array[..., 0]
    if shape[-1:] == (1,) and array.shape == shape[:-1]:
        return array[..., None]
    raise ValueError(f'{name} has shape {array.shape}; expected {shape} (a trailing axis of 1 '
                     'may be added or left out)')


def _counted(mask, shape: tuple[int, ...], name: str) -> jax.Array:
    """bool [shape]: the elements that count (mask nonzero; all of them when mask is None)."""
    if mask is None:
        return jnp.ones(shape, jnp.bool_)
    return _matched(mask, shape, name) != 0


def _scores(logits, mask, name: str) -> tuple[jax.Array, jax.Array]:
    """(float32 discriminator logits zeroed where masked, the bool mask of counted elements)."""
    if isinstance(logits, Mapping):
        raise TypeError(f'got a dict (keys {sorted(logits)}), expected discriminator logits')
    logits = jnp.asarray(logits).astype(jnp.float32)
    counted = _counted(mask, logits.shape, name)
    # Masked elements may hold anything (even inf/NaN): jnp.where's gradient to the unselected
    # branch is an exact zero, so nothing of them reaches the value or its gradient.
    return jnp.where(counted, logits, 0.0), counted


def _masked_mean(values: jax.Array, counted: jax.Array) -> jax.Array:
    """Mean of `values` over the counted elements; 0.0 with zero gradients when none counts."""
    return jnp.sum(jnp.where(counted, values, 0.0)) / jnp.maximum(_count(counted), 1.0)


def _discriminator_loss(real_logits, fake_logits, mask_real, mask_fake,
                        on_real: Callable, on_fake: Callable) -> jax.Array:
    real, counted_real = _scores(real_logits, mask_real, 'mask_real')
    fake, counted_fake = _scores(fake_logits, mask_fake, 'mask_fake')
    return _masked_mean(on_real(real), counted_real) + _masked_mean(on_fake(fake), counted_fake)


def _generator_loss(fake_logits, mask, on_fake: Callable) -> jax.Array:
    fake, counted = _scores(fake_logits, mask, 'mask')
    return _masked_mean(on_fake(fake), counted)


# ----------------------------------------------------------------------------- binary CE (GAN)

def bce_discriminator_loss(
    real_logits: jax.Array,
    fake_logits: jax.Array,
    *,
    mask_real: jax.Array | None = None,
    mask_fake: jax.Array | None = None,
) -> jax.Array:
    r"""The original GAN discriminator loss: binary cross-entropy, real -> 1 and fake -> 0.

    With discriminator logits :math:`r_i` on real and :math:`f_j` on fake elements, each mean
    over its own unmasked elements:

    .. math::
      L_D = \operatorname{mean}_i -\log \sigma(r_i) + \operatorname{mean}_j -\log(1 - \sigma(f_j))

    computed stably as softplus(-r) and softplus(f); each term is PyTorch's
    ``F.binary_cross_entropy_with_logits`` with targets 1 and 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> real = jnp.array([0.0, jnp.log(3.0)])  # sigmoid: 1/2, 3/4
      >>> fake = jnp.array([0.0, 9.0])
      >>> mask_fake = jnp.array([True, False])  # the second fake element counts nowhere
      >>> # (log 2 + log 4/3) / 2 + log 2
      >>> print(f'{float(bce_discriminator_loss(real, fake, mask_fake=mask_fake)):.4f}')
      1.1836

    Args:
      real_logits: discriminator logits on real label maps, any shape and float dtype.
      fake_logits: discriminator logits on predicted label maps, any shape and float dtype.
      mask_real: optional mask of ``real_logits``' shape (bool or float, nonzero counts).
      mask_fake: optional mask of ``fake_logits``' shape.

    Returns:
      A float32 scalar; a term with no unmasked element adds 0.0.

    References:
      Goodfellow et al., Generative Adversarial Nets, NeurIPS 2014; Luc et al., Semantic
      Segmentation using Adversarial Networks, NeurIPS workshop 2016; Hung et al., Adversarial
      Learning for Semi-Supervised Semantic Segmentation, BMVC 2018 (eq. 1).
    """
    return _discriminator_loss(real_logits, fake_logits, mask_real, mask_fake,
                               on_real=lambda r: jax.nn.softplus(-r),
                               on_fake=jax.nn.softplus)


def bce_generator_loss(fake_logits: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    r"""The non-saturating GAN generator loss: make the discriminator call the fakes real.

    .. math::
      L_G = \operatorname{mean}_j -\log \sigma(f_j)

    (rather than the saturating :math:`\log(1 - \sigma(f_j))`), Hung et al.'s adversarial term
    :math:`\mathcal{L}_{adv}`. The gradient flows to ``fake_logits`` (and through them to the
    segmenter).

    Examples:
      >>> import jax.numpy as jnp
      >>> fake = jnp.array([0.0, jnp.log(3.0)])
      >>> print(f'{float(bce_generator_loss(fake)):.4f}')  # (log 2 + log 4/3) / 2
      0.4904

    Args:
      fake_logits: discriminator logits on predicted label maps, any shape and float dtype.
      mask: optional mask of ``fake_logits``' shape (bool or float, nonzero counts).

    Returns:
      A float32 scalar; 0.0 with zero gradients when every element is masked.

    References:
      Goodfellow et al., Generative Adversarial Nets, NeurIPS 2014 (non-saturating loss); Hung
      et al., Adversarial Learning for Semi-Supervised Semantic Segmentation, BMVC 2018 (eq. 4).
    """
    return _generator_loss(fake_logits, mask, on_fake=lambda f: jax.nn.softplus(-f))


# ----------------------------------------------------------------------------- hinge

def hinge_discriminator_loss(
    real_logits: jax.Array,
    fake_logits: jax.Array,
    *,
    mask_real: jax.Array | None = None,
    mask_fake: jax.Array | None = None,
) -> jax.Array:
    r"""The hinge discriminator loss: real scores pushed above 1, fake scores below -1.

    .. math::
      L_D = \operatorname{mean}_i \max(0, 1 - r_i) + \operatorname{mean}_j \max(0, 1 + f_j)

    Examples:
      >>> import jax.numpy as jnp
      >>> real, fake = jnp.array([2.0, 0.5]), jnp.array([-0.5, 1.0])
      >>> print(f'{float(hinge_discriminator_loss(real, fake)):.4f}')  # (0 + .5)/2 + (.5 + 2)/2
      1.5000

    Args:
      real_logits: discriminator scores on real label maps, any shape and float dtype.
      fake_logits: discriminator scores on predicted label maps, any shape and float dtype.
      mask_real: optional mask of ``real_logits``' shape (bool or float, nonzero counts).
      mask_fake: optional mask of ``fake_logits``' shape.

    Returns:
      A float32 scalar; a term with no unmasked element adds 0.0.

    References:
      Lim and Ye, Geometric GAN, 2017; Miyato et al., Spectral Normalization for Generative
      Adversarial Networks, ICLR 2018.
    """
    return _discriminator_loss(real_logits, fake_logits, mask_real, mask_fake,
                               on_real=lambda r: jax.nn.relu(1.0 - r),
                               on_fake=lambda f: jax.nn.relu(1.0 + f))


def hinge_generator_loss(fake_logits: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    r"""The hinge objective's generator loss: raise the discriminator's score of the fakes.

    .. math::
      L_G = -\operatorname{mean}_j f_j

    Examples:
      >>> import jax.numpy as jnp
      >>> print(f'{float(hinge_generator_loss(jnp.array([-0.5, 1.0]))):.4f}')
      -0.2500

    Args:
      fake_logits: discriminator scores on predicted label maps, any shape and float dtype.
      mask: optional mask of ``fake_logits``' shape (bool or float, nonzero counts).

    Returns:
      A float32 scalar (unbounded below); 0.0 with zero gradients when every element is masked.

    References:
      Lim and Ye, Geometric GAN, 2017; Miyato et al., Spectral Normalization for Generative
      Adversarial Networks, ICLR 2018.
    """
    return _generator_loss(fake_logits, mask, on_fake=jnp.negative)


# ----------------------------------------------------------------------------- least squares

def least_squares_discriminator_loss(
    real_logits: jax.Array,
    fake_logits: jax.Array,
    *,
    mask_real: jax.Array | None = None,
    mask_fake: jax.Array | None = None,
) -> jax.Array:
    r"""The least-squares (LSGAN) discriminator loss: real scores regressed to 1, fakes to 0.

    .. math::
      L_D = \tfrac12 \operatorname{mean}_i (r_i - 1)^2 + \tfrac12 \operatorname{mean}_j f_j^2

    Examples:
      >>> import jax.numpy as jnp
      >>> real, fake = jnp.array([1.0, 0.5]), jnp.array([0.0, 0.5])
      >>> # (0 + .25) / 4 + (0 + .25) / 4
      >>> print(f'{float(least_squares_discriminator_loss(real, fake)):.4f}')
      0.1250

    Args:
      real_logits: discriminator scores on real label maps, any shape and float dtype.
      fake_logits: discriminator scores on predicted label maps, any shape and float dtype.
      mask_real: optional mask of ``real_logits``' shape (bool or float, nonzero counts).
      mask_fake: optional mask of ``fake_logits``' shape.

    Returns:
      A float32 scalar; a term with no unmasked element adds 0.0.

    References:
      Mao et al., Least Squares Generative Adversarial Networks, ICCV 2017 (a=0, b=c=1).
    """
    return _discriminator_loss(real_logits, fake_logits, mask_real, mask_fake,
                               on_real=lambda r: 0.5 * jnp.square(r - 1.0),
                               on_fake=lambda f: 0.5 * jnp.square(f))


def least_squares_generator_loss(fake_logits: jax.Array, *,
                                 mask: jax.Array | None = None) -> jax.Array:
    r"""The least-squares (LSGAN) generator loss: fake scores regressed to 1.

    .. math::
      L_G = \tfrac12 \operatorname{mean}_j (f_j - 1)^2

    Examples:
      >>> import jax.numpy as jnp
      >>> fake = jnp.array([0.0, 0.5])
      >>> print(f'{float(least_squares_generator_loss(fake)):.4f}')  # (1 + .25) / 4
      0.3125

    Args:
      fake_logits: discriminator scores on predicted label maps, any shape and float dtype.
      mask: optional mask of ``fake_logits``' shape (bool or float, nonzero counts).

    Returns:
      A float32 scalar; 0.0 with zero gradients when every element is masked.

    References:
      Mao et al., Least Squares Generative Adversarial Networks, ICCV 2017 (c=1).
    """
    return _generator_loss(fake_logits, mask, on_fake=lambda f: 0.5 * jnp.square(f - 1.0))


# ----------------------------------------------------------------------------- named pairs

@dataclasses.dataclass(frozen=True)
class AdversarialLoss:
    """A GAN objective: a discriminator loss and the generator loss that goes with it, so that
    a config names the pair as one value (``config.adversarial.loss = losses.hinge_gan``) and
    a trainer calls ``loss.discriminator(real, fake, ...)`` and ``loss.generator(fake, ...)``."""

    discriminator: Callable[..., jax.Array]
    generator: Callable[..., jax.Array]


bce_gan = AdversarialLoss(bce_discriminator_loss, bce_generator_loss)
hinge_gan = AdversarialLoss(hinge_discriminator_loss, hinge_generator_loss)
least_squares_gan = AdversarialLoss(least_squares_discriminator_loss,
                                    least_squares_generator_loss)


# ----------------------------------------------------------------------------- self-training

def self_training_cross_entropy(
    logits: jax.Array,
    confidence_logits: jax.Array,
    *,
    threshold: float,
    mask: jax.Array | None = None,
) -> jax.Array:
    r"""Hung et al.'s semi-supervised self-training loss: cross-entropy of the segmenter's
    logits against their own argmax, on the pixels the discriminator trusts.

    With logits :math:`z_i \in \mathbb{R}^C`, the pseudo-label :math:`\hat y_i =
    \arg\max_c z_{ic}` (a constant: no gradient), the discriminator's confidence logit
    :math:`d_i` and the kept pixels :math:`K = \{i : \sigma(d_i) > T,\ \text{mask}_i\}`:

    .. math::
      L = \frac{1}{|K|} \sum_{i \in K} -\log \operatorname{softmax}(z_i)_{\hat y_i}

    0.0 with zero gradients when no pixel is kept. The confidence only selects pixels: it gets
    no gradient. The comparison is strict, as in the paper (the reference code keeps
    :math:`\sigma(d_i) \ge T`; they differ only on ties).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[jnp.log(3.0), 0.0], [0.0, jnp.log(7.0)], [0.0, 5.0]])
      >>> confidence = jnp.array([2.0, 3.0, -2.0])  # sigmoid: .88, .95, .12
      >>> # pseudo-labels 0, 1 (p = 3/4, 7/8); the third pixel is not trusted
      >>> print(f'{float(self_training_cross_entropy(logits, confidence, threshold=0.5)):.4f}')
      0.2106

    Args:
      logits: [..., C] the segmenter's logits on unlabelled images, any float dtype.
      confidence_logits: [...] or [..., 1] the discriminator's logits on those predictions, at
        the logits' resolution (resize a coarser map first).
      threshold: :math:`T` in [0, 1] on :math:`\sigma(d)` (the paper's :math:`T_{semi}`: 0.2
        on PASCAL VOC).
      mask: optional [...] (or [..., 1]) mask of pixels that may count (bool or float, nonzero
        counts), e.g. excluding padding.

    Returns:
      A float32 scalar.

    References:
      Hung et al., Adversarial Learning for Semi-Supervised Semantic Segmentation, BMVC 2018
      (eq. 5), https://github.com/hfslyc/AdvSemiSeg
    """
    if isinstance(threshold, (int, float)) and not 0.0 <= threshold <= 1.0:
        raise ValueError(f'threshold={threshold}: expected a probability in [0, 1]')
    if isinstance(logits, Mapping):
        raise TypeError(f'got a dict (keys {sorted(logits)}), expected a logits array [..., C]; '
                        "pass outputs['logits']")
    logits = jnp.asarray(logits).astype(jnp.float32)
    if logits.ndim < 1:
        raise ValueError(f'logits {logits.shape}: expected [..., C]')
    pixels = logits.shape[:-1]
    confidence = jax.lax.stop_gradient(
        _matched(confidence_logits, pixels, 'confidence_logits').astype(jnp.float32))
    kept = (jax.nn.sigmoid(confidence) > threshold) & _counted(mask, pixels, 'mask')
    # As for masked elements above: nothing of a pixel left out reaches the value or gradient.
    logits = jnp.where(kept[..., None], logits, 0.0)
    pseudo_labels = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    _, nll = _pixel_nll(logits, pseudo_labels)
    return _masked_mean(nll, kept)
