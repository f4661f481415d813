"""ResNet backbones (He et al., 2016, arXiv:1512.03385) laid out exactly like torchvision's.

Variant V1.5 (the stride on the 3x3 convolution), optionally with the V1c deep stem (three 3x3
convolutions, as mmsegmentation's ResNetV1c and timm's `resnet50c`) and dilated last stages for
output stride 16 or 8 (torchvision's `replace_stride_with_dilation`), with DeepLabV3's
multi-grid on the last stage. Parameter names mirror torchvision's state dict (`conv1`, `bn1`,
`layer3_5/conv2`, `layer1_0/downsample_conv`, ...) so `segjax.pretrained` maps them 1:1.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import batch_norm, kaiming_normal, torch_padding
from segjax.models.ops import Conv, max_pool_3x3_stride2

# Blocks per stage; 10 (timm's resnet10t layout, for tiny test models), 18 and 34 use
# BasicBlock, deeper ones Bottleneck.
STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
                101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _conv(features: int, kernel_size: int, strides: int = 1, dilation: int = 1, *,
          dtype: Any, name: str) -> nn.Module:
    return Conv(features, (kernel_size, kernel_size), strides=strides,
                   padding=torch_padding(kernel_size, dilation), kernel_dilation=dilation,
                   use_bias=False, kernel_init=kaiming_normal, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); both dilated in a dilated stage."""

    planes: int
    strides: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        identity = x
        y = _conv(self.planes, 3, self.strides, self.dilation, dtype=self.dtype, name='conv1')(x)
        y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
        y = _conv(self.planes, 3, 1, self.dilation, dtype=self.dtype, name='conv2')(y)
        y = batch_norm(train, self.dtype, 'bn2')(y)
        if self.downsample:
            identity = _conv(self.planes, 1, self.strides, dtype=self.dtype,
                             name='downsample_conv')(x)
            identity = batch_norm(train, self.dtype, 'downsample_bn')(identity)
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand x4 (ResNet-50/101/152, V1.5)."""

    planes: int
    strides: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        identity = x
        y = _conv(self.planes, 1, dtype=self.dtype, name='conv1')(x)
        y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
        y = _conv(self.planes, 3, self.strides, self.dilation, dtype=self.dtype, name='conv2')(y)
        y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
        y = _conv(self.planes * 4, 1, dtype=self.dtype, name='conv3')(y)
        y = batch_norm(train, self.dtype, 'bn3')(y)
        if self.downsample:
            identity = _conv(self.planes * 4, 1, self.strides, dtype=self.dtype,
                             name='downsample_conv')(x)
            identity = batch_norm(train, self.dtype, 'downsample_bn')(identity)
        return nn.relu(y + identity)


def stage_dilations(output_stride: int, num_blocks: tuple[int, ...],
                    multi_grid: tuple[int, ...] | None = None) -> list[tuple[int, list[int]]]:
    """(stride, [dilation per block]) for each of the four stages.

    Like torchvision: a stage whose stride is traded for dilation d runs its first block at the
    previous stage's dilation and the rest at d. Multi-grid (DeepLabV3, e.g. (1, 2, 4)) sets the
    last stage's blocks to d * multi_grid[i].
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride}')
    stages, stride, dilation = [], 4, 1
    for index, blocks in enumerate(num_blocks):
        stage_stride = 1 if index == 0 else 2
        previous = dilation
        if stage_stride == 2 and stride >= output_stride:
            dilation, stage_stride = dilation * 2, 1
        stride *= stage_stride
        dilations = [previous] + [dilation] * (blocks - 1)
        if multi_grid is not None and index == len(num_blocks) - 1:
            if len(multi_grid) != blocks:
                raise ValueError(f'multi_grid {multi_grid} needs one entry per block ({blocks})')
            dilations = [dilation * m for m in multi_grid]
        stages.append((stage_stride, dilations))
    return stages


class ResNet(nn.Module):
    """ResNet-`depth` features: {'layer1': stride 4, 'layer2': 8, 'layer3': min(16, OS),
    'layer4': output_stride}, each [B, h, w, C] in the compute dtype.

    `base_width` 64 is the published model; smaller widths make tiny test models. Input: [B,H,W,3]
    normalised images (ImageNet mean/std, as the config's data.mean/std).
    """

    depth: int = 50
    output_stride: int = 32
    multi_grid: tuple[int, ...] | None = None
    deep_stem: bool = False
    base_width: int = 64
    dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f'ResNet depth must be one of {sorted(STAGE_BLOCKS)}, '
                             f'got {self.depth}')
        block_cls = BasicBlock if self.depth < 50 else Bottleneck
        if self.remat:
            block_cls = nn.remat(block_cls, static_argnums=(2,))  # argument 2 is `train`
        x = images.astype(self.dtype)
        if self.deep_stem:
            # V1c: 3x3 convolutions of width/2, width/2, width instead of one 7x7.
            widths = (self.base_width // 2, self.base_width // 2, self.base_width)
            for index, width in enumerate(widths, start=1):
                x = _conv(width, 3, 2 if index == 1 else 1, dtype=self.dtype,
                          name=f'stem_conv{index}')(x)
                x = nn.relu(batch_norm(train, self.dtype, f'stem_bn{index}')(x))
        else:
            x = _conv(self.base_width, 7, 2, dtype=self.dtype, name='conv1')(x)
            x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
        # Padding with -inf (flax's max_pool default), as torch's MaxPool2d(3, 2, padding=1).
        x = max_pool_3x3_stride2(x)

        features, in_features = {}, self.base_width
        stages = stage_dilations(self.output_stride, STAGE_BLOCKS[self.depth], self.multi_grid)
        for stage, (strides, dilations) in enumerate(stages):
            planes = self.base_width * 2**stage
            for index, dilation in enumerate(dilations):
                block_strides = strides if index == 0 else 1
                downsample = index == 0 and (
                    block_strides != 1 or in_features != planes * block_cls.expansion)
                x = block_cls(planes, block_strides, dilation, downsample, dtype=self.dtype,
                              name=f'layer{stage + 1}_{index}')(x, train)
                in_features = planes * block_cls.expansion
            features[f'layer{stage + 1}'] = x
        return features


class ResNetClassifier(nn.Module):
    """ImageNet classifier: ResNet features, global average pool, `fc`; logits [B, num_classes].

    Exists to check parameter counts and numerical parity against torchvision's classifiers;
    segmentation models use `ResNet` alone, under the name 'backbone'.
    """

    num_classes: int = 1000
    depth: int = 50
    deep_stem: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = ResNet(self.depth, deep_stem=self.deep_stem, dtype=self.dtype,
                   name='backbone')(images, train)['layer4']
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, depth=18)
ResNet50 = functools.partial(ResNet, depth=50)
ResNet101 = functools.partial(ResNet, depth=101)
# mmsegmentation's ResNetV1c (deep stem), the backbone behind its published numbers.
ResNet50V1c = functools.partial(ResNet, depth=50, deep_stem=True)
ResNet101V1c = functools.partial(ResNet, depth=101, deep_stem=True)
