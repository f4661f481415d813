"""Region Proposal Network (Ren et al. 2015) on FPN levels, as torchvision's
`RegionProposalNetwork` in eval mode: the shared head, then proposal selection.

Selection, per image and with fixed sizes: the `pre_nms_top_n` best anchors of each level by
objectness, decoded (weights 1, 1, 1, 1), clipped to the image, boxes under `min_size` and
scores under `score_threshold` dropped (as a mask), NMS at `nms_threshold` within each level,
the best `post_nms_top_n` kept. Outputs are padded to post_nms_top_n with a validity mask.
The training losses (anchor matching, sampling) are not here yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segjax.instance.boxes import clip_boxes_to_image, decode_boxes, large_enough
from segjax.instance.nms import batched_nms
from segjax.models.layers import torch_padding
from segjax.models.ops import Conv

_head_init = nn.initializers.normal(0.01)  # torchvision's RPNHead: N(0, 0.01), zero bias


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared by all levels, then 1x1 convs to `num_anchors` objectness logits
    and 4 * num_anchors box deltas per cell. Per level: ([B, h, w, A], [B, h, w, A * 4]), the
    deltas ordered (anchor, coordinate) as torchvision's channels."""

    num_anchors: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
        channels = features[0].shape[-1]
        conv = Conv(channels, (3, 3), padding=torch_padding(3), kernel_init=_head_init,
                    dtype=self.dtype, name='conv')
        logits = Conv(self.num_anchors, (1, 1), kernel_init=_head_init, dtype=self.dtype,
                      name='cls_logits')
        deltas = Conv(self.num_anchors * 4, (1, 1), kernel_init=_head_init, dtype=self.dtype,
                      name='bbox_pred')
        outputs = []
        for feature in features:
            hidden = nn.relu(conv(feature))
            outputs.append((logits(hidden), deltas(hidden)))
        return outputs


def flatten_levels(outputs: Sequence[tuple[jax.Array, jax.Array]]
                   ) -> tuple[jax.Array, jax.Array]:
    """Per-level head outputs -> (objectness [B, N], deltas [B, N, 4]) in anchor order (level,
    y, x, anchor), the order of `anchors_for_levels` and torchvision's
    `concat_box_prediction_layers`."""
    batch = outputs[0][0].shape[0]
    objectness = jnp.concatenate([o.reshape(batch, -1) for o, _ in outputs], axis=1)
    deltas = jnp.concatenate([d.reshape(batch, -1, 4) for _, d in outputs], axis=1)
    return objectness.astype(jnp.float32), deltas.astype(jnp.float32)


def _top_per_level(objectness: jax.Array, level_sizes: Sequence[int],
                   pre_nms_top_n: int) -> jax.Array:
    """Indices [B, sum_l min(top_n, n_l)] of each level's best anchors, level by level."""
    indices, start = [], 0
    for size in level_sizes:
        _, best = lax.top_k(objectness[:, start:start + size], min(pre_nms_top_n, size))
        indices.append(best + start)
        start += size
    return jnp.concatenate(indices, axis=1)


def select_proposals(objectness: jax.Array, deltas: jax.Array, anchors: jax.Array,
                     level_sizes: Sequence[int], image_sizes: jax.Array, *,
                     pre_nms_top_n: int = 1000, post_nms_top_n: int = 1000,
                     nms_threshold: float = 0.7, score_threshold: float = 0.0,
                     min_size: float = 1e-3) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(boxes [B, post_nms_top_n, 4], scores (sigmoid) [B, post], valid [B, post]).

    objectness [B, N] logits and deltas [B, N, 4] from `flatten_levels`; anchors [N, 4];
    level_sizes: anchors per level (static); image_sizes [B, 2]: each image's (height, width)
    before padding, which proposals are clipped to. Boxes come by decreasing score.
    Defaults: torchvision's test-time settings (train: 2000 / 2000).
    """
    top = _top_per_level(objectness, level_sizes, pre_nms_top_n)
    levels = jnp.concatenate([jnp.full(min(pre_nms_top_n, n), index, jnp.int32)
                              for index, n in enumerate(level_sizes)])

    def per_image(logits, image_deltas, indices, size):
        boxes = decode_boxes(image_deltas[indices], anchors[indices])
        boxes = clip_boxes_to_image(boxes, size[0], size[1])
        scores = jax.nn.sigmoid(logits[indices])
        valid = large_enough(boxes, min_size) & (scores >= score_threshold)
        keep, kept = batched_nms(boxes, scores, levels, nms_threshold, valid=valid,
                                 max_output=post_nms_top_n)
        return boxes[keep], jnp.where(kept, scores[keep], 0.0), kept

    return jax.vmap(per_image)(objectness, deltas, top, image_sizes)
