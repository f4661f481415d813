"""SegNet (Badrinarayanan et al., 2017, arXiv:1511.00561): unpooling with max-pooling indices.

The encoder is VGG16-BN's 13 convolutions (2, 2, 3, 3, 3 per stage, widths 64..512); each 2x2
max-pool remembers which of the four pixels won, and the mirrored decoder puts every value back
at that position (zeros elsewhere) before its convolutions densify the map. No skip features
are copied, only the indices.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import ConvBN, pad_to_multiple, torch_padding
from segjax.models.ops import Conv

STAGE_CONVS = (2, 2, 3, 3, 3)  # VGG16


def _windows(x: jax.Array) -> jax.Array:
    """[B,H,W,C] -> [B,H/2,W/2,C,4]: the four pixels of every 2x2 window, last."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


def max_pool_with_indices(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2x2 stride-2 max pooling; also returns, per output value, which window pixel (0-3) won."""
    windows = _windows(x)
    indices = jnp.argmax(windows, axis=-1)
    return jnp.take_along_axis(windows, indices[..., None], axis=-1)[..., 0], indices


def max_unpool(x: jax.Array, indices: jax.Array) -> jax.Array:
    """Inverse of `max_pool_with_indices`: [B,h,w,C] -> [B,2h,2w,C], each value at its index."""
    b, h, w, c = x.shape
    windows = jax.nn.one_hot(indices, 4, dtype=x.dtype) * x[..., None]
    return windows.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(
        b, 2 * h, 2 * w, c)


class SegNet(nn.Module):
    """SegNet with widths base_width * (1, 2, 4, 8, 8); base_width 64 is the paper's model."""

    num_classes: int
    base_width: int = 64
    stage_convs: tuple[int, ...] = STAGE_CONVS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        num_stages = len(self.stage_convs)
        x, (height, width) = pad_to_multiple(images.astype(self.dtype), 2**num_stages)
        widths = [self.base_width * 2 ** min(stage, 3) for stage in range(num_stages)]
        indices = []
        for stage, convs in enumerate(self.stage_convs):
            for index in range(convs):
                x = ConvBN(widths[stage], dtype=self.dtype,
                           name=f'encoder{stage + 1}_{index + 1}')(x, train)
            x, stage_indices = max_pool_with_indices(x)
            indices.append(stage_indices)
        for stage in reversed(range(num_stages)):
            x = max_unpool(x, indices[stage])
            convs = self.stage_convs[stage]
            for index in range(convs if stage else convs - 1):
                # The last convolution of a stage narrows to the next (shallower) stage's width.
                last = index == convs - 1
                features = widths[max(stage - 1, 0)] if last else widths[stage]
                x = ConvBN(features, dtype=self.dtype,
                           name=f'decoder{stage + 1}_{index + 1}')(x, train)
        # The paper's final decoder layer is a 3x3 convolution straight to class scores.
        logits = Conv(self.num_classes, (3, 3), padding=torch_padding(3), dtype=self.dtype,
                         name='classifier')(x)
        return logits[:, :height, :width].astype(jnp.float32)


SegNetVGG16 = functools.partial(SegNet, base_width=64)
