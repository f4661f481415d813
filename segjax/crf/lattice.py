"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) with static shapes.

High-dimensional Gaussian filtering in time linear in the points: splat each point onto the d+1
vertices of its enclosing simplex with barycentric weights, blur with [1, 2, 1]/2 along each of
the d+1 lattice directions, slice back. A transcription of Permutohedral in Krähenbühl's
densecrf 2.2 (the code pydensecrf wraps), so that it filters identically, made jit-able: each
point's d+1 vertex keys are packed into int32 words (bit layouts fixed by static bounds on the
features) and deduplicated in an open-addressing hash table built by rounds of scatter-min (as
densecrf's HashTable, but all points at once: XLA:CPU's multi-operand sorts cost ~5x its
scatters); the blur neighbours of each occupied vertex are looked up in the same table. The
lattice depends only on the features, so `dense_crf` builds it once per image and every
mean-field iteration reuses it: one [N(d+1), C] segment_sum, 2(d+1) row gathers, d+1 slices.
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
    """Quotients [N, d+1, d] int32 of the enclosing simplex's vertices; barycentric weights.

    A transcription of Permutohedral::init in Krähenbühl's densecrf (ties round down as there).
    Every coordinate of vertex k is congruent to k mod d+1, so vertex k's key is
    k + (d+1) * quotient: kept in that form, the keys are packed without integer division.
    """
    num, dim = features.shape
    elevated = features @ jnp.asarray(_elevation_matrix(dim).T, jnp.float32)  # [N, d+1]
    down = elevated / (dim + 1)
    up_v, down_v = jnp.ceil(down), jnp.floor(down)
    nearest = jnp.where(up_v * (dim + 1) - elevated < elevated - down_v * (dim + 1), up_v, down_v)
    rem0 = nearest * (dim + 1)
    total = jnp.round(jnp.sum(nearest, axis=-1)).astype(jnp.int32)
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
    wrap = wrap_up.astype(jnp.int32) - wrap_down.astype(jnp.int32)
    rem0 = rem0 + (dim + 1) * wrap
    # Barycentric weights (Adams p.10): v at d - rank, -v at d - rank + 1, wrap the last.
    # rank is a permutation of 0..d, so this is by_rank[d - k] - by_rank[d + 1 - k] with
    # by_rank[r] = v at the coordinate of rank r (one [N, d+1, d+1] one-hot, not two).
    v = (elevated - rem0) / (dim + 1)
    by_rank = jnp.sum(v[:, :, None] * (rank[:, :, None] == jnp.arange(dim + 1)), axis=1)
    weights = jnp.concatenate([1.0 + by_rank[:, dim:] - by_rank[:, :1],
                               by_rank[:, dim - 1::-1] - by_rank[:, :0:-1]], axis=1)
    # Vertex k of the simplex: the canonical offset (Adams p.10) is k for coordinates of rank
    # <= d - k, else k - (d + 1): quotient rem0 / (d+1), one less where the rank is above d - k.
    corner = jnp.arange(dim + 1, dtype=jnp.int32)[None, :, None]
    quotients = ((nearest.astype(jnp.int32) + wrap)[:, None, :dim]
                 - (rank[:, None, :dim] > dim - corner).astype(jnp.int32))
    return quotients, weights


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
    """The bit layout of one lattice's vertex keys."""
    vertex: _Layout


def _packing(feature_max: tuple[float, ...]) -> _Packing:
    """Bit layouts from static bounds on the features (each in [0, feature_max[i]])."""
    dim = len(feature_max)
    mat = _elevation_matrix(dim) * np.asarray(feature_max)[None, :]
    # Rounding, wrapping, simplex corners and blur steps move keys by a few times d+1.
    margin = 4 * (dim + 1)
    lo = np.floor(np.minimum(mat, 0.0).sum(axis=1)).astype(int) - margin
    hi = np.ceil(np.maximum(mat, 0.0).sum(axis=1)).astype(int) + margin
    # A vertex key: its remainder r (all coordinates are r mod d+1) and k_a // (d+1), a < d.
    return _Packing(_layout([(0, dim)]
                            + [(lo[a] // (dim + 1) - 1, hi[a] // (dim + 1)) for a in range(dim)]))


def _vertex_words(quotients: jax.Array, layout: _Layout) -> tuple[jax.Array, ...]:
    """Quotients [P, d+1, d] of each point's d+1 simplex corners -> words of [P * (d+1)] keys."""
    points, corners, dim = quotients.shape
    remainder = jnp.broadcast_to(jnp.arange(corners, dtype=jnp.int32), (points, corners))
    return _pack([remainder.reshape(-1)] + [quotients[..., a].reshape(-1) for a in range(dim)],
                 layout)


def _step_fields(fields: list[jax.Array], direction: jax.Array,
                 sign: jax.Array) -> list[jax.Array]:
    """The vertex key + sign * step along `direction`, as (remainder, quotients): no division.

    Along direction j < d coordinate j moves by d and the others by -1, along d all by -1
    (Adams p.7). Since d = -1 mod d+1, the remainder moves by -sign; where it wraps
    (past 0 or d), the other coordinates' quotients move by -sign, else coordinate j's by sign.
    """
    remainder, quotients = fields[0], fields[1:]
    dim = len(quotients)
    wraps = jnp.where(sign > 0, remainder == 0, remainder == dim)
    moved = jnp.where(wraps, jnp.where(sign > 0, dim, 0), remainder - sign)
    return [moved] + [q + jnp.where(a == direction, jnp.where(wraps, 0, sign),
                                    jnp.where(wraps, -sign, 0))
                      for a, q in enumerate(quotients)]


class _VertexIndex(NamedTuple):
    """An image's open-addressing hash table of occupied lattice vertices.

    owner [T]: the first entry (point, corner) holding the key in each slot, _SENTINEL if empty;
    words: the packed key of every entry [N(d+1)]; vertex [N(d+1)]: each entry's vertex id
    (0..count-1, in order of first occurrence); keys: the words of each vertex id, sentinel
    padded.
    """
    owner: jax.Array
    words: tuple[jax.Array, ...]
    vertex: jax.Array
    keys: tuple[jax.Array, ...]


def _table_bits(entries: int) -> int:
    """log2 of the hash table's slots: at least twice the entries, so it is at most half full."""
    return max(4, int(2 * entries - 1).bit_length())


def _home_slot(words: tuple[jax.Array, ...], bits: int) -> jax.Array:
    """Multiplicative hash of the packed key words: the top `bits` bits of a mixed uint32."""
    mixed = jnp.zeros(words[0].shape, jnp.uint32)
    for w in words:
        mixed = (mixed ^ w.astype(jnp.uint32)) * jnp.uint32(0x9E3779B1)
        mixed = mixed ^ (mixed >> 16)
    mixed = mixed * jnp.uint32(0x85EBCA6B)
    return (mixed >> (32 - bits)).astype(jnp.int32)


def _same_key(words, others) -> jax.Array:
    same = words[0] == others[0]
    for w, o in zip(words[1:], others[1:], strict=True):
        same = same & (w == o)
    return same


def _insert(words: tuple[jax.Array, ...],
            bits: int) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """Linear-probing insertion of all entries at once: (owner table [2^bits], slot per entry,
    the words as the loop holds them).

    Each round, unplaced entries whose probe slot is empty claim it (the lowest entry id wins a
    scatter-min); an entry whose slot's owner has its key is placed, any other probes on.
    Equal keys share a home slot, so they settle in the round their first entry claims it.
    The words ride in the loop state and later steps read them from there: computed from the
    simplex outside it, XLA:CPU recomputed them in every consumer (the barrier is dropped on CPU).
    """
    size = 1 << bits
    ids = jnp.arange(words[0].shape[0], dtype=jnp.int32)

    def unplaced(state):
        return jnp.any(~state[2])

    def round_(state):
        owner, slot, placed, words = state
        claim = ~placed & (owner[slot] == _SENTINEL)
        owner = owner.at[jnp.where(claim, slot, size)].min(ids, mode='drop')
        holder = owner[slot]
        found = _same_key(words, tuple(jnp.take(w, holder, mode='clip') for w in words))
        slot = jnp.where(placed | found, slot, (slot + 1) & (size - 1))
        return owner, slot, placed | found, words

    owner = jnp.full((size,), _SENTINEL, jnp.int32)
    owner, slot, _, words = jax.lax.while_loop(
        unplaced, round_, (owner, _home_slot(words, bits), jnp.zeros(ids.shape, bool), words))
    return owner, slot, words


def _lookup(owner: jax.Array, words: tuple[jax.Array, ...], queries: tuple[jax.Array, ...],
            bits: int) -> jax.Array:
    """The entry holding each query key (probing as `_insert` did), _SENTINEL where absent."""
    size = 1 << bits
    home = _home_slot(queries, bits)

    def unresolved(state):
        return jnp.any(~state[1])

    def round_(state):
        probe, resolved, entry = state
        holder = owner[(home + probe) & (size - 1)]
        empty = holder == _SENTINEL
        found = ~empty & _same_key(queries, tuple(jnp.take(w, holder, mode='clip')
                                                  for w in words))
        entry = jnp.where(~resolved & found, holder, entry)
        done = resolved | found | empty
        return jnp.where(done, probe, probe + 1), done, entry

    start = (jnp.zeros_like(home), jnp.zeros(home.shape, bool),
             jnp.full(home.shape, _SENTINEL, jnp.int32))
    return jax.lax.while_loop(unresolved, round_, start)[2]


def _hashed_vertices(features: jax.Array, packing: _Packing):
    """Dedupe an image's simplex corners with a hash table: (offsets, weights, index, count).

    One scatter-min per probing round (a handful of rounds: the table is mostly empty) instead
    of a sort of all N(d+1) corners: multi-operand sorts are ~5x slower than scatters on XLA:CPU.
    """
    num, dim = features.shape
    quotients, weights = _simplex_vertices(features)
    bits = _table_bits(num * (dim + 1))
    owner, slot, words = _insert(_vertex_words(quotients, packing.vertex), bits)
    first = owner[slot]  # the entry that stands for each entry's vertex
    ids = jnp.arange(num * (dim + 1), dtype=jnp.int32)
    is_first = first == ids
    vertex_of_first = jnp.cumsum(is_first.astype(jnp.int32)) - 1
    vertex = vertex_of_first[first]
    count = vertex_of_first[-1] + 1
    first_of_vertex = jnp.full(ids.shape, _SENTINEL, jnp.int32).at[
        jnp.where(is_first, vertex_of_first, ids.shape[0])].set(ids, mode='drop')
    vertex_keys = tuple(jnp.where(first_of_vertex == _SENTINEL, _SENTINEL,
                                  jnp.take(w, first_of_vertex, mode='clip')) for w in words)
    index = _VertexIndex(owner, words, vertex, vertex_keys)
    return vertex.reshape(num, dim + 1), weights, index, count


def _blur_neighbours(index: _VertexIndex, num_vertices: jax.Array, packing: _Packing,
                     capacity: int) -> jax.Array:
    """[d+1, 2, capacity+1]: per direction j the vertices key +/- (-1,..,-1, d at j) (Adams p.7).

    Looked up in the hash table; absent neighbours (and any past `capacity`) point at the zero
    row `capacity`, whose own column is last.
    """
    fields = _unpack(tuple(k[:capacity] for k in index.keys), packing.vertex)
    dim = len(fields) - 1
    bits = _table_bits(index.vertex.shape[0])

    def neighbours_along(step):
        # One direction's lookups at a time (lax.map): all 2(d+1) at once needed ~3x the
        # memory of the whole mean field for their probing state.
        moved = _step_fields(fields, step // 2, 1 - 2 * (step % 2))  # (j, +1), (j, -1), ...
        entry = _lookup(index.owner, index.words, _pack(moved, packing.vertex), bits)
        found = jnp.take(index.vertex, entry, mode='clip')
        valid = (entry != _SENTINEL) & (found < capacity) & (jnp.arange(capacity) < num_vertices)
        return jnp.where(valid, found, capacity)

    neighbours = jax.lax.map(neighbours_along, jnp.arange(2 * (dim + 1), dtype=jnp.int32))
    neighbours = neighbours.reshape(dim + 1, 2, capacity)
    return jnp.pad(neighbours, ((0, 0), (0, 0), (0, 1)), constant_values=capacity)


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
    """Batched `_hashed_vertices`: offsets, weights [B, N, d+1], hash indices, counts [B]."""
    return jax.vmap(lambda f: _hashed_vertices(f, packing))(features)


def _image_neighbours(index: _VertexIndex, counts, packing: _Packing, capacity: int) -> jax.Array:
    """[B, d+1, 2, capacity+1] blur neighbours of each image's first `capacity` vertices."""
    return jax.vmap(lambda i, n: _blur_neighbours(i, n, packing, capacity))(index, counts)


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
    offsets, weights, index, counts = _image_vertices(features, packing)
    capacity = num * (dim + 1) if capacity is None else capacity
    neighbours = _image_neighbours(index, counts, packing, capacity)
    return _batch_lattice(offsets, weights, neighbours), counts


def permutohedral_filter(features: jax.Array, values: jax.Array,
                         feature_max: tuple[float, ...]) -> jax.Array:
    """Lattice approximation of exp(-|f_i - f_j|^2 / 2) filtering, per image: [B, N, V]."""
    lattice, _ = permutohedral_lattice(features, feature_max)
    batch, num, channels = values.shape
    return lattice_filter(lattice, values.reshape(batch * num, channels)).reshape(values.shape)
