"""Palettes, colour masks, overlays and confusion-matrix plots (numpy in, uint8 images out).

Matplotlib is imported only inside `plot_confusion_matrix`, so importing this module stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def default_palette(num_classes: int) -> np.ndarray:
    """The Pascal VOC palette, uint8 [num_classes, 3]: class 0 black, 1 dark red, 2 dark green...

    Bits 0, 1, 2 of the class index go to the most significant free bit of R, G, B; the next three
    bits to the next one down, and so on (the VOCdevkit `labelcolormap` bit interleaving).
    """
    index = np.arange(num_classes, dtype=np.int64)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            palette[:, channel] |= bit << (7 - shift)
    return palette.astype(np.uint8)


def color_mask(
    mask: np.ndarray,
    palette: np.ndarray,
    ignore_index: int = 255,
    ignore_color: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Class-index mask [H, W] (any leading shape) -> uint8 colours [H, W, 3] from `palette`.

    Pixels equal to `ignore_index`, and any index outside the palette, get `ignore_color`.
    """
    mask = np.asarray(mask).astype(np.int64)
    palette = np.asarray(palette, dtype=np.uint8)
    known = (mask >= 0) & (mask < len(palette)) & (mask != ignore_index)
    colors = palette[np.where(known, mask, 0)]
    colors[~known] = np.asarray(ignore_color, dtype=np.uint8)
    return colors


def overlay(
    image: np.ndarray, color: np.ndarray, alpha: float = 0.5, mask: np.ndarray | None = None
) -> np.ndarray:
    """Blend `(1 - alpha) * image + alpha * color`, uint8 [H, W, 3].

    With `mask` ([H, W]), only pixels where mask > 0 are blended (e.g. pass the class mask so
    background class 0 shows the plain image); elsewhere the image is kept.
    """
    image = np.asarray(image)
    color = np.asarray(color)
    if image.shape != color.shape:
        raise ValueError(f'image {image.shape} and colour {color.shape} shapes differ')
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    blended = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if mask is None:
        return blended
    return np.where(np.asarray(mask)[..., None] > 0, blended, image.astype(np.uint8))


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo `(x - mean) / std` (mean and std in 0-255 units, per channel): uint8 image.

    Works on [H, W, 3] or [B, H, W, 3], numpy or jax arrays.
    """
    image = np.asarray(image, dtype=np.float32)
    restored = image * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(restored), 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, label_color: np.ndarray, pred_color: np.ndarray) -> np.ndarray:
    """[H, W, 3] x 3 -> uint8 [H, 3W, 3] (image | ground truth | prediction) for image summaries.

    Batched [B, H, W, 3] inputs give [B, H, 3W, 3].
    """
    parts = [np.asarray(part) for part in (image, label_color, pred_color)]
    if len({part.shape for part in parts}) != 1:
        raise ValueError(f'shapes differ: {[part.shape for part in parts]}')
    return np.concatenate(parts, axis=-2).astype(np.uint8)


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = 'confusion matrix',
) -> str:
    """Write a PNG of the confusion matrix (rows = ground truth, columns = prediction).

    Colours are row-normalised (each cell is the share of that ground-truth class, i.e. recall
    on the diagonal); each cell is annotated with that percentage when there are at most 30
    classes. Rows absent from the ground truth stay blank. Returns the path written.
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no GUI, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    num_classes = cm.shape[0]
    if cm.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(f'cm {cm.shape} does not match {len(class_names)} class names')
    rows = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    size = max(4.0, 0.45 * num_classes + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap='Blues', vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='share of ground-truth row')
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, labels=[str(name) for name in class_names], rotation=90)
    ax.set_yticks(ticks, labels=[str(name) for name in class_names])
    ax.set_xlabel('prediction')
    ax.set_ylabel('ground truth')
    ax.set_title(title)
    if num_classes <= 30:
        fontsize = 8 if num_classes <= 12 else 5
        for i in range(num_classes):
            if rows[i, 0] == 0:
                continue
            for j in range(num_classes):
                # White text on the dark (high-share) cells keeps the numbers readable.
                text_color = 'white' if shares[i, j] > 0.5 else 'black'
                ax.text(j, i, f'{100 * shares[i, j]:.1f}', ha='center', va='center',
                        color=text_color, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)
