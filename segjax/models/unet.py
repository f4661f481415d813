"""U-Net (Ronneberger et al., 2015, arXiv:1505.04597) with BatchNorm and 'same' padding."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import ConvBNReLU, RematConvBNReLU, pad_to_multiple
from segjax.models.ops import Conv, ConvTranspose2x2, max_pool_2x2


class UNet(nn.Module):
    """Encoder-decoder with skip connections; widths base_width * 2**level, `depth` poolings.

    Any input size works: the image is zero-padded to a multiple of 2**depth and the logits are
    cropped back, so the output is [B,H,W,num_classes] at input resolution.
    """

    num_classes: int
    base_width: int = 64
    depth: int = 4
    dtype: Any = jnp.float32
    remat: bool = False  # recompute conv activations in the backward pass to save memory

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x, (height, width) = pad_to_multiple(images.astype(self.dtype), 2**self.depth)
        skips = []
        for level in range(self.depth):
            x = self._double_conv(x, self.base_width * 2**level, train)
            skips.append(x)
            x = max_pool_2x2(x)
        x = self._double_conv(x, self.base_width * 2**self.depth, train)
        for level in reversed(range(self.depth)):
            width_here = self.base_width * 2**level
            x = ConvTranspose2x2(width_here, dtype=self.dtype)(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = self._double_conv(x, width_here, train)
        logits = Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
        return logits[:, :height, :width].astype(jnp.float32)

    def _double_conv(self, x: jax.Array, features: int, train: bool) -> jax.Array:
        block = RematConvBNReLU if self.remat else ConvBNReLU
        x = block(features, dtype=self.dtype)(x, train)
        return block(features, dtype=self.dtype)(x, train)


# The paper's width; the small variant is what trains in minutes on a CPU.
UNetClassic = functools.partial(UNet, base_width=64, depth=4)
UNetSmall = functools.partial(UNet, base_width=16, depth=4)
