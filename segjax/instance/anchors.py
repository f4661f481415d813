"""Anchors of the FPN levels, as torchvision's `AnchorGenerator` makes them, in its order.

Anchors depend only on static shapes (the padded image size and each level's grid), so they are
computed once in numpy float32 and enter jit as constants. Order: level by level; within a
level row-major over grid cells (y, then x); within a cell sizes-major over (aspect ratio, size),
the order of torchvision's `cell_anchors`, so RPN outputs flatten to the same anchor order as
torchvision's `concat_box_prediction_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Mask R-CNN R50-FPN: one size per level P2..P6, three aspect ratios (height / width) each.
FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors [len(ratios) * len(sizes), 4], rounded to integers (half to even),
    ratio-major: torchvision's `AnchorGenerator.generate_anchors` in float32."""
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    widths = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-widths, -heights, widths, heights], axis=1) / np.float32(2))


def grid_anchors(grid_size: tuple[int, int], stride: tuple[int, int],
                 base: np.ndarray) -> np.ndarray:
    """`base` anchors [A, 4] shifted to every cell of a grid: [grid_h * grid_w * A, 4]."""
    grid_h, grid_w = grid_size
    shift_y, shift_x = np.meshgrid(np.arange(grid_h, dtype=np.int32) * stride[0],
                                   np.arange(grid_w, dtype=np.int32) * stride[1], indexing='ij')
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
    return (shifts.astype(np.float32) + base[None]).reshape(-1, 4)


def level_strides(image_size: tuple[int, int],
                  grid_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each level's stride as torchvision infers it: padded image size // grid size."""
    return [(image_size[0] // h, image_size[1] // w) for h, w in grid_sizes]


def anchors_for_levels(image_size: tuple[int, int], grid_sizes: Sequence[tuple[int, int]],
                       sizes: Sequence[Sequence[float]] = FPN_SIZES,
                       aspect_ratios: Sequence[Sequence[float]] = FPN_ASPECT_RATIOS
                       ) -> np.ndarray:
    """All anchors [sum_l h_l * w_l * A_l, 4] (x1, y1, x2, y2) float32 for a padded batch of
    `image_size` (H, W) whose feature maps have `grid_sizes` [(h_l, w_l)]: the anchors
    torchvision's `AnchorGenerator(sizes, aspect_ratios)` gives every image of that batch."""
    if not len(grid_sizes) == len(sizes) == len(aspect_ratios):
        raise ValueError(f'anchors_for_levels: {len(grid_sizes)} feature maps need as many '
                         f'sizes and aspect-ratio tuples, got {len(sizes)} and '
                         f'{len(aspect_ratios)}')
    strides = level_strides(image_size, grid_sizes)
    return np.concatenate([grid_anchors(tuple(grid), stride, cell_anchors(size, ratio))
                           for grid, stride, size, ratio
                           in zip(grid_sizes, strides, sizes, aspect_ratios, strict=True)], axis=0)


def anchors_per_location(sizes: Sequence[Sequence[float]] = FPN_SIZES,
                         aspect_ratios: Sequence[Sequence[float]] = FPN_ASPECT_RATIOS
                         ) -> list[int]:
    """Anchors per grid cell of each level (the RPN head's outputs per cell / 4 for deltas)."""
    return [len(s) * len(a) for s, a in zip(sizes, aspect_ratios, strict=True)]
