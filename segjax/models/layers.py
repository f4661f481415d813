"""Blocks shared by the model families."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvBNReLU(nn.Module):
    """3x3 (by default) convolution, BatchNorm, ReLU: the workhorse of every encoder here."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(self.features, (self.kernel_size,) * 2, strides=self.strides,
                    kernel_dilation=self.dilation, padding='SAME', use_bias=False,
                    dtype=self.dtype)(x)
        # BN statistics are computed in float32 even for bfloat16 activations.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype)(x)
        return nn.relu(x)


def pad_to_multiple(images: jax.Array, multiple: int) -> tuple[jax.Array, tuple[int, int]]:
    """Pads [B,H,W,C] bottom/right with zeros to multiples of `multiple`; returns the old H, W."""
    height, width = images.shape[1:3]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return images, (height, width)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of [B,h,w,C] to [B,height,width,C] (half-pixel centres, like TF2/torch)."""
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), 'bilinear')
