"""CRF-as-RNN (Zheng et al., "Conditional Random Fields as Recurrent Neural Networks", ICCV
2015): any segjax model followed by dense-CRF mean-field inference (segjax.crf.dense_crf), its
kernel weights (and optionally the label compatibility) trained jointly with the network.

    config.model = {'fn': crf_rnn.CRFasRNN,
                    'inner': {'fn': unet.UNet, 'base_width': 16, 'depth': 4},
                    'iterations': 5, 'learn_compatibility': True}

The wrapper passes num_classes and dtype to the inner model. It sees the images the data
pipeline normalised; `mean` and `std` (ImageNet's, as config.data.mean/std's defaults: keep them
equal to config.data's) map them back to RGB 0..255 for the appearance kernel. Its output
replaces the inner model's logits with the CRF's log Q (already normalised, so cross-entropy and
argmax read it as logits); auxiliary outputs of the inner model pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segjax import crf

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class CRFasRNN(nn.Module):
    """`inner` = {'fn': model class, **its options}; the CRF's parameters (flax params, float32):
    'appearance_weight' and 'smoothness_weight' (scalars, initialised to the given values,
    DeepLab-LargeFOV's by default) and, with learn_compatibility, 'compatibility' [C, C]
    initialised to Potts [l != l']. theta_* (pixels, colour levels) are fixed."""

    num_classes: int
    inner: Mapping[str, Any]
    dtype: Any = jnp.float32
    iterations: int = 5
    appearance_weight: float = 4.0
    theta_alpha: float = 121.0
    theta_beta: float = 5.0
    smoothness_weight: float = 3.0
    theta_gamma: float = 3.0
    learn_compatibility: bool = False
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, images, train: bool = False):
        options = dict(self.inner)
        if not callable(options.get('fn')):
            raise ValueError(f"CRFasRNN: inner must be {{'fn': model class, **options}}, got "
                             f'{self.inner!r}')
        network = options.pop('fn')(num_classes=self.num_classes, dtype=self.dtype,
                                    name='inner', **options)
        outputs = network(images, train=train)
        logits = outputs['logits'] if isinstance(outputs, Mapping) else outputs
        scalar = nn.initializers.constant
        appearance_weight = self.param('appearance_weight', scalar(self.appearance_weight), (),
                                       jnp.float32)
        smoothness_weight = self.param('smoothness_weight', scalar(self.smoothness_weight), (),
                                       jnp.float32)
        compatibility = None
        if self.learn_compatibility:
            compatibility = self.param(
                'compatibility', lambda _: 1.0 - jnp.eye(self.num_classes, dtype=jnp.float32))
        rgb = (images.astype(jnp.float32) * jnp.asarray(self.std, jnp.float32)
               + jnp.asarray(self.mean, jnp.float32))
        refined = crf.dense_crf(
            logits, rgb, iterations=self.iterations, appearance_weight=appearance_weight,
            smoothness_weight=smoothness_weight, theta_alpha=self.theta_alpha,
            theta_beta=self.theta_beta, theta_gamma=self.theta_gamma,
            compatibility=compatibility)
        if isinstance(outputs, Mapping):
            return {**outputs, 'logits': refined}
        return refined
