"""DeepLabV3 (Chen et al., 2017, arXiv:1706.05587) and DeepLabV3+ (arXiv:1802.02611).

`DeepLabV3` is laid out exactly as torchvision's `deeplabv3_resnet50/101` (ASPP with image
pooling, 1x1 projection + dropout 0.5, 3x3 conv, 1x1 classifier), so its checkpoints load.
Atrous rates are (6, 12, 18) at output stride 16 and doubled, (12, 24, 36), at output stride 8.
`DeepLabV3Plus` adds the paper's decoder: ASPP output upsampled to stride 4, concatenated with
48 projected channels of layer1, two 3x3 convolutions; `separable` makes the dilated ASPP
branches and the decoder convolutions depthwise-separable.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import (
    ConvBN,
    SeparableConvBN,
    aux_logits,
    resize_bilinear,
    segmentation_output,
)
from segjax.models.ops import Conv, spatial_mean
from segjax.models.resnet import ResNet


def atrous_rates(output_stride: int, rates: tuple[int, ...] | None) -> tuple[int, ...]:
    """The given rates, or the paper's (6, 12, 18) scaled to the output stride."""
    if rates is not None:
        return tuple(rates)
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate and image pooling,
    concatenated and projected to `channels` by a 1x1 ConvBN-ReLU and dropout."""

    channels: int = 256
    rates: tuple[int, ...] = (12, 24, 36)
    separable: bool = False
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        branches = [ConvBN(self.channels, 1, dtype=self.dtype, name='branch0')(x, train)]
        for index, rate in enumerate(self.rates, start=1):
            if self.separable:
                branch = SeparableConvBN(self.channels, 3, rate, dtype=self.dtype,
                                         name=f'branch{index}')
            else:
                branch = ConvBN(self.channels, 3, dilation=rate, dtype=self.dtype,
                                name=f'branch{index}')
            branches.append(branch(x, train))
        # Image-level features: global average, 1x1 ConvBN-ReLU, broadcast back.
        pooled = spatial_mean(x)
        pooled = ConvBN(self.channels, 1, dtype=self.dtype, name='pooling')(pooled, train)
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.channels)))
        x = ConvBN(self.channels, 1, dtype=self.dtype, name='project')(
            jnp.concatenate(branches, axis=-1), train)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class DeepLabV3(nn.Module):
    """DeepLabV3 on a dilated ResNet-`depth`; defaults are torchvision's deeplabv3_resnet50."""

    num_classes: int
    depth: int = 50
    output_stride: int = 8
    rates: tuple[int, ...] | None = None  # None: (6, 12, 18) * 16 / output_stride
    multi_grid: tuple[int, ...] | None = None  # e.g. (1, 2, 4) on layer4
    deep_stem: bool = False
    channels: int = 256
    separable: bool = False
    aux_head: bool = False
    base_width: int = 64
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array | dict:
        features = ResNet(self.depth, self.output_stride, self.multi_grid, self.deep_stem,
                          self.base_width, dtype=self.dtype, remat=self.remat,
                          name='backbone')(images, train)
        x = ASPP(self.channels, atrous_rates(self.output_stride, self.rates), self.separable,
                 dtype=self.dtype, name='aspp')(features['layer4'], train)
        x = ConvBN(self.channels, 3, dtype=self.dtype, name='bottleneck')(x, train)
        logits = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
        return segmentation_output(logits, aux_logits(self, features, train), images.shape[1:3])


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: ASPP on layer4 (output stride 16 by default) and a decoder fusing layer1."""

    num_classes: int
    depth: int = 50
    output_stride: int = 16
    rates: tuple[int, ...] | None = None
    multi_grid: tuple[int, ...] | None = None
    deep_stem: bool = False
    channels: int = 256
    low_level_channels: int = 48
    separable: bool = False
    dropout: float = 0.1  # before the classifier
    aux_head: bool = False
    base_width: int = 64
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array | dict:
        features = ResNet(self.depth, self.output_stride, self.multi_grid, self.deep_stem,
                          self.base_width, dtype=self.dtype, remat=self.remat,
                          name='backbone')(images, train)
        x = ASPP(self.channels, atrous_rates(self.output_stride, self.rates), self.separable,
                 dropout=0.1, dtype=self.dtype, name='aspp')(features['layer4'], train)
        low = ConvBN(self.low_level_channels, 1, dtype=self.dtype, name='low_level')(
            features['layer1'], train)
        x = jnp.concatenate([low, resize_bilinear(x, *low.shape[1:3])], axis=-1)
        for index in (1, 2):
            if self.separable:
                x = SeparableConvBN(self.channels, dtype=self.dtype, name=f'decoder{index}')(
                    x, train)
            else:
                x = ConvBN(self.channels, 3, dtype=self.dtype, name=f'decoder{index}')(x, train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
        return segmentation_output(logits, aux_logits(self, features, train), images.shape[1:3])


DeepLabV3ResNet50 = functools.partial(DeepLabV3, depth=50)
DeepLabV3ResNet101 = functools.partial(DeepLabV3, depth=101)
DeepLabV3PlusResNet50 = functools.partial(DeepLabV3Plus, depth=50)
DeepLabV3PlusResNet101 = functools.partial(DeepLabV3Plus, depth=101)
