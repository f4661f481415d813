"""FCN (Long et al., 2015, arXiv:1411.4038): a VGG-style encoder with 32s/16s/8s skip heads.

The encoder is a small VGG (two 3x3 conv-BN-ReLU per stage, five max-pooled stages) so the
family trains from scratch on a CPU; the ResNet-backed FCN head comes with the model zoo.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import ConvBNReLU, pad_to_multiple, resize_bilinear


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
        score = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='score32')(x)
        for stride in (16, 8):
            if self.skip > stride:
                continue
            skip = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                           name=f'score{stride}')(pools[stride])
            score = skip + resize_bilinear(score, *skip.shape[1:3])
        logits = resize_bilinear(score, x.shape[1] * 32, x.shape[2] * 32)
        return logits[:, :height, :width].astype(jnp.float32)


FCN8s = functools.partial(FCN, skip=8)
FCN16s = functools.partial(FCN, skip=16)
FCN32s = functools.partial(FCN, skip=32)
