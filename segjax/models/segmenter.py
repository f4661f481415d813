"""Segmenter (Strudel et al., 2021, arXiv:2105.05633): a ViT encoder and the mask transformer
decoder.

The decoder projects the encoder's patch tokens to `decoder_size`, appends one learned embedding
per class as extra tokens, runs `decoder_depth` pre-norm transformer blocks over all of them and
a LayerNorm, then projects patches and class tokens with two bias-free matrices, L2-normalises
both, and takes their products as class masks [B, h, w, num_classes]; a LayerNorm over the
classes and a bilinear resize to the input give the logits. As the official code
(rstrudel/segmenter, segm/model/decoder.py MaskTransformer): decoder width = the encoder's,
64-dimensional heads, MLP 4x, LayerNorm eps 1e-5, projections initialised at scale
decoder_size ** -0.5, class embeddings truncated normal 0.02.

Variants: `SegmenterViTS16`, `SegmenterViTB16` (the paper's Seg-S/16, Seg-B/16 with the mask
decoder). Parameters: 'backbone' (segjax.models.vit.VisionTransformer, loaded from transformers'
ViT/DINOv2 checkpoints by segjax.pretrained) and 'decode_head'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import vit
from segjax.models.layers import segmentation_output


def _l2_normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class MaskTransformer(nn.Module):
    """Patch tokens [B,h,w,D] -> class masks [B,h,w,num_classes] (before resizing)."""

    num_classes: int
    decoder_size: int | None = None  # None: the encoder's width
    depth: int = 2
    head_dim: int = 64
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches: jax.Array, train: bool) -> jax.Array:
        batch, height, width, _ = patches.shape
        size = self.decoder_size or patches.shape[-1]
        x = vit._dense(size, self.dtype, 'proj_dec')(patches.reshape(batch, height * width, -1))
        classes = self.param('cls_emb', vit.linear_init, (1, self.num_classes, size))
        x = jnp.concatenate(
            [x, jnp.broadcast_to(classes.astype(self.dtype), (batch, self.num_classes, size))],
            axis=1)
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = vit.TransformerBlock(max(size // self.head_dim, 1), self.mlp_ratio,
                                     layer_norm_eps=1e-5, drop_path=rate, dtype=self.dtype,
                                     name=f'block{i}')(x, train)
        x = vit._layer_norm(1e-5, self.dtype, 'decoder_norm')(x)
        scale = nn.initializers.normal(size ** -0.5)
        proj_patch = self.param('proj_patch', scale, (size, size)).astype(self.dtype)
        proj_classes = self.param('proj_classes', scale, (size, size)).astype(self.dtype)
        patch_features = _l2_normalise((x[:, :-self.num_classes] @ proj_patch).astype(jnp.float32))
        class_features = _l2_normalise((x[:, -self.num_classes:] @ proj_classes).astype(
            jnp.float32))
        masks = jnp.einsum('bpd,bcd->bpc', patch_features, class_features)
        masks = vit._layer_norm(1e-5, jnp.float32, 'mask_norm')(masks)
        return masks.reshape(batch, height, width, self.num_classes)


class Segmenter(nn.Module):
    """A ViT encoder ('backbone') and the mask transformer ('decode_head'): float32 logits
    [B,H,W,num_classes] at input resolution. `backbone` is an encoder partial (vit.ViTB16 by
    default); `drop_path_rate` is the encoder's stochastic depth (the paper's 0.1)."""

    num_classes: int
    backbone: Callable[..., nn.Module] = None
    decoder_depth: int = 2
    decoder_size: int | None = None
    drop_path_rate: float = 0.1
    decoder_drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        encoder = (self.backbone or vit.ViTB16)(drop_path_rate=self.drop_path_rate,
                                                dtype=self.dtype, name='backbone')
        masks = MaskTransformer(self.num_classes, self.decoder_size, self.decoder_depth,
                                drop_path_rate=self.decoder_drop_path_rate, dtype=self.dtype,
                                name='decode_head')(encoder(images, train), train)
        return segmentation_output(masks, None, images.shape[1:3])


SegmenterViTS16 = functools.partial(Segmenter, backbone=vit.ViTS16)
SegmenterViTB16 = functools.partial(Segmenter, backbone=vit.ViTB16)
