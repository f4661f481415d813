"""Instance overlays: one colour per detection (mask fill, mask outline, box) and a
"class score" caption, drawn with Pillow (numpy in, uint8 image out).

    overlay = draw_instances(image, boxes, labels, scores, masks, class_names)
    Image.fromarray(overlay).save('name_instances.png')
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GOLDEN_RATIO_CONJUGATE = 0.618033988749895  # hue step that keeps consecutive hues far apart


def instance_colors(count: int) -> np.ndarray:
    """uint8 [count, 3] colours, distinct for every count up to several hundred: hues stepped by
    the golden ratio, alternating among three saturation/value pairs."""
    shades = ((0.85, 0.95), (0.6, 0.8), (1.0, 0.65))
    colors = [colorsys.hsv_to_rgb((i * GOLDEN_RATIO_CONJUGATE) % 1.0, *shades[i % 3])
              for i in range(count)]
    return np.round(np.asarray(colors, np.float64).reshape(-1, 3) * 255).astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels of `mask` with a 4-neighbour outside it (or on the image border)."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def caption(label: int, score: float, class_names: Sequence[str]) -> str:
    """'name 0.87' (the label's number where class_names does not cover it)."""
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    return f'{name} {score:.2f}'


def draw_instances(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   scores: np.ndarray, masks: np.ndarray | None,
                   class_names: Sequence[str], *, alpha: float = 0.5,
                   mask_threshold: float = 0.5, captions: bool = True) -> np.ndarray:
    """uint8 [H, W, 3]: `image` with each detection i in `instance_colors(n)[i]`: its mask
    (masks [n, H, W], probabilities or 0/1, > mask_threshold) blended at `alpha` and outlined,
    its box (xyxy pixels) drawn, and "class score" written above the box. Detections are drawn
    last to first, so the first (the highest score, for sorted detections) ends on top."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f'draw_instances: expected a uint8 [H, W, 3] image, got '
                         f'{image.dtype} {image.shape}')
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    count = len(boxes)
    if masks is not None and np.shape(masks) != (count, *image.shape[:2]):
        raise ValueError(f'draw_instances: masks {np.shape(masks)} do not match {count} boxes '
                         f'on a {image.shape[:2]} image')
    colors = instance_colors(count)
    canvas = image.astype(np.float32)
    for i in reversed(range(count)):
        if masks is None:
            break
        inside = np.asarray(masks[i]) > mask_threshold
        canvas[inside] = (1 - alpha) * canvas[inside] + alpha * colors[i]
        canvas[mask_outline(inside)] = colors[i]
    picture = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i in reversed(range(count)):
        color = tuple(int(c) for c in colors[i])
        draw.rectangle(boxes[i].tolist(), outline=color, width=1)
        if not captions:
            continue
        text = caption(int(labels[i]), float(scores[i]), class_names)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = float(np.clip(boxes[i, 0], 0, max(image.shape[1] - (right - left), 0)))
        y = float(boxes[i, 1] - (bottom - top) - 2)
        y = y if y >= 0 else float(boxes[i, 1]) + 1  # above the box, or inside at the top
        draw.rectangle((x, y, x + right - left + 1, y + bottom - top + 1), fill=color)
        # Dark text on light colours, white on dark ones.
        ink = (0, 0, 0) if sum(color) > 3 * 140 else (255, 255, 255)
        draw.text((x - left + 1, y - top), text, fill=ink, font=font)
    return np.asarray(picture)
