"""Exact Gaussian filtering: the O(N^2) reference, and the separable smoothness kernel.

The smoothness kernel (position only) is computed exactly, by a separable truncated Gaussian cut
at 6 standard deviations: the neglected tail is below 2e-8 of the centre weight.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The smoothness Gaussian is cut at this many standard deviations (tail < exp(-18)).
_TRUNCATE_SIGMAS = 6.0
# From this many pixels the smoothness blur runs as an FFT (as fast at 375x500, 2x at 1024x2048).
_FFT_MIN_PIXELS = 1 << 18


def exact_gaussian_filter(features: jax.Array, values: jax.Array) -> jax.Array:
    """sum_j exp(-|f_i - f_j|^2 / 2) values_j in O(N^2): the test reference, not the fast path.

    features [N, d] are already divided by the kernel's standard deviations; values [N, V].
    Squared distances are summed from per-feature differences (not |a|^2 + |b|^2 - 2ab, which
    cancels badly in float32 at RGB / theta_beta ~ 50).
    """
    features = jnp.asarray(features, jnp.float32)
    dist2 = jnp.zeros((features.shape[0],) * 2, jnp.float32)
    for k in range(features.shape[1]):
        dist2 = dist2 + jnp.square(features[:, None, k] - features[None, :, k])
    return jnp.matmul(jnp.exp(-0.5 * dist2), values.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _gaussian_taps(sigma: float, length: int) -> np.ndarray:
    radius = min(int(math.ceil(_TRUNCATE_SIGMAS * sigma)), length - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    return np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)


def _blur_axis(values: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
    """Zero-padded 1-D correlation of [B, H, W, V] with symmetric taps along axis 1 or 2."""
    radius = len(taps) // 2
    length = values.shape[axis]
    pad = [(0, 0)] * values.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(values, pad)
    out = jnp.zeros_like(values)
    for t, tap in enumerate(taps):
        out = out + float(tap) * jax.lax.slice_in_dim(padded, t, t + length, axis=axis)
    return out


def _wrapped_kernel(taps: np.ndarray, size: int) -> np.ndarray:
    """Symmetric taps laid out for a circular convolution of length `size` (centre at 0)."""
    radius = len(taps) // 2
    kernel = np.zeros(size, np.float64)
    kernel[: radius + 1] = taps[radius:]
    if radius:
        kernel[-radius:] = taps[:radius]
    return kernel


def _blur_fft(values: jax.Array, taps_h: np.ndarray, taps_w: np.ndarray) -> jax.Array:
    """The same separable correlation by FFT, zero-padded by the radius so nothing wraps."""
    height, width = values.shape[1:3]
    size = (height + len(taps_h) // 2 * 2, width + len(taps_w) // 2 * 2)
    kernel = np.fft.rfft2(np.outer(_wrapped_kernel(taps_h, size[0]),
                                   _wrapped_kernel(taps_w, size[1]))).astype(np.complex64)
    spectrum = jnp.fft.rfft2(jnp.moveaxis(values, -1, 1), s=size)
    out = jnp.fft.irfft2(spectrum * kernel, s=size)[..., :height, :width]
    return jnp.moveaxis(out, 1, -1)


def smoothness_filter(values: jax.Array, theta_gamma: float) -> jax.Array:
    """Exact sum_j exp(-|p_i-p_j|^2 / 2 theta_gamma^2) values_j over pixel grids [B, H, W, V].

    Separable taps below _FFT_MIN_PIXELS pixels, an FFT above (2x faster at 1024x2048 on
    XLA:CPU, float32 round-off ~1e-6 of the largest output); both cut at 6 std.
    """
    height, width = values.shape[1:3]
    taps_h = _gaussian_taps(theta_gamma, height)
    taps_w = _gaussian_taps(theta_gamma, width)
    if height * width >= _FFT_MIN_PIXELS:
        return _blur_fft(values.astype(jnp.float32), taps_h, taps_w)
    return _blur_axis(_blur_axis(values, taps_h, axis=1), taps_w, axis=2)
