"""Pure, jit-safe segmentation losses: `loss(logits, labels, *, ignore_index=255, **options)`.

Every loss takes logits [..., C] (any float dtype, computed in float32) and integer labels [...],
returns a float32 scalar, gives exactly zero loss and zero gradient at ignored pixels (label
`ignore_index`, or outside [0, C)) whatever their logits hold, and returns 0.0 with zero, finite
gradients when a batch has no valid pixel. Options are keyword-only and never branched on as
array values, so every loss jit-compiles.

Pixel losses average over the batch's valid pixels. Region losses (Dice, Jaccard, Tversky,
Lovasz) are computed per class over all the batch's valid pixels at once, so a data-parallel
batch gives the value of the formula over the global batch, however it is split over devices.

  pixel:       cross_entropy, top_k_cross_entropy, ohem_cross_entropy, focal_loss,
               boundary_cross_entropy
  region:      dice_loss, jaccard_loss, tversky_loss, focal_tversky_loss
  lovasz:      lovasz_softmax, lovasz_hinge (one logit channel)
  binary:      binary_cross_entropy, binary_dice_loss (one logit channel)
  composition: weighted_sum, with_aux (return {'loss': total, <name>: term, ...}; train_step
               logs each term as train/loss/<name>)
  adversarial: GAN losses on discriminator logits, not labels (same float32, masking and
               empty-batch rules, a bool/float mask in place of ignore_index):
               {bce, hinge, least_squares}_discriminator_loss(real, fake, *, mask_real,
               mask_fake), {bce, hinge, least_squares}_generator_loss(fake, *, mask), the pairs
               AdversarialLoss bce_gan / hinge_gan / least_squares_gan, and Hung et al.'s
               self_training_cross_entropy(logits, confidence_logits, *, threshold, mask)
  distillation: a student's logits against a frozen teacher's, the labels a mask only:
               pixelwise_kd(student, teacher, labels, *, temperature) (Hinton et al. 2015),
               pairwise_similarity_kd(student, teacher, labels, *, pool_size) (Liu et al. 2019)
  helper:      label_boundaries (the edge mask boundary_cross_entropy weights)

Each family is a module of this package (`segjax.losses.pixel`, ...); `segjax.losses.<name>` is
the public path of every name, and the one a config should use.

Losses normalised by a count that depends on the batch (cross_entropy, focal_loss,
boundary_cross_entropy, binary_cross_entropy) declare it: called with
``with_denominators=True`` they return ``{'loss': L, 'denominators': ((L, D),)}``, D the label-only
normaliser L divides by, so that gradient accumulation can weight each micro-batch by its share
of the whole batch's D (see `segjax.step.train_step`); the composites pass the flag on to every
term that declares one (:func:`declares_denominators`) and collect ``(w_k L_k, D_k)`` pairs.
"""

import inspect as _inspect

from segjax.losses._common import DENOMINATORS, LossFn, LossSpec, declares_denominators
from segjax.losses.adversarial import (
    AdversarialLoss,
    bce_discriminator_loss,
    bce_gan,
    bce_generator_loss,
    hinge_discriminator_loss,
    hinge_gan,
    hinge_generator_loss,
    least_squares_discriminator_loss,
    least_squares_gan,
    least_squares_generator_loss,
    self_training_cross_entropy,
)
from segjax.losses.binary import binary_cross_entropy, binary_dice_loss
from segjax.losses.composition import weighted_sum, with_aux
from segjax.losses.distillation import pairwise_similarity_kd, pixelwise_kd
from segjax.losses.lovasz import lovasz_hinge, lovasz_softmax
from segjax.losses.pixel import (
    boundary_cross_entropy,
    cross_entropy,
    focal_loss,
    label_boundaries,
    ohem_cross_entropy,
    top_k_cross_entropy,
)
from segjax.losses.region import dice_loss, focal_tversky_loss, jaccard_loss, tversky_loss

__all__ = [
    'DENOMINATORS', 'LossFn', 'LossSpec', 'declares_denominators',
    # pixel
    'cross_entropy', 'top_k_cross_entropy', 'ohem_cross_entropy', 'focal_loss',
    'boundary_cross_entropy', 'label_boundaries',
    # region
    'dice_loss', 'jaccard_loss', 'tversky_loss', 'focal_tversky_loss',
    # lovasz
    'lovasz_softmax', 'lovasz_hinge',
    # binary
    'binary_cross_entropy', 'binary_dice_loss',
    # composition
    'weighted_sum', 'with_aux',
    # adversarial
    'bce_discriminator_loss', 'bce_generator_loss', 'hinge_discriminator_loss',
    'hinge_generator_loss', 'least_squares_discriminator_loss', 'least_squares_generator_loss',
    'AdversarialLoss', 'bce_gan', 'hinge_gan', 'least_squares_gan',
    'self_training_cross_entropy',
    # distillation
    'pixelwise_kd', 'pairwise_similarity_kd',
]

# Public functions name their public home, as numpy's and jax's do, so reprs, pickles, docs
# and doctest.testmod(segjax.losses) find them at segjax.losses.<name> (classes keep theirs).
for _name in __all__:
    if _inspect.isfunction(globals()[_name]):
        globals()[_name].__module__ = __name__
del _name
