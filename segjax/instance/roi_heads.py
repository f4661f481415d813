"""Mask R-CNN's RoI heads (He et al. 2017) as torchvision builds them for the R50-FPN model.

Box branch: `TwoMLPHead` (fc6, fc7, ReLU) on 7x7 RoIAlign features, then `FastRCNNPredictor`
(class logits and per-class box deltas). Mask branch: `MaskRCNNHeads` (four 3x3 convs + ReLU) on
14x14 features, then `MaskRCNNPredictor` (2x2 stride-2 transposed conv + ReLU, 1x1 conv to one
28x28 mask logit map per class). Module and parameter names follow torchvision's
`roi_heads.{box_head,box_predictor,mask_head,mask_predictor}` so loading is a rename
(`torchvision_weights.load_roi_heads`), and the initialisers are torchvision's.

Every head takes RoI features with any leading shape ([..., h, w, C], e.g. [B, R, 7, 7, 256]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import torch_padding
from segjax.models.ops import Conv, ConvTranspose2x2

# nn.Linear / nn.Conv2d defaults: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_torch_default_kernel = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
# MaskRCNNHeads / MaskRCNNPredictor: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # untruncated


def _torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """nn.Linear / nn.Conv2d's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_torch_default_kernel,
                    bias_init=_torch_default_bias(fan_in), dtype=dtype, name=name)


class TwoMLPHead(nn.Module):
    """fc6 + ReLU, fc7 + ReLU over flattened RoI features [..., h, w, C] -> [..., size].

    Features flatten in torchvision's (C, h, w) order, so fc6's weights load unchanged (one
    transpose of the RoI features instead of permuting the 12544 x 1024 matrix at load time).
    """

    representation_size: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        leading = features.shape[:-3]
        x = jnp.moveaxis(features, -1, -3).reshape(*leading, -1)
        x = nn.relu(_dense(self.representation_size, x.shape[-1], self.dtype, 'fc6')(x))
        return nn.relu(_dense(self.representation_size, self.representation_size, self.dtype,
                              'fc7')(x))


class FastRCNNPredictor(nn.Module):
    """(class logits [..., num_classes], box deltas [..., num_classes, 4]) from [..., D]:
    torchvision's cls_score and bbox_pred (its [.., num_classes * 4] output, class-major)."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        fan_in = x.shape[-1]
        logits = _dense(self.num_classes, fan_in, self.dtype, 'cls_score')(x)
        deltas = _dense(self.num_classes * 4, fan_in, self.dtype, 'bbox_pred')(x)
        return logits, deltas.reshape(*x.shape[:-1], self.num_classes, 4)


def _as_images(features: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """[..., h, w, C] -> ([N, h, w, C], leading shape) for 2-D convolutions."""
    leading = features.shape[:-3]
    return features.reshape(-1, *features.shape[-3:]), leading


class MaskRCNNHeads(nn.Module):
    """3x3 conv (bias, padding 1) + ReLU per entry of `layers`: [..., 14, 14, C] ->
    [..., 14, 14, layers[-1]]. Modules `mask_fcn1`.. (torchvision's mask_head.{i}.0)."""

    layers: tuple[int, ...] = (256, 256, 256, 256)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x, leading = _as_images(features)
        for index, width in enumerate(self.layers):
            x = nn.relu(Conv(width, (3, 3), padding=torch_padding(3), kernel_init=_kaiming_fan_out,
                             dtype=self.dtype, name=f'mask_fcn{index + 1}')(x))
        return x.reshape(*leading, *x.shape[1:])


class MaskRCNNPredictor(nn.Module):
    """conv5_mask (2x2 transposed conv, stride 2) + ReLU, then mask_fcn_logits (1x1 conv):
    [..., 14, 14, C] -> mask logits [..., 28, 28, num_classes]."""

    num_classes: int
    dim_reduced: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x, leading = _as_images(features)
        # ConvTranspose2x2 keeps flax's nn.ConvTranspose kernel layout (the loader flips
        # torchvision's); its bias init is zero where torchvision's default is uniform.
        x = nn.relu(ConvTranspose2x2(self.dim_reduced, dtype=self.dtype, name='conv5_mask')(x))
        x = Conv(self.num_classes, (1, 1), kernel_init=_kaiming_fan_out,
                 bias_init=_torch_default_bias(self.dim_reduced), dtype=self.dtype,
                 name='mask_fcn_logits')(x)
        return x.reshape(*leading, *x.shape[1:])
