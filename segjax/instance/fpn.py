"""ResNet + Feature Pyramid Network (Lin et al. 2017), torchvision's `resnet_fpn_backbone`.

`ResNetFPN` returns {'p2', 'p3', 'p4', 'p5', 'p6'} at strides 4..64, `fpn_channels` wide:
P2-P5 from the top-down pathway over ResNet's C2..C5 (layer1..layer4), P6 a stride-2
subsampling of P5 (torchvision's `LastLevelMaxPool`, named 'pool' there; only the RPN uses it).

BatchNorm is frozen as torchvision's `FrozenBatchNorm2d`: the ResNet always normalises with its
stored statistics, in training too, and `trainable_mask` marks its scale/bias (buffers in
torchvision) and the first `5 - trainable_layers` stages as not trainable, for the optimizer.
Module names mirror torchvision's (`body` = its `backbone.body`, `fpn/inner{i}` and
`fpn/layer{i}` = `fpn.inner_blocks.{i}.0` and `fpn.layer_blocks.{i}.0`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.layers import torch_padding
from segjax.models.ops import Conv
from segjax.models.resnet import ResNet

# torchvision's FPN init: kaiming_uniform_(a=1), i.e. uniform with variance 1 / fan_in.
_fpn_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
LEVELS = ('p2', 'p3', 'p4', 'p5', 'p6')


def upsample_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
    """`F.interpolate(x, size=(height, width), mode='nearest')` on NHWC: output pixel i copies
    input pixel min(floor(i * in / out), in - 1) (a 2x upsampling repeats every pixel)."""

    def source(out_size: int, in_size: int) -> np.ndarray:
        scale = np.float32(in_size) / np.float32(out_size)
        index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
        return np.minimum(index, in_size - 1)

    return x[:, source(height, x.shape[1])][:, :, source(width, x.shape[2])]


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest 2x top-down sums, 3x3 output convs (all with bias, no norm)
    over [C2, C3, C4, C5] (finest first); returns [P2, P3, P4, P5]."""

    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
        def conv(kernel: int, name: str) -> nn.Module:
            return Conv(self.channels, (kernel, kernel), padding=torch_padding(kernel),
                        kernel_init=_fpn_init, dtype=self.dtype, name=name)

        last = len(features) - 1
        inner = conv(1, f'inner{last}')(features[last])
        outputs = [conv(3, f'layer{last}')(inner)]
        for index in range(last - 1, -1, -1):
            lateral = conv(1, f'inner{index}')(features[index])
            inner = lateral + upsample_nearest(inner, *lateral.shape[1:3])
            outputs.insert(0, conv(3, f'layer{index}')(inner))
        return outputs


class ResNetFPN(nn.Module):
    """ResNet-`depth` (frozen BatchNorm) + FPN: {'p2'..'p6'} [B, h, w, fpn_channels].

    Input: [B, H, W, 3] images normalised with ImageNet mean/std (torchvision's
    GeneralizedRCNNTransform does that before its backbone), H and W multiples of 32 so every
    level is exactly half the previous one. `train` is accepted for the model contract; the
    frozen BatchNorm makes train and eval compute the same thing.
    """

    depth: int = 50
    base_width: int = 64
    fpn_channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        del train  # FrozenBatchNorm2d: never batch statistics, never updated statistics
        stages = ResNet(self.depth, base_width=self.base_width, dtype=self.dtype,
                        name='body')(images, train=False)
        pyramid = FPN(self.fpn_channels, dtype=self.dtype, name='fpn')(
            [stages[f'layer{i}'] for i in range(1, 5)])
        # LastLevelMaxPool: max_pool2d(kernel 1, stride 2) is a plain subsampling.
        pyramid.append(pyramid[-1][:, ::2, ::2])
        return dict(zip(LEVELS, pyramid, strict=True))


ResNet50FPN = functools.partial(ResNetFPN, depth=50)


def trainable_mask(params: dict, trainable_layers: int = 3) -> dict:
    """Bool tree over ResNetFPN `params`: True where torchvision trains the parameter.

    As `torchvision.models.detection.backbone_utils._resnet_fpn_extractor`: the FPN trains; of
    the ResNet, only the last `trainable_layers` of (layer4, layer3, layer2, layer1, conv1)
    train (3 for Mask R-CNN), and never a BatchNorm scale/bias (FrozenBatchNorm2d buffers;
    with 5 trainable layers torchvision also trains bn1, which is a buffer all the same).
    Use with `optax.masked` or `optax.multi_transform` to freeze the rest.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f'trainable_mask: trainable_layers must be in 0..5, '
                         f'got {trainable_layers}')
    trained = ('layer4', 'layer3', 'layer2', 'layer1', 'conv1')[:trainable_layers]

    def mark(path: tuple, _: Any) -> bool:
        names = [getattr(key, 'key', str(key)) for key in path]
        if 'body' not in names:
            return True
        module = names[names.index('body') + 1]
        # BatchNorm modules are the ones named *bn*; the ResNet's convolutions have no bias.
        return module.split('_')[0] in trained and 'bn' not in names[-2]

    return jax.tree_util.tree_map_with_path(mark, params)
