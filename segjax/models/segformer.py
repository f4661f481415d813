"""SegFormer (Xie et al., 2021, arXiv:2105.15203): Mix Transformer encoders and the all-MLP decoder.

`MixTransformer` (MiT) is four stages, each an overlapping patch embedding (a strided convolution
with symmetric padding, then LayerNorm), `depth` transformer blocks and a LayerNorm. A block is
pre-norm efficient self-attention (keys and values from a sequence shrunk `sr_ratio` x per side
by a strided convolution + LayerNorm) and a Mix-FFN (linear, 3x3 depthwise convolution, GELU,
linear), each residual with stochastic depth rising linearly from 0 to `drop_path_rate` over
all blocks. Stage outputs are at strides 4, 8, 16, 32.
`SegFormer` adds the all-MLP decoder: one linear layer per stage to `decoder_channels`, bilinear
upsampling to stride 4, concatenation (deepest stage first), a 1x1 ConvBN-ReLU fusion, dropout and
a 1x1 classifier; the stride-4 logits are resized to the input like every segjax model.

The layout is Hugging Face `transformers`' SegformerForSemanticSegmentation (its LayerNorms use
eps 1e-5; the official code's blocks use 1e-6), so `segjax.pretrained` loads `nvidia/mit-b*`
and `nvidia/segformer-b*` checkpoints; tests/test_segformer.py compares logits with it.
Variants: `MiTB0`..`MiTB5` (encoders) and `SegFormerB0`..`SegFormerB5`; `SegFormer` alone is B0.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import (
    batch_norm,
    kaiming_normal,
    resize_bilinear,
    segmentation_output,
)
from segjax.models.ops import Conv

# The paper's Table 6: channels and blocks per stage; heads (1, 2, 5, 8), reduction ratios
# (8, 4, 2, 1), MLP ratio 4 and patch sizes 7/3/3/3 (strides 4/2/2/2) are the same for all.
MIT_B0 = {'hidden_sizes': (32, 64, 160, 256), 'depths': (2, 2, 2, 2)}
MIT_B1 = {'hidden_sizes': (64, 128, 320, 512), 'depths': (2, 2, 2, 2)}
MIT_B2 = {'hidden_sizes': (64, 128, 320, 512), 'depths': (3, 4, 6, 3)}
MIT_B3 = {'hidden_sizes': (64, 128, 320, 512), 'depths': (3, 4, 18, 3)}
MIT_B4 = {'hidden_sizes': (64, 128, 320, 512), 'depths': (3, 8, 27, 3)}
MIT_B5 = {'hidden_sizes': (64, 128, 320, 512), 'depths': (3, 6, 40, 3)}

# The official code's initialisation: linear layers truncated normal 0.02, convolutions normal
# with variance 2 / fan_out (fan_out counts one group's output channels), norms 1 and 0.
linear_init = nn.initializers.truncated_normal(0.02)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=linear_init, dtype=dtype, name=name)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it: the default E[x^2] - E[x]^2 loses digits.
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


class EfficientSelfAttention(nn.Module):
    """Multi-head attention of every token to a sequence reduced `sr_ratio` x per side."""

    num_heads: int
    sr_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        head_dim = channels // self.num_heads
        query = _dense(channels, self.dtype, 'query')(x).reshape(batch, -1, self.num_heads,
                                                                 head_dim)
        context = x
        if self.sr_ratio > 1:
            if min(height, width) < self.sr_ratio:
                raise ValueError(f'SegFormer: a {height}x{width} feature map is smaller than its '
                                 f'sequence reduction ratio {self.sr_ratio}: use inputs of at '
                                 'least 32x32 pixels')
            context = Conv(channels, (self.sr_ratio,) * 2, strides=self.sr_ratio,
                           padding='VALID', kernel_init=kaiming_normal, dtype=self.dtype,
                           name='sr')(x)
            context = _layer_norm(self.dtype, 'sr_norm')(context)
        key = _dense(channels, self.dtype, 'key')(context).reshape(batch, -1, self.num_heads,
                                                                   head_dim)
        value = _dense(channels, self.dtype, 'value')(context).reshape(batch, -1,
                                                                       self.num_heads, head_dim)
        scores = jnp.einsum('bqhd,bkhd->bhqk', query, key) / math.sqrt(head_dim)
        # Softmax in float32 even for bfloat16 activations, as transformers does.
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
        out = jnp.einsum('bhqk,bkhd->bqhd', weights, value).reshape(batch, height, width,
                                                                     channels)
        return _dense(channels, self.dtype, 'out')(out)


class MixFFN(nn.Module):
    """Linear to `hidden` channels, 3x3 depthwise convolution (SegFormer's positional cue in
    place of position embeddings), exact GELU, linear back."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = _dense(self.hidden, self.dtype, 'fc1')(x)
        x = Conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=self.hidden,
                 kernel_init=nn.initializers.normal(math.sqrt(2.0 / 9)), dtype=self.dtype,
                 name='dwconv')(x)
        x = nn.gelu(x, approximate=False)
        return _dense(channels, self.dtype, 'fc2')(x)


class MiTBlock(nn.Module):
    """x + DropPath(attention(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    num_heads: int
    sr_ratio: int
    mlp_ratio: int = 4
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Stochastic depth: one keep/drop draw per example (dropout broadcast over H, W, C).
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
        y = EfficientSelfAttention(self.num_heads, self.sr_ratio, dtype=self.dtype,
                                   name='attention')(_layer_norm(self.dtype, 'norm1')(x))
        x = x + drop_path(y)
        y = MixFFN(x.shape[-1] * self.mlp_ratio, dtype=self.dtype, name='mlp')(
            _layer_norm(self.dtype, 'norm2')(x))
        return x + drop_path(y)


class MixTransformer(nn.Module):
    """The MiT encoder: [B,H,W,3] -> the four stage outputs [B,H/s,W/s,C_s], s = 4, 8, 16, 32
    (rounded up). Defaults are MiT-B0."""

    hidden_sizes: tuple[int, ...] = MIT_B0['hidden_sizes']
    depths: tuple[int, ...] = MIT_B0['depths']
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    drop_path_rate: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        total = sum(self.depths)
        # Stochastic depth rises linearly from 0 (first block) to drop_path_rate (last block).
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        x, outputs, block_index = images.astype(self.dtype), [], 0
        for stage, (channels, depth) in enumerate(zip(self.hidden_sizes, self.depths,
                                                      strict=True)):
            patch = self.patch_sizes[stage]
            x = Conv(channels, (patch, patch), strides=self.strides[stage],
                     padding=((patch // 2,) * 2,) * 2, kernel_init=kaiming_normal,
                     dtype=self.dtype, name=f'patch_embed{stage}')(x)
            x = _layer_norm(self.dtype, f'patch_embed{stage}_norm')(x)
            for block in range(depth):
                x = MiTBlock(self.num_heads[stage], self.sr_ratios[stage], self.mlp_ratio,
                             rates[block_index], dtype=self.dtype,
                             name=f'block{stage}_{block}')(x, train)
                block_index += 1
            x = _layer_norm(self.dtype, f'norm{stage}')(x)
            outputs.append(x)
        return tuple(outputs)


class AllMLPDecoder(nn.Module):
    """SegFormer's head: stage outputs -> logits at the first stage's resolution (stride 4)."""

    num_classes: int
    channels: int = 256
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: tuple[jax.Array, ...], train: bool) -> jax.Array:
        size = features[0].shape[1:3]
        projected = []
        for index, feature in enumerate(features):
            x = _dense(self.channels, self.dtype, f'linear_c{index}')(feature)
            projected.append(resize_bilinear(x, *size))
        x = jnp.concatenate(projected[::-1], axis=-1)  # deepest stage first, as the original
        x = Conv(self.channels, (1, 1), use_bias=False, kernel_init=kaiming_normal,
                 dtype=self.dtype, name='linear_fuse')(x)
        x = nn.relu(batch_norm(train, self.dtype, name='bn')(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.01),
                    dtype=self.dtype, name='classifier')(x)


class SegFormer(nn.Module):
    """SegFormer: a MiT encoder ('backbone') and the all-MLP decoder ('decode_head').

    Returns float32 logits [B,H,W,num_classes] at input resolution (the decoder's stride-4
    logits resized bilinearly). Defaults are SegFormer-B0 (decoder 256 wide; B2-B5 use 768).
    `strides=(2, 2, 2, 2)` halves every stage's stride (for tiny images; not the paper's).
    """

    num_classes: int
    hidden_sizes: tuple[int, ...] = MIT_B0['hidden_sizes']
    depths: tuple[int, ...] = MIT_B0['depths']
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)  # the decoder predicts at the first stage's stride
    drop_path_rate: float = 0.1
    decoder_channels: int = 256
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        features = MixTransformer(tuple(self.hidden_sizes), tuple(self.depths),
                                  tuple(self.num_heads), tuple(self.sr_ratios), self.mlp_ratio,
                                  tuple(self.patch_sizes), tuple(self.strides),
                                  drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                                  name='backbone')(images, train)
        logits = AllMLPDecoder(self.num_classes, self.decoder_channels, self.dropout,
                               dtype=self.dtype, name='decode_head')(features, train)
        return segmentation_output(logits, None, images.shape[1:3])


MiTB0 = functools.partial(MixTransformer, **MIT_B0)
MiTB1 = functools.partial(MixTransformer, **MIT_B1)
MiTB2 = functools.partial(MixTransformer, **MIT_B2)
MiTB3 = functools.partial(MixTransformer, **MIT_B3)
MiTB4 = functools.partial(MixTransformer, **MIT_B4)
MiTB5 = functools.partial(MixTransformer, **MIT_B5)
SegFormerB0 = functools.partial(SegFormer, **MIT_B0, decoder_channels=256)
SegFormerB1 = functools.partial(SegFormer, **MIT_B1, decoder_channels=256)
SegFormerB2 = functools.partial(SegFormer, **MIT_B2, decoder_channels=768)
SegFormerB3 = functools.partial(SegFormer, **MIT_B3, decoder_channels=768)
SegFormerB4 = functools.partial(SegFormer, **MIT_B4, decoder_channels=768)
SegFormerB5 = functools.partial(SegFormer, **MIT_B5, decoder_channels=768)
