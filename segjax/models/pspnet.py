"""PSPNet (Zhao et al., 2017, arXiv:1612.01105): pyramid pooling on a dilated ResNet.

As mmsegmentation's PSPHead: adaptive average pooling to 1x1, 2x2, 3x3 and 6x6 bins, a 1x1
ConvBN-ReLU per bin, bilinear upsampling back, concatenation with the features, a 3x3
ConvBN-ReLU bottleneck, dropout 0.1 and a 1x1 classifier; output stride 8.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import (
    ConvBN,
    adaptive_avg_pool,
    aux_logits,
    resize_bilinear,
    segmentation_output,
)
from segjax.models.ops import Conv
from segjax.models.resnet import ResNet


class PyramidPooling(nn.Module):
    """The pyramid pooling module: the input and one pooled, projected map per bin size."""

    channels: int = 512
    bins: tuple[int, ...] = (1, 2, 3, 6)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        outputs = [x]
        for bins in self.bins:
            pooled = adaptive_avg_pool(x, bins)
            pooled = ConvBN(self.channels, 1, dtype=self.dtype, name=f'bin{bins}')(pooled, train)
            outputs.append(resize_bilinear(pooled, *x.shape[1:3]))
        return jnp.concatenate(outputs, axis=-1)


class PSPNet(nn.Module):
    """PSPNet on ResNet-`depth` (mmsegmentation's pspnet_r50-d8 with depth=50, deep_stem)."""

    num_classes: int
    depth: int = 50
    output_stride: int = 8
    bins: tuple[int, ...] = (1, 2, 3, 6)
    deep_stem: bool = False
    channels: int = 512
    dropout: float = 0.1
    aux_head: bool = False
    base_width: int = 64
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array | dict:
        features = ResNet(self.depth, self.output_stride, deep_stem=self.deep_stem,
                          base_width=self.base_width, dtype=self.dtype, remat=self.remat,
                          name='backbone')(images, train)
        x = PyramidPooling(self.channels, tuple(self.bins), dtype=self.dtype, name='ppm')(
            features['layer4'], train)
        x = ConvBN(self.channels, 3, dtype=self.dtype, name='bottleneck')(x, train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
        return segmentation_output(logits, aux_logits(self, features, train), images.shape[1:3])


PSPNetResNet50 = functools.partial(PSPNet, depth=50)
PSPNetResNet101 = functools.partial(PSPNet, depth=101)
