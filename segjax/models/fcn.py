"""FCN (Long et al., 2015, arXiv:1411.4038): 32s/16s/8s skip heads on a VGG or ResNet encoder.

`FCN` is a small VGG (two 3x3 conv-BN-ReLU per stage, five max-pooled stages) that trains from
scratch on a CPU. `FCNResNet` is torchvision's `fcn_resnet50/101` (FCN head on a dilated
ResNet, output stride 8) and, with output_stride=32 and skip=16/8, FCN-16s/8s on a ResNet.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import (
    ConvBNReLU,
    FCNHead,
    aux_logits,
    pad_to_multiple,
    resize_bilinear,
    segmentation_output,
)
from segjax.models.ops import Conv
from segjax.models.resnet import ResNet


class FCN(nn.Module):
    """FCN-`skip` with skip = 32, 16 or 8: scores from stride 32 fused with the stride-16/8 pools.

    Upsampling is bilinear (the paper learns it, initialised bilinear); logits come out at
    input resolution, [B,H,W,num_classes].
    """

    num_classes: int
    base_width: int = 32
    skip: int = 8
    head_width: int = 256
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.skip not in (8, 16, 32):
            raise ValueError(f'FCN skip must be 8, 16 or 32, got {self.skip}')
        x, (height, width) = pad_to_multiple(images.astype(self.dtype), 32)
        pools = {}
        for stage in range(5):
            features = self.base_width * 2 ** min(stage, 3)
            x = ConvBNReLU(features, dtype=self.dtype)(x, train)
            x = ConvBNReLU(features, dtype=self.dtype)(x, train)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            pools[2 ** (stage + 1)] = x
        # The fully convolutional 'fc6/fc7' head on the stride-32 features.
        x = ConvBNReLU(self.head_width, kernel_size=3, dtype=self.dtype)(x, train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        score = Conv(self.num_classes, (1, 1), dtype=self.dtype, name='score32')(x)
        for stride in (16, 8):
            if self.skip > stride:
                continue
            skip = Conv(self.num_classes, (1, 1), dtype=self.dtype,
                           name=f'score{stride}')(pools[stride])
            score = skip + resize_bilinear(score, *skip.shape[1:3])
        logits = resize_bilinear(score, x.shape[1] * 32, x.shape[2] * 32)
        return logits[:, :height, :width].astype(jnp.float32)


FCN8s = functools.partial(FCN, skip=8)
FCN16s = functools.partial(FCN, skip=16)
FCN32s = functools.partial(FCN, skip=32)


class FCNResNet(nn.Module):
    """FCN head (3x3 conv-BN-ReLU, dropout 0.1, 1x1) on ResNet-`depth` layer4.

    Defaults are torchvision's `fcn_resnet50` (output stride 8, head width 2048/4 = 512).
    skip=16/8 adds 1x1 score layers on layer3/layer2 summed in (FCN-16s/8s; meaningful at
    output_stride=32). aux_head adds an FCNHead on layer3 and returns {'logits', 'aux'}.
    """

    num_classes: int
    depth: int = 50
    output_stride: int = 8
    skip: int = 32
    deep_stem: bool = False
    channels: int | None = None  # head width; None = layer4 width / 4 (torchvision)
    dropout: float = 0.1
    aux_head: bool = False
    base_width: int = 64
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array | dict:
        if self.skip not in (8, 16, 32):
            raise ValueError(f'FCN skip must be 8, 16 or 32, got {self.skip}')
        features = ResNet(self.depth, self.output_stride, deep_stem=self.deep_stem,
                          base_width=self.base_width, dtype=self.dtype, remat=self.remat,
                          name='backbone')(images, train)
        x = features['layer4']
        score = FCNHead(self.num_classes, self.channels or x.shape[-1] // 4, self.dropout,
                        dtype=self.dtype, name='head')(x, train)
        for stride, layer in ((16, 'layer3'), (8, 'layer2')):
            if self.skip <= stride:
                skip = Conv(self.num_classes, (1, 1), dtype=self.dtype,
                               name=f'score{stride}')(features[layer])
                score = skip + resize_bilinear(score, *skip.shape[1:3])
        return segmentation_output(score, aux_logits(self, features, train), images.shape[1:3])


FCNResNet50 = functools.partial(FCNResNet, depth=50)
FCNResNet101 = functools.partial(FCNResNet, depth=101)
FCN8sResNet50 = functools.partial(FCNResNet, depth=50, output_stride=32, skip=8)
