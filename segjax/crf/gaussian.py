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


def _taps_sum(padded: jax.Array, taps: np.ndarray, axis: int, length: int) -> jax.Array:
    """sum_t taps[t] * padded[t : t + length] along `axis` (a 1-D correlation, no padding)."""
    out = None
    for t, tap in enumerate(taps):
        term = float(tap) * jax.lax.slice_in_dim(padded, t, t + length, axis=axis)
        out = term if out is None else out + term
    return out


def _blur_separable(values: jax.Array, taps_h: np.ndarray, taps_w: np.ndarray) -> jax.Array:
    """Zero-padded separable correlation of [B, H, W, V] with symmetric taps along H, then W.

    Both axes are padded once, up front: padding the rows' result before the columns' pass let
    XLA:CPU fuse the rows' taps into the columns' pass again (1.5x the work, measured).
    """
    height, width = values.shape[1:3]
    rh, rw = len(taps_h) // 2, len(taps_w) // 2
    padded = jnp.pad(values, ((0, 0), (rh, rh), (rw, rw), (0, 0)))
    return _taps_sum(_taps_sum(padded, taps_h, 1, height), taps_w, 2, width)


def smoothness_filter(values: jax.Array, theta_gamma: float) -> jax.Array:
    """Exact sum_j exp(-|p_i-p_j|^2 / 2 theta_gamma^2) values_j over pixel grids [B, H, W, V].

    Separable taps cut at 6 std, in float32, at every size: on XLA:CPU they beat an FFT even at
    1024x2048 (293 vs 525 ms for 19 channels, measured).
    """
    height, width = values.shape[1:3]
    return _blur_separable(values.astype(jnp.float32), _gaussian_taps(theta_gamma, height),
                           _gaussian_taps(theta_gamma, width))
