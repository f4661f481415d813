"""Discriminators for adversarial segmentation: ground-truth label maps vs predicted ones.

- `PixelDiscriminator` (Hung et al., 2018, "Adversarial Learning for Semi-Supervised Semantic
  Segmentation", arXiv:1802.07934; hfslyc/AdvSemiSeg's `FCDiscriminator`): fully convolutional,
  one confidence logit per pixel of a class-probability map.
- `ImageLabelDiscriminator` (Luc et al., 2016, "Semantic Segmentation using Adversarial
  Networks", arXiv:1611.08408): one real/fake logit per (image, label map) pair.

Both take probabilities (the segmentor's softmax) or one-hot ground truth, [B,H,W,num_classes],
return float32 logits (apply a sigmoid for probabilities), compute at `dtype` with float32
parameters, and accept `train` for the shared model contract although neither uses it (no
BatchNorm, no dropout). Their losses live in the loss library, not here.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.layers import resize_bilinear, torch_padding
from segjax.models.ops import Conv, max_pool_2x2, spatial_mean

# AdvSemiSeg's convolutions: 4x4, stride 2, torch padding=1 on each side. XLA's 'SAME' would pad
# (1, 2) here and shift every output against the reference.
_PIXEL_CONV_PADDING = ((1, 1), (1, 1))
_PIXEL_DEPTH = 5


def _pixel_output_size(size: int) -> int:
    """Side of PixelDiscriminator's logit map: each conv maps s to (s + 2 - 4) // 2 + 1 = s // 2."""
    return size // 2**_PIXEL_DEPTH


class PixelDiscriminator(nn.Module):
    """Hung et al.'s fully-convolutional discriminator: a per-pixel 'is this ground truth' logit.

    Five 4x4 stride-2 convolutions (padding 1) with `features` x (1, 2, 4, 8) channels and then
    1, LeakyReLU(0.2) after all but the last, exactly AdvSemiSeg's FCDiscriminator (submodules
    named as its layers: conv1..conv4, classifier). The logit map, 1/32 of the input's size, is
    resized bilinearly back to the input's H, W with `resize_bilinear` (half-pixel centres, as
    torch's align_corners=False). AdvSemiSeg upsamples in its training script with
    nn.Upsample(mode='bilinear'), which meant align_corners=True on the PyTorch 0.2 it was
    written for and align_corners=False since PyTorch 0.4.
    Inputs must be at least 32 x 32 (smaller ones leave no output pixel).

    Initialisation is flax's default (LeCun normal kernels, zero biases), not PyTorch's.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = PixelDiscriminator(features=8)
      >>> probabilities = jnp.full((2, 32, 48, 3), 1 / 3)
      >>> variables = model.init(jax.random.key(0), probabilities)
      >>> model.apply(variables, probabilities).shape
      (2, 32, 48)
    """

    features: int = 64  # AdvSemiSeg's ndf
    dtype: Any = jnp.float32

    def __call__(self, probabilities: jax.Array, *, train: bool = False) -> jax.Array:
        """[B,H,W,C] class probabilities (or one-hot maps) -> [B,H,W] float32 logits."""
        del train  # no BatchNorm or dropout: accepted for the shared model contract
        logits = self.logits_at_stride_32(probabilities)
        height, width = probabilities.shape[1:3]
        return resize_bilinear(logits[..., None], height, width)[..., 0]

    @nn.compact
    def logits_at_stride_32(self, probabilities: jax.Array) -> jax.Array:
        """The logit map before upsampling, [B, ~H/32, ~W/32] float32 (the network proper)."""
        if probabilities.ndim != 4:
            raise ValueError(f'PixelDiscriminator: probabilities must be [B,H,W,num_classes], '
                             f'got shape {probabilities.shape}')
        height, width = probabilities.shape[1:3]
        if min(_pixel_output_size(height), _pixel_output_size(width)) < 1:
            raise ValueError(f'PixelDiscriminator: input H, W = {height}, {width} is too small '
                             f'for five stride-2 convolutions; expected both at least 32')
        widths = [self.features * 2**level for level in range(_PIXEL_DEPTH - 1)]
        x = probabilities.astype(self.dtype)
        for index, width_here in enumerate(widths, start=1):
            x = Conv(width_here, (4, 4), strides=2, padding=_PIXEL_CONV_PADDING,
                     dtype=self.dtype, name=f'conv{index}')(x)
            x = nn.leaky_relu(x, negative_slope=0.2)
        x = Conv(1, (4, 4), strides=2, padding=_PIXEL_CONV_PADDING, dtype=self.dtype,
                 name='classifier')(x)
        return x[..., 0].astype(jnp.float32)


class ImageLabelDiscriminator(nn.Module):
    """Luc et al.'s discriminator: one real/fake logit per (image, label map) pair.

    Follows the paper's Stanford Background network (its Fig. 3) with widths scaled by
    `features` (64 gives the paper's): `fusion='concat'` runs the label map through a 5x5
    conv (`features`) and the image through 5x5 convs (`features // 4`, then `features`),
    concatenates the two, then 3x3 conv 2f, 2x2 max-pool, 3x3 conv 4f, 2x2 max-pool, 3x3 conv 8f,
    ReLU after each; a 3x3 conv to one channel, averaged over the image, gives the logit.
    `fusion='product'` is the paper's Pascal VOC input encoding: the image multiplied by each
    class channel (3C channels, C blocks of the image's channels) goes through the label branch
    alone; the rest of the network is the same (the paper's VOC trunk was a wider "LargeFOV"
    one). Differences from the paper: one logit with a sigmoid loss instead of a two-way
    softmax (equivalent), the spatial average where the paper's output size went unstated.

    Max-pooling drops an odd last row/column, as torch's MaxPool2d(2); inputs must be at least
    4 x 4. Initialisation is flax's default.
    """

    features: int = 64
    fusion: Literal['concat', 'product'] = 'concat'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, label_maps: jax.Array, *,
                 train: bool = False) -> jax.Array:
        """images [B,H,W,3] (normalised) and label maps [B,H,W,C] -> [B] float32 logits."""
        del train  # no BatchNorm or dropout: accepted for the shared model contract
        self._check_inputs(images, label_maps)
        images = images.astype(self.dtype)
        label_maps = label_maps.astype(self.dtype)
        if self.fusion == 'product':
            # [B,H,W,C,3] -> [B,H,W,3C]: class c's block is the image masked by its probability.
            product = label_maps[..., :, None] * images[..., None, :]
            x = self._conv(self.features, 5, 'label_conv')(product.reshape(*images.shape[:3], -1))
        else:
            labels = self._conv(self.features, 5, 'label_conv')(label_maps)
            image = self._conv(max(self.features // 4, 1), 5, 'image_conv1')(images)
            image = self._conv(self.features, 5, 'image_conv2')(nn.relu(image))
            x = jnp.concatenate([labels, image], axis=-1)
        x = nn.relu(x)
        x = nn.relu(self._conv(2 * self.features, 3, 'conv1')(x))
        x = nn.relu(self._conv(4 * self.features, 3, 'conv2')(_max_pool_floor(x)))
        x = nn.relu(self._conv(8 * self.features, 3, 'conv3')(_max_pool_floor(x)))
        x = self._conv(1, 3, 'classifier')(x)
        return spatial_mean(x.astype(jnp.float32)).reshape(-1)

    def _conv(self, features: int, kernel_size: int, name: str) -> nn.Module:
        return Conv(features, (kernel_size, kernel_size), padding=torch_padding(kernel_size),
                    dtype=self.dtype, name=name)

    def _check_inputs(self, images: jax.Array, label_maps: jax.Array) -> None:
        if self.fusion not in ('concat', 'product'):
            raise ValueError(f"ImageLabelDiscriminator: fusion={self.fusion!r}; expected "
                             f"'concat' or 'product'")
        if images.ndim != 4 or label_maps.ndim != 4 or images.shape[:3] != label_maps.shape[:3]:
            raise ValueError(f'ImageLabelDiscriminator: images {images.shape} and label_maps '
                             f'{label_maps.shape} must be [B,H,W,3] and [B,H,W,num_classes] '
                             f'with the same B, H, W')
        if min(images.shape[1:3]) < 4:
            raise ValueError(f'ImageLabelDiscriminator: H, W = {images.shape[1:3]} is too small '
                             f'for two 2x2 max-pools; expected both at least 4')


def _max_pool_floor(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool that drops an odd last row/column (torch MaxPool2d's floor)."""
    height, width = x.shape[1:3]
    return max_pool_2x2(x[:, :height // 2 * 2, :width // 2 * 2])
