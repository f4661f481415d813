"""Mean-field inference of the fully-connected CRF: `dense_crf`."""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from segjax.crf.gaussian import exact_gaussian_filter, smoothness_filter
from segjax.crf.lattice import (
    _batch_lattice,
    _image_neighbours,
    _image_vertices,
    _packing,
    lattice_filter,
)

# DeepLab-CRF-LargeFOV's values (Chen et al. 2015, VOC 2012; the `bi_w, bi_xy_std, bi_rgb_std,
# pos_w, pos_xy_std` of their densecrf calls). DeepLab v2 ResNet-101 used w1=4, theta_alpha=67,
# theta_beta=3, w2=3, theta_gamma=1; both ran 10 iterations.
DEEPLAB_LARGEFOV = dict(appearance_weight=4.0, theta_alpha=121.0, theta_beta=5.0,
                        smoothness_weight=3.0, theta_gamma=3.0)

# Capacities tried for the occupied lattice vertices, in pixels N (the bound is N * (d + 1));
# a photograph at DeepLab-LargeFOV settings occupied 0.16 N (1024x2048) to 0.41 N (375x500),
# uniform noise ~4.6 N.
_CAPACITY_FRACTIONS = (0.25, 0.5, 1.0, 2.0)
# Above this many pixels `method='exact'` (O(N^2) memory) refuses to run.
_EXACT_MAX_PIXELS = 16384


def appearance_features(images: jax.Array, theta_alpha: float, theta_beta: float) -> jax.Array:
    """[B, H*W, 2 + channels]: (column / theta_alpha, row / theta_alpha, colour / theta_beta).

    The order is densecrf's (x, y, r, g, b): the lattice's approximation depends on it.
    """
    batch, height, width, channels = images.shape
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing='ij')
    position = jnp.stack([cols, rows], axis=-1) / theta_alpha
    colour = jnp.clip(images.astype(jnp.float32), 0.0, 255.0) / theta_beta
    features = jnp.concatenate(
        [jnp.broadcast_to(position, (batch, height, width, 2)), colour], axis=-1)
    return features.reshape(batch, height * width, 2 + channels)


def appearance_feature_bounds(shape: tuple[int, ...], theta_alpha: float,
                              theta_beta: float) -> tuple[float, ...]:
    """Static upper bounds of `appearance_features` for images of this shape (colour <= 255)."""
    _, height, width, channels = shape
    position = ((width - 1) / theta_alpha, (height - 1) / theta_alpha)
    return position + (255.0 / theta_beta,) * channels


def _mean_field(unary: jax.Array, kernels, compatibility: jax.Array | None, iterations: int,
                normalization: str, include_self: bool) -> jax.Array:
    """log Q after `iterations` updates; unary = log softmax(logits) [B, H, W, C].

    kernels: (weight, filter) pairs, filter mapping [B, H, W, V] -> [B, H, W, V].
    """
    ones = jnp.ones(unary.shape[:3] + (1,), jnp.float32)
    # Symmetric normalisation D^-1/2 K D^-1/2 (densecrf's NORMALIZE_SYMMETRIC, its 1e-20 too).
    norms = [jax.lax.rsqrt(filt(ones) + 1e-20) if normalization == 'symmetric' else ones
             for _, filt in kernels]

    def message(q):
        total = jnp.zeros_like(q)
        for (weight, filt), norm in zip(kernels, norms, strict=True):
            filtered = norm * filt(norm * q)
            if not include_self:
                filtered = filtered - norm * norm * q  # k(f_i, f_i) = 1
            total = total + weight * filtered
        return total

    def step(_, scores):
        # The loop carries the scores before the softmax: reductions over classes then read a
        # materialised array; fused into the filters' taps they ran ~6x slower on XLA:CPU.
        msg = message(jax.nn.softmax(scores, axis=-1))
        if compatibility is None:  # Potts mu(l, l') = [l != l'], up to a per-pixel constant
            return unary + msg
        return unary - jnp.einsum('...k,lk->...l', msg, compatibility,
                                  precision=jax.lax.Precision.HIGHEST)

    scores = jax.lax.fori_loop(0, iterations, step, unary)
    return jax.nn.log_softmax(scores, axis=-1)


def _static_positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(f'{name} must be a Python number (it fixes static shapes), got '
                        f'{type(value).__name__}') from e
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a finite number > 0, got {value}')
    return value


def _check_inputs(logits: jax.Array, images: jax.Array, iterations: int,
                  compatibility) -> None:
    if logits.ndim != 4:
        raise ValueError(f'logits must be [batch, height, width, classes], got shape '
                         f'{tuple(logits.shape)}')
    if images.ndim != 4:
        raise ValueError(f'images must be [batch, height, width, channels] RGB in 0..255, got '
                         f'shape {tuple(images.shape)}')
    if 0 in logits.shape or 0 in images.shape:
        raise ValueError(f'zero-size input: logits {tuple(logits.shape)}, images '
                         f'{tuple(images.shape)}')
    if logits.shape[:3] != images.shape[:3]:
        raise ValueError(f'images {tuple(images.shape)} and logits {tuple(logits.shape)} differ '
                         'in batch, height or width: resize the logits to the image first')
    if not isinstance(iterations, int | np.integer) or iterations < 0:
        raise ValueError(f'iterations must be an integer >= 0, got {iterations!r}')
    classes = logits.shape[-1]
    if compatibility is not None and jnp.shape(compatibility) != (classes, classes):
        raise ValueError(f'compatibility must be [{classes}, {classes}] (classes x classes), got '
                         f'shape {tuple(jnp.shape(compatibility))}')
    # A value check is only possible on concrete arrays; under jit non-finite logits give NaN.
    for name, array in (('logits', logits), ('images', images)):
        if isinstance(array, jax.core.Tracer):
            continue
        with jax.ensure_compile_time_eval():  # concrete even while an outer jit traces
            bad = int(jnp.sum(~jnp.isfinite(array)))
        if bad:
            raise ValueError(f'{name} contain {bad} non-finite values (NaN or inf)')


def dense_crf(logits: jax.Array, images: jax.Array, *, iterations: int = 5,
              appearance_weight: float | jax.Array = 4.0, theta_alpha: float = 121.0,
              theta_beta: float = 5.0, smoothness_weight: float | jax.Array = 3.0,
              theta_gamma: float = 3.0, compatibility: jax.Array | None = None,
              normalization: Literal['symmetric', 'none'] = 'symmetric',
              include_self: bool = True,
              method: Literal['lattice', 'exact'] = 'lattice') -> jax.Array:
    """Refined log-probabilities log Q [B, H, W, C] float32 of a fully-connected CRF.

    logits [B, H, W, C] (any float dtype; computed in float32); images [B, H, W, 3] RGB in
    0..255, un-normalised (uint8 or float; clipped to 0..255), the same H, W as the logits.
    Defaults are DeepLab-CRF-LargeFOV's (w1=4, theta_alpha=121, theta_beta=5, w2=3,
    theta_gamma=3); DeepLab ran 10 iterations. theta_* (pixels, colour levels) are Python
    numbers; the weights and `compatibility` ([C, C], mu(l, l'), default Potts [l != l']) may be
    traced arrays, so they can be trained: gradients flow to them and to the logits (not to the
    images). `normalization='none'` uses the raw Gaussian sums of the paper, `include_self=False`
    its j != i (see the module docstring). `method='exact'` filters the appearance kernel in
    O(N^2) (tests only). Jit-able; batch elements are independent, so a data-sharded batch works.
    Concrete non-finite logits raise ValueError; under jit they propagate as NaN.

    >>> logits = jnp.zeros((1, 4, 4, 2)).at[..., 0].set(1.0)
    >>> dense_crf(logits, jnp.zeros((1, 4, 4, 3))).argmax(-1).tolist()[0][0]
    [0, 0, 0, 0]
    """
    logits, images = jnp.asarray(logits), jnp.asarray(images)
    _check_inputs(logits, images, iterations, compatibility)
    theta_alpha = _static_positive('theta_alpha', theta_alpha)
    theta_beta = _static_positive('theta_beta', theta_beta)
    theta_gamma = _static_positive('theta_gamma', theta_gamma)
    if normalization not in ('symmetric', 'none'):
        raise ValueError(f"normalization must be 'symmetric' or 'none', got {normalization!r}")
    if method not in ('lattice', 'exact'):
        raise ValueError(f"method must be 'lattice' or 'exact', got {method!r}")
    height, width = logits.shape[1:3]
    if method == 'exact' and height * width > _EXACT_MAX_PIXELS:
        raise ValueError(f"method='exact' is O(N^2): {height * width} pixels > "
                         f'{_EXACT_MAX_PIXELS}')
    if compatibility is not None:
        compatibility = jnp.asarray(compatibility, jnp.float32)
    # One compiled program per static configuration and shape, eager callers included; the
    # weights and compatibility are traced, so a parameter sweep over them compiles once.
    return _refine(logits, images, appearance_weight, smoothness_weight, compatibility,
                   iterations=int(iterations), theta_alpha=theta_alpha, theta_beta=theta_beta,
                   theta_gamma=theta_gamma, normalization=normalization,
                   include_self=bool(include_self), method=method)


@functools.partial(jax.jit, static_argnames=('iterations', 'theta_alpha', 'theta_beta',
                                             'theta_gamma', 'normalization', 'include_self',
                                             'method'))
def _refine(logits, images, appearance_weight, smoothness_weight, compatibility, *,
            iterations, theta_alpha, theta_beta, theta_gamma, normalization, include_self,
            method):
    batch, height, width, classes = logits.shape
    num = height * width
    unary = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    features = jax.lax.stop_gradient(appearance_features(images, theta_alpha, theta_beta))

    def on_pixels(filt):
        # Filters act on [B, N, V]; mean-field holds [B, H, W, V].
        return lambda v: filt(v.reshape(batch, num, -1)).reshape(v.shape)

    def smooth(v):
        return smoothness_filter(v, theta_gamma)

    def refine(appearance):
        kernels = [(appearance_weight, on_pixels(appearance)), (smoothness_weight, smooth)]
        return _mean_field(unary, kernels, compatibility, iterations, normalization, include_self)

    if method == 'exact':
        return refine(lambda v: jax.vmap(exact_gaussian_filter)(features, v))
    dim = features.shape[-1]
    packing = _packing(appearance_feature_bounds(images.shape, theta_alpha, theta_beta))
    offsets, weights, index, counts = _image_vertices(features, packing)
    # Static capacities for the occupied lattice vertices; the smallest that holds the batch's
    # maximum runs (lax.switch runs one branch), so blurs and neighbour lookups cost ~ the
    # vertices used, not the bound N * (d + 1).
    bound = num * (dim + 1)
    capacities = sorted({min(bound, max(1, math.ceil(f * num))) for f in _CAPACITY_FRACTIONS}
                        | {bound})
    branch = sum((jnp.max(counts) > c).astype(jnp.int32) for c in capacities[:-1])

    def with_capacity(capacity):
        def run():
            neighbours = _image_neighbours(index, counts, packing, capacity)
            lattice = _batch_lattice(offsets, weights, neighbours)
            return refine(lambda v: lattice_filter(lattice, v.reshape(batch * num, -1)))
        return run

    return jax.lax.switch(branch, [with_capacity(c) for c in capacities])
