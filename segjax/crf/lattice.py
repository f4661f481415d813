"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) with static shapes.

High-dimensional Gaussian filtering in time linear in the points: splat each point onto the d+1
vertices of its enclosing simplex with barycentric weights, blur with [1, 2, 1]/2 along each of
the d+1 lattice directions, slice back. A transcription of Permutohedral in Krähenbühl's
densecrf 2.2 (the code pydensecrf wraps), so that it filters identically, made jit-able: each
point's d+1 vertex keys are packed into int32 words (bit layouts fixed by static bounds on the
features), deduplicated by one sort, and the blur neighbours along each direction found by one
sort of the occupied vertices by (lattice line, position on it) - no hash table.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Packed lattice keys use at most this many bits per int32 word, so INT32_MAX stays a sentinel.
_WORD_BITS = 30
_SENTINEL = np.iinfo(np.int32).max


class Lattice(NamedTuple):
    """A lattice over P points (a batch of images flattened: images never share vertices).

    offsets [P, d+1] int32: the vertex of each point's simplex corners;
    weights [P, d+1] float32: barycentric weights (sum to 1);
    neighbours [d+1, 2, V+1] int32: per lattice direction, the two neighbours of each of V
      vertex slots, V (a row kept at zero) where absent; the last column is that zero row's own.
    """
    offsets: jax.Array
    weights: jax.Array
    neighbours: jax.Array


def _elevation_matrix(dim: int) -> np.ndarray:
    """E [d+1, d]: features (times the lattice scale) -> the hyperplane x . 1 = 0 (Adams p.5)."""
    inv_std = math.sqrt(2.0 / 3.0) * (dim + 1)
    scale = np.array([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(dim)])
    mat = np.zeros((dim + 1, dim))
    for i in range(dim):
        mat[: i + 1, i] = 1.0
        mat[i + 1, i] = -(i + 1)
    return mat * scale[None, :]


def _simplex_vertices(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys [N, d+1, d] int32 of the enclosing simplex's vertices and barycentric weights [N, d+1].

    A transcription of Permutohedral::init in Krähenbühl's densecrf (ties round down as there).
    """
    num, dim = features.shape
    elevated = features @ jnp.asarray(_elevation_matrix(dim).T, jnp.float32)  # [N, d+1]
    down = elevated / (dim + 1)
    up_v, down_v = jnp.ceil(down) * (dim + 1), jnp.floor(down) * (dim + 1)
    rem0 = jnp.where(up_v - elevated < elevated - down_v, up_v, down_v)
    total = jnp.round(jnp.sum(rem0, axis=-1) / (dim + 1)).astype(jnp.int32)
    diff = elevated - rem0
    # rank[i] = #{j > i: d_j > d_i} + #{j < i: d_j >= d_i}
    upper = np.triu(np.ones((dim + 1, dim + 1), bool), 1)  # [i, j]: j > i
    greater = diff[:, None, :] > diff[:, :, None]
    greater_eq = diff[:, None, :] >= diff[:, :, None]
    rank = jnp.sum(jnp.where(upper[None], greater, greater_eq & ~np.eye(dim + 1, dtype=bool)),
                   axis=-1).astype(jnp.int32)
    rank = rank + total[:, None]
    wrap_up, wrap_down = rank < 0, rank > dim
    rank = jnp.where(wrap_up, rank + dim + 1, jnp.where(wrap_down, rank - dim - 1, rank))
    rem0 = jnp.where(wrap_up, rem0 + dim + 1, jnp.where(wrap_down, rem0 - dim - 1, rem0))
    # Barycentric weights (Adams p.10): v at d - rank, -v at d - rank + 1, wrap the last.
    v = (elevated - rem0) / (dim + 1)
    slots = jnp.arange(dim + 2)
    bary = (jnp.sum(v[:, :, None] * (slots == (dim - rank)[:, :, None]), axis=1)
            - jnp.sum(v[:, :, None] * (slots == (dim - rank + 1)[:, :, None]), axis=1))
    weights = bary[:, : dim + 1].at[:, 0].add(1.0 + bary[:, dim + 1])
    # Vertex k of the simplex: the canonical offset (Adams p.10) is k for coordinates of rank
    # <= d - k, else k - (d + 1).
    corner = jnp.arange(dim + 1, dtype=jnp.int32)[None, :, None]
    keys = (rem0.astype(jnp.int32)[:, None, :dim] + corner
            - (dim + 1) * (rank[:, None, :dim] > dim - corner).astype(jnp.int32))
    return keys, weights


class _Layout(NamedTuple):
    """Static layout packing bounded integer fields into int32 words, field 0 most significant.

    Sorting the words (first word first) sorts the fields lexicographically.
    """
    lows: tuple[int, ...]
    slots: tuple[tuple[int, int, int], ...]  # (word, shift, bits) per field
    num_words: int


def _layout(ranges: list[tuple[int, int]]) -> _Layout:
    bits = [max(1, int(hi - lo).bit_length()) for lo, hi in ranges]
    slots, word, used = [None] * len(ranges), 0, 0
    for i in reversed(range(len(ranges))):  # the last field takes the lowest bits
        if bits[i] > _WORD_BITS:
            raise ValueError(f'a lattice coordinate spans {bits[i]} bits: the image is too large '
                             'for these theta_alpha / theta_beta')
        if used + bits[i] > _WORD_BITS:
            word, used = word + 1, 0
        slots[i] = (word, used, bits[i])
        used += bits[i]
    slots = [(word - w, shift, b) for w, shift, b in slots]
    return _Layout(tuple(int(lo) for lo, _ in ranges), tuple(slots), word + 1)


def _pack(fields: list[jax.Array], layout: _Layout) -> tuple[jax.Array, ...]:
    words = [jnp.zeros(fields[0].shape, jnp.int32) for _ in range(layout.num_words)]
    for value, low, (word, shift, _) in zip(fields, layout.lows, layout.slots, strict=True):
        words[word] = words[word] | ((value - low) << shift)
    return tuple(words)


def _unpack(words: tuple[jax.Array, ...], layout: _Layout) -> list[jax.Array]:
    return [((words[word] >> shift) & ((1 << bits) - 1)) + low
            for low, (word, shift, bits) in zip(layout.lows, layout.slots, strict=True)]


class _Packing(NamedTuple):
    """Layouts for one lattice: vertex keys, and per direction j the (line, position) keys."""
    vertex: _Layout
    lines: tuple[_Layout, ...]


def _packing(feature_max: tuple[float, ...]) -> _Packing:
    """Bit layouts from static bounds on the features (each in [0, feature_max[i]])."""
    dim = len(feature_max)
    mat = _elevation_matrix(dim) * np.asarray(feature_max)[None, :]
    # Rounding, wrapping, simplex corners and blur steps move keys by a few times d+1.
    margin = 4 * (dim + 1)
    lo = np.floor(np.minimum(mat, 0.0).sum(axis=1)).astype(int) - margin
    hi = np.ceil(np.maximum(mat, 0.0).sum(axis=1)).astype(int) + margin
    # A vertex key: its remainder r (all coordinates are r mod d+1) and k_a // (d+1), a < d.
    vertex = _layout([(0, dim)]
                     + [(lo[a] // (dim + 1) - 1, hi[a] // (dim + 1)) for a in range(dim)])
    lines = []
    for j in range(dim + 1):
        ref = 1 if j == 0 else 0
        others = [a for a in range(dim + 1) if a not in (j, ref)]
        # Along direction j, (k_a - k_ref) / (d+1) is constant and k_j moves by d per vertex.
        lines.append(_layout([((lo[a] - hi[ref]) // (dim + 1) - 1, (hi[a] - lo[ref]) // (dim + 1))
                              for a in others] + [(lo[j], hi[j])]))
    return _Packing(vertex, tuple(lines))


def _vertex_words(keys: jax.Array, layout: _Layout) -> tuple[jax.Array, ...]:
    """Keys [..., d] (the first d of d+1 coordinates, all congruent mod d+1) -> words."""
    dim = keys.shape[-1]
    remainder = jnp.mod(keys[..., 0], dim + 1)
    quotient = (keys - remainder[..., None]) // (dim + 1)
    return _pack([remainder] + [quotient[..., a] for a in range(dim)], layout)


def _sorted_vertices(features: jax.Array, packing: _Packing):
    """Dedupe an image's simplex corners: (offsets, weights, vertex words table, count).

    The table lists each occupied vertex once, in sorted order, then sentinel padding.
    """
    num, dim = features.shape
    keys, weights = _simplex_vertices(features)
    words = _vertex_words(keys.reshape(num * (dim + 1), dim), packing.vertex)
    order = jnp.arange(num * (dim + 1), dtype=jnp.int32)
    *sorted_words, perm = jax.lax.sort((*words, order), num_keys=len(words))
    is_new = jnp.zeros(order.shape, bool).at[0].set(True)
    for w in sorted_words:
        is_new = is_new | jnp.concatenate([jnp.ones((1,), bool), w[1:] != w[:-1]])
    vertex = jnp.cumsum(is_new.astype(jnp.int32)) - 1
    offsets = jnp.zeros_like(order).at[perm].set(vertex).reshape(num, dim + 1)
    table = tuple(jnp.full(order.shape, _SENTINEL, jnp.int32).at[vertex].set(w)
                  for w in sorted_words)
    return offsets, weights, table, vertex[-1] + 1


def _blur_neighbours(table: tuple[jax.Array, ...], num_vertices: jax.Array,
                     packing: _Packing) -> jax.Array:
    """[d+1, 2, capacity+1]: per direction j the vertices key +/- (-1,..,-1, d at j) (Adams p.7).

    One sort per direction: vertices on a lattice line along j share (k_a - k_ref) and are
    ordered by k_j, so a vertex's neighbours are the rows next to it.
    """
    capacity = table[0].shape[0]
    fields = _unpack(table, packing.vertex)
    dim = len(fields) - 1
    keys = [fields[0] + (dim + 1) * q for q in fields[1:]]
    keys.append(-sum(keys))  # coordinates sum to zero
    ids = jnp.arange(capacity, dtype=jnp.int32)
    out = []
    for j, layout in enumerate(packing.lines):
        ref = 1 if j == 0 else 0
        others = [a for a in range(dim + 1) if a not in (j, ref)]
        words = _pack([(keys[a] - keys[ref]) // (dim + 1) for a in others] + [keys[j]], layout)
        # Padding rows sort last.
        words = (jnp.where(ids < num_vertices, words[0], _SENTINEL),) + words[1:]
        *sorted_words, order = jax.lax.sort((*words, ids), num_keys=len(words))
        pos_bits = layout.slots[-1][2]
        same_line = (sorted_words[-1][1:] >> pos_bits) == (sorted_words[-1][:-1] >> pos_bits)
        for w in sorted_words[:-1]:
            same_line = same_line & (w[1:] == w[:-1])
        pos = sorted_words[-1] & ((1 << pos_bits) - 1)
        adjacent = (same_line & (pos[1:] - pos[:-1] == dim) & (order[1:] < num_vertices)
                    & (order[:-1] < num_vertices))
        minus = jnp.full((capacity,), capacity, jnp.int32).at[order[:-1]].set(
            jnp.where(adjacent, order[1:], capacity))
        plus = jnp.full((capacity,), capacity, jnp.int32).at[order[1:]].set(
            jnp.where(adjacent, order[:-1], capacity))
        out.append(jnp.stack([minus, plus]))
    # The last column is the zero row's (index `capacity`): its own neighbour.
    return jnp.pad(jnp.stack(out), ((0, 0), (0, 0), (0, 1)), constant_values=capacity)


@jax.custom_vjp
def lattice_filter(lattice: Lattice, values: jax.Array) -> jax.Array:
    """Approximately sum_j exp(-|f_i - f_j|^2 / 2) values_j: splat, blur, slice. values [P, V].

    The blur is [1, 2, 1]/2 along each of the d+1 lattice directions, as in densecrf; the output
    is scaled to the Gaussian sum for a uniform density of points (on images the exact sums are
    1.16-1.24x it: see tests/test_crf.py), not densecrf's d-dependent multiple. Linear in
    values; its gradient is the transposed filter (blurs in reverse order), not autodiff's
    scatters. Reverse mode only (no jvp).
    """
    return _lattice_apply(lattice, values, reverse=False)


def _lattice_apply(lattice: Lattice, values: jax.Array, *, reverse: bool) -> jax.Array:
    dim = lattice.offsets.shape[1] - 1
    size = lattice.neighbours.shape[-1]
    values = values.astype(jnp.float32)
    data = (values[:, None, :] * lattice.weights[..., None]).reshape(-1, values.shape[-1])
    grid = jax.ops.segment_sum(data, lattice.offsets.reshape(-1), num_segments=size)
    for j in (reversed(range(dim + 1)) if reverse else range(dim + 1)):
        minus, plus = lattice.neighbours[j]
        # 1-D index gathers are several times faster on XLA:CPU than one [P, d+1] gather.
        grid = grid + 0.5 * (jnp.take(grid, minus, axis=0, mode='clip')
                             + jnp.take(grid, plus, axis=0, mode='clip'))
    sliced = sum(jnp.take(grid, lattice.offsets[:, k], axis=0, mode='clip')
                 * lattice.weights[:, k:k + 1] for k in range(dim + 1))
    return sliced * _lattice_gain(dim)


def _lattice_filter_fwd(lattice, values):
    return _lattice_apply(lattice, values, reverse=False), lattice


def _lattice_filter_bwd(lattice, cotangent):
    # Each blur is symmetric, so the transpose runs them in the opposite order.
    return None, _lattice_apply(lattice, cotangent, reverse=True)


lattice_filter.defvjp(_lattice_filter_fwd, _lattice_filter_bwd)


def _lattice_gain(dim: int) -> float:
    """Scale making the lattice's output approximate the Gaussian sum itself, not a multiple.

    For a uniform density of points the slice returns (points per lattice cell) times the mass
    the blurs spread, 2^(d+1): densecrf multiplies by 1/(1 + 2^-d) instead and leaves the result
    a d-dependent multiple of the Gaussian (0.88 for d=2, 0.70 for d=5), which its normalisation
    cancels. The lattice cell's volume in feature units is (d+1)^(d-1/2) / s^d with
    s = sqrt(2/3) (d+1) the features' scale (Adams et al. p.6), and the Gaussian's mass is
    (2 pi)^(d/2).
    """
    scale = math.sqrt(2.0 / 3.0) * (dim + 1)
    cell_volume = (dim + 1) ** (dim - 0.5) / scale ** dim
    return (2.0 * math.pi) ** (dim / 2) / (cell_volume * 2.0 ** (dim + 1))


def _batch_lattice(offsets: jax.Array, weights: jax.Array, neighbours: jax.Array) -> Lattice:
    """Per-image pieces ([B, N, d+1], [B, N, d+1], [B, d+1, 2, C+1]) -> one lattice over B*N."""
    batch, num, corners = offsets.shape
    capacity = neighbours.shape[-1] - 1
    shift = (jnp.arange(batch, dtype=jnp.int32) * capacity)
    flat_offsets = (offsets + shift[:, None, None]).reshape(batch * num, corners)
    moved = jnp.where(neighbours[..., :capacity] == capacity, batch * capacity,
                      neighbours[..., :capacity] + shift[:, None, None, None])
    moved = jnp.moveaxis(moved, 0, 2).reshape(corners, 2, batch * capacity)
    zero_row = jnp.full((corners, 2, 1), batch * capacity, jnp.int32)
    return Lattice(flat_offsets, weights.reshape(batch * num, corners),
                   jnp.concatenate([moved, zero_row], axis=-1))


def _image_vertices(features: jax.Array, packing: _Packing):
    """Batched `_sorted_vertices`: offsets, weights [B, N, d+1], tables [B, N(d+1)], counts [B]."""
    return jax.vmap(lambda f: _sorted_vertices(f, packing))(features)


def _image_neighbours(tables, counts, packing: _Packing, capacity: int) -> jax.Array:
    """[B, d+1, 2, capacity+1] blur neighbours of each image's first `capacity` vertices."""
    cut = tuple(t[:, :capacity] for t in tables)
    return jax.vmap(lambda t, n: _blur_neighbours(t, n, packing))(cut, counts)


def permutohedral_lattice(features: jax.Array, feature_max: tuple[float, ...],
                          capacity: int | None = None) -> tuple[Lattice, jax.Array]:
    """(lattice over all B*N points, occupied vertices per image [B]) of features [B, N, d].

    Features are clipped to [0, feature_max] (static bounds fixing the key layout). `capacity`
    (static) is the vertex slots per image; the default N * (d + 1) always suffices, a smaller
    one drops vertices past it (check the returned counts).
    """
    batch, num, dim = features.shape
    features = jnp.clip(features.astype(jnp.float32), 0.0, jnp.asarray(feature_max, jnp.float32))
    packing = _packing(tuple(float(m) for m in feature_max))
    offsets, weights, tables, counts = _image_vertices(features, packing)
    capacity = num * (dim + 1) if capacity is None else capacity
    neighbours = _image_neighbours(tables, counts, packing, capacity)
    return _batch_lattice(offsets, weights, neighbours), counts


def permutohedral_filter(features: jax.Array, values: jax.Array,
                         feature_max: tuple[float, ...]) -> jax.Array:
    """Lattice approximation of exp(-|f_i - f_j|^2 / 2) filtering, per image: [B, N, V]."""
    lattice, _ = permutohedral_lattice(features, feature_max)
    batch, num, channels = values.shape
    return lattice_filter(lattice, values.reshape(batch * num, channels)).reshape(values.shape)
