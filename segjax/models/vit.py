"""Vision Transformer encoders (ViT, Dosovitskiy et al. 2021; DINOv2, Oquab et al. 2023) and the
linear-probe segmenter on their patch tokens.

`VisionTransformer` is the layout of Hugging Face `transformers`' ViTModel / Dinov2Model /
Dinov2WithRegistersModel, so `segjax.pretrained` loads `google/vit-*` and `facebook/dinov2-*`
checkpoints (tests/test_vit.py compares features with transformers): a non-overlapping patch
embedding, a class token, learned position embeddings for a square grid of `image_size //
patch_size` patches (resized bicubically, in float32, to any other grid exactly as transformers
does: torch's bicubic with a = -0.75, or with `antialias_position=True` the antialiased bicubic
of the registers variant), optional register tokens (Darcet et al. 2024; inserted after the
class token, without position embeddings), pre-norm blocks (attention, GELU MLP; LayerScale when
`layer_scale` is set, as DINOv2) with stochastic depth rising linearly from 0 to
`drop_path_rate` (one draw per example and branch; off at evaluation), and a final LayerNorm.

`ViTLinear` is DINOv2's linear segmentation probe: BatchNorm and a 1x1 convolution on the patch
tokens of one or more blocks (DINOv2's "+ms" setting concatenates the last four), optionally
with the class token appended to every patch, logits resized bilinearly to the input.
`vit_layer_id` gives layer-wise learning-rate decay (segjax.optim's layer_decay) its layers.

Variants: encoders `ViTS16`, `ViTB16`, `DINOv2S14`, `DINOv2B14` (num_registers=4 and
antialias_position=True for DINOv2 with registers: `DINOv2S14Reg`, `DINOv2B14Reg`), linear
probes `ViTLinearB16`, `DINOv2LinearS14`, `DINOv2LinearB14`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.layers import batch_norm, segmentation_output

linear_init = nn.initializers.truncated_normal(0.02)


# ---------------------------------------------------------------------------------------------
# Position embeddings at any grid size: torch's bicubic resize as a matrix per axis.

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` (torch: -0.75, antialiased: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, *, antialias: bool = False) -> np.ndarray:
    """[out_size, in_size] float64 weights of torch's `interpolate(mode='bicubic',
    align_corners=False, antialias=antialias)` along one axis.

    Without antialiasing: output i samples the input at (i + 0.5) * in / out - 0.5 from its four
    neighbours (indices clamped to the edge), a = -0.75. With it (torch's `_upsample_bicubic2d_aa`,
    PIL's filter): a = -0.5, the kernel stretched by in / out when shrinking, weights renormalised.
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            center = scale * (i + 0.5)
            start = max(int(center - support + 0.5), 0)
            stop = min(int(center + support + 0.5), in_size)
            taps = np.arange(start, stop)
            row = _cubic((taps - center + 0.5) / max(scale, 1.0), -0.5)
            weights[i, taps] = row / row.sum()
        else:
            source = scale * (i + 0.5) - 0.5
            base = math.floor(source)
            for tap in range(base - 1, base + 3):
                weights[i, min(max(tap, 0), in_size - 1)] += _cubic(np.array(tap - source),
                                                                    -0.75)
    return weights


def resize_position_embeddings(grid: jax.Array, size: tuple[int, int], *,
                               antialias: bool = False) -> jax.Array:
    """Patch position embeddings [g, g, D] resized bicubically to [*size, D] in float32 (the
    same grid returns them unchanged)."""
    if tuple(grid.shape[:2]) == tuple(size):
        return grid
    rows = jnp.asarray(bicubic_resize_matrix(grid.shape[0], size[0], antialias=antialias),
                       jnp.float32)
    cols = jnp.asarray(bicubic_resize_matrix(grid.shape[1], size[1], antialias=antialias),
                       jnp.float32)
    grid = grid.astype(jnp.float32)
    return jnp.einsum('hg,gkd,wk->hwd', rows, grid, cols, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------
# The encoder.

def _layer_norm(epsilon: float, dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, dtype=dtype, name=name)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=linear_init, dtype=dtype, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens [B, N, D] (softmax in float32)."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, channels = x.shape
        head_dim = channels // self.num_heads

        def heads(name):
            return _dense(channels, self.dtype, name)(x).reshape(batch, tokens, self.num_heads,
                                                                 head_dim)

        query, key, value = heads('query'), heads('key'), heads('value')
        scores = jnp.einsum('bqhd,bkhd->bhqk', query, key) / math.sqrt(head_dim)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
        out = jnp.einsum('bhqk,bkhd->bqhd', weights, value).reshape(batch, tokens, channels)
        return _dense(channels, self.dtype, 'out')(out)


class TransformerBlock(nn.Module):
    """x + DropPath(LayerScale(attention(LN(x)))), then the same with a GELU MLP."""

    num_heads: int
    mlp_ratio: float = 4.0
    layer_scale: float | None = None  # LayerScale's initial value (DINOv2); None: no LayerScale
    layer_norm_eps: float = 1e-6
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        # Stochastic depth: one keep/drop draw per example (dropout broadcast over tokens, D).
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)

        def scaled(y, name):
            if self.layer_scale is None:
                return y
            gamma = self.param(name, nn.initializers.constant(self.layer_scale), (channels,))
            return y * gamma.astype(y.dtype)

        y = SelfAttention(self.num_heads, dtype=self.dtype, name='attention')(
            _layer_norm(self.layer_norm_eps, self.dtype, 'norm1')(x))
        x = x + drop_path(scaled(y, 'layer_scale1'))
        y = _layer_norm(self.layer_norm_eps, self.dtype, 'norm2')(x)
        y = _dense(int(channels * self.mlp_ratio), self.dtype, 'fc1')(y)
        y = _dense(channels, self.dtype, 'fc2')(nn.gelu(y, approximate=False))
        return x + drop_path(scaled(y, 'layer_scale2'))


class VisionTransformer(nn.Module):
    """ViT encoder: images [B,H,W,3] -> patch tokens [B, H//p, W//p, D] after the final norm.

    `layers=(i, ...)` (block indices, negative from the end) returns instead a tuple of
    (patch tokens [B,h,w,D], class token [B,D]) per listed block, each through the final norm
    (DINOv2's `get_intermediate_layers(norm=True)`). Defaults are ViT-B/16 at 224.
    """

    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224  # the position embeddings' native grid is image_size // patch_size
    num_registers: int = 0
    layer_scale: float | None = None
    layer_norm_eps: float = 1e-12  # transformers' ViTConfig; DINOv2 uses 1e-6
    antialias_position: bool = False  # Dinov2WithRegisters resizes with antialias=True
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 layers: Sequence[int] | None = None) -> jax.Array | tuple:
        p, dim = self.patch_size, self.hidden_size
        batch, height, width, channels = images.shape
        grid_h, grid_w = height // p, width // p
        if grid_h == 0 or grid_w == 0:
            raise ValueError(f'VisionTransformer: a {height}x{width} image is smaller than one '
                             f'{p}x{p} patch')
        # Non-overlapping patches as one matmul (a stride-p convolution; the remainder dropped).
        patches = images[:, :grid_h * p, :grid_w * p].astype(self.dtype).reshape(
            batch, grid_h, p, grid_w, p, channels)
        kernel = self.param('patch_embed_kernel', linear_init, (p, p, channels, dim))
        bias = self.param('patch_embed_bias', nn.initializers.zeros, (dim,))
        x = jnp.einsum('bhpwqc,pqcd->bhwd', patches, kernel.astype(self.dtype)) + bias.astype(
            self.dtype)

        native = self.image_size // p
        position = self.param('pos_embed', linear_init, (1, 1 + native * native, dim))
        cls_token = self.param('cls_token', linear_init, (1, 1, dim))
        grid = resize_position_embeddings(position[0, 1:].reshape(native, native, dim),
                                          (grid_h, grid_w), antialias=self.antialias_position)
        x = (x + grid.astype(self.dtype)).reshape(batch, grid_h * grid_w, dim)
        first = jnp.broadcast_to((cls_token + position[:, :1]).astype(self.dtype), (batch, 1, dim))
        tokens = [first]
        if self.num_registers:
            registers = self.param('register_tokens', linear_init, (1, self.num_registers, dim))
            tokens.append(jnp.broadcast_to(registers.astype(self.dtype),
                                           (batch, self.num_registers, dim)))
        x = jnp.concatenate([*tokens, x], axis=1)

        wanted = {i % self.depth for i in (layers if layers is not None else (-1,))}
        norm = _layer_norm(self.layer_norm_eps, self.dtype, 'norm')
        outputs = {}
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = TransformerBlock(self.num_heads, self.mlp_ratio, self.layer_scale,
                                 self.layer_norm_eps, rate, dtype=self.dtype,
                                 name=f'block{i}')(x, train)
            if i in wanted:
                normed = norm(x)
                skip = 1 + self.num_registers
                outputs[i] = (normed[:, skip:].reshape(batch, grid_h, grid_w, dim), normed[:, 0])
        if layers is None:
            return outputs[self.depth - 1][0]
        return tuple(outputs[i % self.depth] for i in layers)


def vit_layer_id(path: str) -> int | None:
    """The layer of a parameter for layer-wise LR decay (`config.optimizer.layer_id_fn`):
    0 for the embeddings (patch, position, class and register tokens), i + 1 for block i of the
    'backbone', None for the final norm and the head (they train at the full rate)."""
    block = re.search(r'(?:^|/)backbone/block(\d+)/', path)
    if block:
        return int(block[1]) + 1
    if re.search(r'(?:^|/)backbone/(patch_embed|pos_embed|cls_token|register_tokens)', path):
        return 0
    return None


# ---------------------------------------------------------------------------------------------
# DINOv2's linear probe.

class LinearHead(nn.Module):
    """BatchNorm then a 1x1 convolution on concatenated token maps (DINOv2's BNHead)."""

    num_classes: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        x = batch_norm(train, self.dtype, name='bn')(features)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                        dtype=self.dtype, name='classifier')(x)


class ViTLinear(nn.Module):
    """A linear segmenter on a ViT's patch tokens: logits [B,H,W,num_classes] at the input size.

    `layers`: the blocks whose (normed) patch tokens are concatenated, (-1,) for the last only,
    (-4, -3, -2, -1) for DINOv2's multi-layer probe; `use_cls_token` appends the class token to
    every patch. `frozen_backbone` runs the encoder in evaluation mode with its outputs under
    stop_gradient (no backward pass through it); pair it with
    `config.optimizer.lr_multipliers={'backbone': 0.0}` so weight decay does not move it either.
    """

    num_classes: int
    backbone: Callable[..., nn.Module] = None  # an encoder partial, e.g. DINOv2B14
    layers: tuple[int, ...] = (-1,)
    use_cls_token: bool = False
    frozen_backbone: bool = False
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        encoder = (self.backbone or ViTB16)(drop_path_rate=self.drop_path_rate,
                                            dtype=self.dtype, name='backbone')
        outputs = encoder(images, train and not self.frozen_backbone, layers=tuple(self.layers))
        maps = []
        for patches, cls_token in outputs:
            maps.append(patches)
            if self.use_cls_token:
                maps.append(jnp.broadcast_to(cls_token[:, None, None], patches.shape))
        features = jnp.concatenate(maps, axis=-1)
        if self.frozen_backbone:
            features = jax.lax.stop_gradient(features)
        logits = LinearHead(self.num_classes, self.dropout, dtype=self.dtype,
                            name='decode_head')(features, train)
        return segmentation_output(logits, None, images.shape[1:3])


ViTS16 = functools.partial(VisionTransformer, patch_size=16, hidden_size=384, depth=12,
                           num_heads=6)
ViTB16 = functools.partial(VisionTransformer, patch_size=16, hidden_size=768, depth=12,
                           num_heads=12)
# DINOv2: 518-pixel position grid (37x37), LayerScale, LayerNorm eps 1e-6.
_DINOV2 = {'patch_size': 14, 'image_size': 518, 'layer_scale': 1e-5, 'layer_norm_eps': 1e-6}
DINOv2S14 = functools.partial(VisionTransformer, hidden_size=384, depth=12, num_heads=6,
                              **_DINOV2)
DINOv2B14 = functools.partial(VisionTransformer, hidden_size=768, depth=12, num_heads=12,
                              **_DINOV2)
DINOv2S14Reg = functools.partial(DINOv2S14, num_registers=4, antialias_position=True)
DINOv2B14Reg = functools.partial(DINOv2B14, num_registers=4, antialias_position=True)

ViTLinearB16 = functools.partial(ViTLinear, backbone=ViTB16)
DINOv2LinearS14 = functools.partial(ViTLinear, backbone=DINOv2S14)
DINOv2LinearB14 = functools.partial(ViTLinear, backbone=DINOv2B14)
