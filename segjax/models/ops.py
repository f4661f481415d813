"""Convolution, BatchNorm, up-sampling and pooling written for speed; same results as flax's.

Each replaces a flax/lax building block with one that has the same parameters, variables and
outputs (tests/test_ops.py compares them) but lowers to cheaper XLA. The gains, measured by
profiling U-Net and DeepLabV3+ train steps on XLA:CPU (README, "Speed on CPU, measured"):
- 1x1 convolutions as matmuls: XLA differentiates a convolution into convolutions whose operands
  it first transposes; a matmul's gradients are matmuls on the same layout.
- BatchNorm with a hand-written gradient that reads its input twice where autodiff of the
  forward formula re-reads it four to five times, its sums as ones-vector matmuls.
- A 2x2 stride-2 transposed convolution as one matmul (XLA turns the convolution form's weight
  gradient into a dilated convolution it runs slowly); max pooling and spatial means without
  reduce-window / select-and-scatter.
None of this is CPU-specific code: the same ops run on GPU and TPU (not timed there).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated`, with 2-D NHWC 1x1 convolutions computed as one matmul."""
    pointwise = (
        lhs.ndim == 4 and rhs.shape[:2] == (1, 1) and feature_group_count == 1 and not kwargs
        and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
        and (isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding))
        and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not pointwise:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
    # A 1x1 window pads nothing under 'SAME' or 'VALID'; a stride just subsamples.
    stride_h, stride_w = window_strides
    # lax.slice, not lhs[:, ::s, ::s]: under a symbolic batch (segjax.export) indexing becomes
    # a dynamic gather, which TFLite cannot convert.
    x = lax.slice(lhs, (0, 0, 0, 0), lhs.shape, (1, stride_h, stride_w, 1))
    batch, height, width, channels = x.shape
    y = jnp.dot(x.reshape(-1, channels), rhs.reshape(channels, -1), precision=precision)
    return y.reshape(batch, height, width, -1)


# nn.Conv with the fast 1x1 path: same parameter names, shapes and initialisers.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _channel_sums(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Per-channel sums of [..., C] float32 arrays, each as a ones-vector matmul: in a
    DeepLabV3+ and a U-Net train step on XLA:CPU that beat jnp.sum over the leading axes (as
    4-D or 2-D) and a two-output lax.reduce by 5-15% of the whole step."""
    ones = jnp.ones((arrays[0].size // arrays[0].shape[-1],), jnp.float32)
    return tuple(jnp.dot(ones, a.reshape(ones.shape[0], -1),
                         precision=lax.Precision.HIGHEST) for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over all axes but the last: (y, batch mean, biased batch var).

    Statistics are float32 whatever x's dtype; var = E[x^2] - E[x]^2 as flax's default.
    """
    return _batch_normalize_fwd(x, scale, bias, epsilon)[0]


def _batch_normalize_fwd(x, scale, bias, epsilon):
    x32 = x.astype(jnp.float32)
    count = x.size // x.shape[-1]
    total, total_sq = _channel_sums(x32, x32 * x32)
    mean = total / count
    var = jnp.maximum(total_sq / count - mean * mean, 0.0)
    inv = lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (inv * scale) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv, scale)


def _batch_normalize_bwd(epsilon, residuals, cotangents):
    del epsilon
    x, mean, inv, scale = residuals
    grad_y, grad_mean, grad_var = cotangents
    count = x.size // x.shape[-1]
    centred = x.astype(jnp.float32) - mean
    grad_y = grad_y.astype(jnp.float32)
    grad_bias, grad_scale = _channel_sums(grad_y, grad_y * centred * inv)
    # dL/dx through y (mean and variance depend on x too), then through the returned stats.
    grad_x = (scale * inv) * (grad_y - (grad_bias + centred * inv * grad_scale) / count)
    grad_x = grad_x + (grad_mean + 2.0 * grad_var * centred) / count
    return grad_x.astype(x.dtype), grad_scale, grad_bias


batch_normalize.defvjp(_batch_normalize_fwd, _batch_normalize_bwd)


class BatchNorm(nn.Module):
    """nn.BatchNorm over the last axis (same 'scale'/'bias' params and 'mean'/'var' stats,
    same momentum rule) whose training-mode gradient is `batch_normalize`'s."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
        scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        if self.use_running_average:
            multiplier = lax.rsqrt(running_var.value + self.epsilon) * scale
            y = (x.astype(jnp.float32) - running_mean.value) * multiplier + bias
            return y.astype(dtype)
        y, mean, var = batch_normalize(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            momentum = self.momentum
            running_mean.value = momentum * running_mean.value + (1 - momentum) * mean
            running_var.value = momentum * running_var.value + (1 - momentum) * var
        return y.astype(dtype)


class ConvTranspose2x2(nn.Module):
    """2x2 transposed convolution with stride 2 (U-Net's up-sampling), as one matmul.

    Same parameters and outputs as `nn.ConvTranspose(features, (2, 2), strides=(2, 2))`: the
    windows do not overlap, so output pixel (2i+a, 2j+c) is x[i, j] @ kernel[1-a, 1-c].
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        kernel = self.param('kernel', nn.initializers.lecun_normal(),
                            (2, 2, channels, self.features), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
        # [K, (a, c, O)] with the kernel flipped, so column block (a, c) makes pixel (2i+a, 2j+c).
        weights = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(channels, -1)
        y = jnp.dot(x.astype(self.dtype).reshape(-1, channels), weights.astype(self.dtype))
        y = y.reshape(batch, height, width, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 of [B,H,W,C] (H, W even) as a reshape and a max; equal to
    nn.max_pool(x, (2, 2), strides=(2, 2)) without its slow select-and-scatter gradient."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """ResNet's stem pooling, nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))),
    as a max over three strided row slices then three column slices: XLA:CPU's reduce-window
    gradient (select-and-scatter) took 5% of a DeepLabV3+ step. Tied maxima share the gradient
    instead of the first one taking it all."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    for axis in (1, 2):
        out_size = (x.shape[axis] - 1) // 2 + 1
        padded = functools.reduce(jnp.maximum, [
            lax.slice_in_dim(padded, offset, offset + 2 * out_size - 1, stride=2, axis=axis)
            for offset in range(3)])
    return padded


def spatial_mean(x: jax.Array) -> jax.Array:
    """Mean over H and W of [B,H,W,C], kept as [B,1,1,C], as a batched ones-vector matmul
    (XLA:CPU reduces over the leading axes several times slower)."""
    batch, height, width, channels = x.shape
    weights = jnp.full((batch, height * width), 1.0 / (height * width), x.dtype)
    mean = jnp.einsum('bp,bpc->bc', weights, x.reshape(batch, height * width, channels),
                      precision=lax.Precision.HIGHEST)
    return mean.reshape(batch, 1, 1, channels)
