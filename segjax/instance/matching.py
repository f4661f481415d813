"""Assigning ground truth to anchors / proposals, and sampling a balanced training set of them.

`match` is torchvision's `det_utils.Matcher` on a fixed-size [G, N] quality (IoU) matrix whose
ground-truth rows carry a validity mask (an image may have no instance: every prediction is then
below the low threshold). `sample_balanced` is `BalancedPositiveNegativeSampler` with static
shapes: it returns masks, and draws its random subsets with jax.random (the same counts and the
same candidate sets as torchvision; which members are drawn differs from torch's randperm).

Faster / Mask R-CNN settings: RPN `match(..., 0.7, 0.3, allow_low_quality_matches=True)` and
`sample_balanced(..., 256, 0.5)`; RoI heads `match(..., 0.5, 0.5)` and `sample_balanced(...,
512, 0.25)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# torchvision's Matcher codes for predictions without a match.
BELOW_LOW_THRESHOLD = -1  # a negative (background)
BETWEEN_THRESHOLDS = -2  # ignored (neither positive nor negative); also invalid predictions


def match(quality: jax.Array, high_threshold: float, low_threshold: float, *,
          allow_low_quality_matches: bool = False, gt_valid: jax.Array | None = None,
          valid: jax.Array | None = None) -> jax.Array:
    """Matched ground-truth index [N] int32 of each prediction, or BELOW_LOW_THRESHOLD /
    BETWEEN_THRESHOLDS, from quality [G, N] (ground truth x predictions, e.g. box_iou).

    A prediction's best ground truth (ties: the lower index, as torch.max) matches when its
    quality is >= high_threshold; below low_threshold it is -1, in between -2. With
    `allow_low_quality_matches`, each ground truth's best predictions (every tie, even at
    quality 0) get their best ground truth back, as torchvision's set_low_quality_matches_.
    `gt_valid` [G] masks padding rows (none valid: every prediction is -1); `valid` [N] masks
    padding predictions, which become -2 and take no part in the low-quality step.
    """
    if low_threshold > high_threshold:
        raise ValueError(f'match: low_threshold {low_threshold} must be <= high_threshold '
                         f'{high_threshold}')
    count, predictions = quality.shape
    gt_valid = jnp.ones(count, bool) if gt_valid is None else gt_valid
    valid = jnp.ones(predictions, bool) if valid is None else valid
    usable = gt_valid[:, None] & valid[None, :]
    quality = jnp.where(usable, quality, -jnp.inf)
    best_quality = jnp.max(quality, axis=0) if count else jnp.full(predictions, -jnp.inf)
    best_gt = (jnp.argmax(quality, axis=0) if count
               else jnp.zeros(predictions, jnp.int32)).astype(jnp.int32)
    matches = jnp.where(best_quality < low_threshold, BELOW_LOW_THRESHOLD,
                        jnp.where(best_quality < high_threshold, BETWEEN_THRESHOLDS, best_gt))
    if allow_low_quality_matches and count:
        best_per_gt = jnp.max(quality, axis=1, keepdims=True)
        # Every (gt, prediction) pair at its gt's best quality, ties included; padding excluded.
        tied = (quality == best_per_gt) & usable
        matches = jnp.where(jnp.any(tied, axis=0), best_gt, matches)
    return jnp.where(valid, matches, BETWEEN_THRESHOLDS).astype(jnp.int32)


def _draw(key: jax.Array, candidates: jax.Array, count: jax.Array, most: int) -> jax.Array:
    """Mask of `count` (<= most, <= candidates) members of `candidates` drawn uniformly."""
    size = candidates.shape[0]
    if most == 0:
        return jnp.zeros(size, bool)
    # Random priorities; non-candidates rank last, so the top `count` are all candidates.
    priority = jnp.where(candidates, jax.random.uniform(key, (size,)), -1.0)
    _, order = lax.top_k(priority, most)
    return jnp.zeros(size, bool).at[order].set(jnp.arange(most) < count)


def sample_balanced(key: jax.Array, labels: jax.Array, batch_size_per_image: int,
                    positive_fraction: float) -> tuple[jax.Array, jax.Array]:
    """(positive [N] bool, negative [N] bool) sampled from one image's labels [N]
    (>= 1 positive, 0 negative, < 0 ignored), as torchvision's BalancedPositiveNegativeSampler:
    min(#positives, int(batch_size_per_image * positive_fraction)) positives, then negatives up
    to batch_size_per_image in all (fewer if there are not enough), each set uniformly at
    random. vmap over images with one key each.
    """
    size = labels.shape[0]
    positive, negative = labels >= 1, labels == 0
    wanted_positives = int(batch_size_per_image * positive_fraction)
    num_positive = jnp.minimum(jnp.sum(positive), wanted_positives)
    num_negative = jnp.minimum(jnp.sum(negative), batch_size_per_image - num_positive)
    positive_key, negative_key = jax.random.split(key)
    return (_draw(positive_key, positive, num_positive, min(wanted_positives, size)),
            _draw(negative_key, negative, num_negative, min(batch_size_per_image, size)))


def first_indices(mask: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """(indices [size] int32, valid [size] bool): the True positions of `mask` [N] in increasing
    order (torch.where's order), padded with index 0 / valid False. Entries past `size` are
    dropped, so size must bound the count (e.g. a sampler's batch size)."""
    count = mask.shape[0]
    positions = jnp.arange(count, dtype=jnp.int32)
    # Larger key = earlier: True positions first, each group by increasing index.
    _, indices = lax.top_k(jnp.where(mask, -positions, -count - positions), min(size, count))
    valid = mask[indices]
    indices = jnp.where(valid, indices, 0).astype(jnp.int32)
    if size > count:
        indices = jnp.concatenate([indices, jnp.zeros(size - count, jnp.int32)])
        valid = jnp.concatenate([valid, jnp.zeros(size - count, bool)])
    return indices, valid
