"""Blocks shared by the model families."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.ops import BatchNorm, Conv


class ConvBNReLU(nn.Module):
    """3x3 (by default) convolution, BatchNorm, ReLU: the workhorse of every encoder here."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, (self.kernel_size,) * 2, strides=self.strides,
                    kernel_dilation=self.dilation, padding='SAME', use_bias=False,
                    dtype=self.dtype)(x)
        # BN statistics are computed in float32 even for bfloat16 activations.
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=self.dtype)(x)
        return nn.relu(x)


# Recomputes its activations in the backward pass (argument 2 is `train`, a Python bool).
RematConvBNReLU = nn.remat(ConvBNReLU, static_argnums=(2,))


def pad_to_multiple(images: jax.Array, multiple: int) -> tuple[jax.Array, tuple[int, int]]:
    """Pads [B,H,W,C] bottom/right with zeros to multiples of `multiple`; returns the old H, W."""
    height, width = images.shape[1:3]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return images, (height, width)


def resize_bilinear(x: jax.Array, *size: int) -> jax.Array:
    """Bilinear resize of [B,h,w,C] to [B,*size,C]: the one resize convention of segjax.

    Half-pixel centres, no antialiasing, up and down alike: output pixel i samples the input at
    (i + 0.5) * in / out - 0.5, clamped to [0, in - 1], from its two nearest pixels. That is
    `torch.nn.functional.interpolate(mode='bilinear', align_corners=False)` (mmsegmentation's
    resize) and `tf.image.resize(method='bilinear')` (the training pipeline's), to float32
    rounding (tests/test_resize.py). The models, the losses and inference all resize with it.
    Axes between the batch and channel axes are each interpolated linearly, however many there
    are. Differentiable. Low-precision inputs are interpolated in float32 and rounded once, as
    torch does; integer inputs give float32; a size equal to the input's returns it unchanged.

    Examples:
      >>> import jax.numpy as jnp
      >>> row = jnp.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 4, 1)
      >>> resize_bilinear(row, 1, 2).ravel().tolist()  # samples x = 0.5 and 2.5: no blur
      [0.5, 2.5]
      >>> resize_bilinear(row[:, :, :2], 1, 4).ravel().tolist()  # x = -0.25 (clamped), 0.25, ...
      [0.0, 0.25, 0.75, 1.0]
    """
    if len(size) != x.ndim - 2:
        raise ValueError(f'resize_bilinear: size {size} must give one length per axis between '
                         f'the batch and channel axes of an array shaped {x.shape}')
    shape = (x.shape[0], *size, x.shape[-1])
    if x.shape == shape:
        return x
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    # jax.image.resize blurs when shrinking unless antialias=False (its default is True).
    resized = jax.image.resize(x.astype(compute_dtype), shape, 'linear', antialias=False)
    return resized.astype(x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else compute_dtype)


# PyTorch's default convolution init (kaiming normal, fan_out), as torchvision's models use it.
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric `padding=dilation*(k-1)//2`: XLA's 'SAME' pads stride-2 convs
    asymmetrically, which would shift every feature map against the reference models."""
    pad = dilation * (kernel_size - 1) // 2
    return ((pad, pad), (pad, pad))


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> BatchNorm:
    """PyTorch's BatchNorm2d defaults (momentum 0.1 = flax 0.9, eps 1e-5)."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     name=name)


class ConvBN(nn.Module):
    """Convolution (no bias), BatchNorm, optional ReLU, padded symmetrically like PyTorch.

    Submodules are named `conv` and `bn`, the names the pretrained-weight importer maps to.
    `groups=features` makes it depthwise.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    groups: int = 1
    relu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, (self.kernel_size,) * 2, strides=self.strides,
                    padding=torch_padding(self.kernel_size, self.dilation),
                    kernel_dilation=self.dilation, feature_group_count=self.groups,
                    use_bias=False, kernel_init=kaiming_normal, dtype=self.dtype, name='conv')(x)
        x = batch_norm(train, self.dtype, name='bn')(x)
        return nn.relu(x) if self.relu else x


class SeparableConvBN(nn.Module):
    """Depthwise-separable convolution (DeepLabV3+'s 'atrous separable'): a depthwise k x k
    ConvBN-ReLU then a pointwise 1x1 ConvBN-ReLU, each with its own BatchNorm."""

    features: int
    kernel_size: int = 3
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBN(x.shape[-1], self.kernel_size, dilation=self.dilation, groups=x.shape[-1],
                   dtype=self.dtype, name='depthwise')(x, train)
        return ConvBN(self.features, 1, dtype=self.dtype, name='pointwise')(x, train)


class FCNHead(nn.Module):
    """3x3 ConvBN-ReLU, dropout, 1x1 classifier: torchvision's FCNHead, and the auxiliary head
    (on ResNet's layer3, loss weight ~0.4) of mmsegmentation's PSPNet/DeepLab recipes."""

    num_classes: int
    channels: int
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.channels, (3, 3), padding=torch_padding(3), use_bias=False,
                    kernel_init=kaiming_normal, dtype=self.dtype, name='conv')(x)
        x = nn.relu(batch_norm(train, self.dtype, name='bn')(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d(bins) on [B,H,W,C]: bin i averages rows
    floor(i*H/bins) .. ceil((i+1)*H/bins)-1 (bins may overlap when H % bins != 0)."""

    def pooling_matrix(size: int) -> jax.Array:
        rows = []
        for i in range(bins):
            start, end = (i * size) // bins, -(-(i + 1) * size // bins)
            rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
        return jnp.asarray(rows, jnp.float32)

    height, width = x.shape[1:3]
    # Two small matrix products: exact averages, cheap, and differentiable.
    return jnp.einsum('bhwc,ih,jw->bijc', x, pooling_matrix(height).astype(x.dtype),
                      pooling_matrix(width).astype(x.dtype))


def aux_logits(model: nn.Module, features: dict, train: bool) -> jax.Array | None:
    """The auxiliary FCNHead on ResNet's layer3 when `model.aux_head` (width layer3 / 4, as
    torchvision and mmsegmentation); call it from the model's compact __call__."""
    if not model.aux_head:
        return None
    layer3 = features['layer3']
    return FCNHead(model.num_classes, layer3.shape[-1] // 4, dtype=model.dtype,
                   name='aux_head')(layer3, train)


def segmentation_output(logits: jax.Array, aux: jax.Array | None,
                        size: tuple[int, int]) -> jax.Array | dict:
    """Logits (and aux logits) resized to the input `size`, float32; a dict when aux exists."""
    logits = resize_bilinear(logits.astype(jnp.float32), *size)
    if aux is None:
        return logits
    return {'logits': logits, 'aux': resize_bilinear(aux.astype(jnp.float32), *size)}
