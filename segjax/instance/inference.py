"""Mask R-CNN inference on images of any size, as torchvision's eval forward.

torchvision's GeneralizedRCNNTransform -> model -> postprocess, in three steps:

1. `prepare_images` (numpy, host): each uint8 image normalised with mean/std (0-255 units),
   resized keeping its aspect ratio (scale = min(min_size / short side, max_size / long side),
   bilinear, torch's `F.interpolate(align_corners=False)` arithmetic), zero-padded bottom/right
   into one canvas (a multiple of 32; default the batch's largest resized size rounded up, as
   torchvision batches; a fixed canvas gives one compiled shape for every image it holds).
2. `detector(model)`: the jitted eval forward with static shapes -> fixed-size detections.
3. `at_original_size`: per image, the valid detections' boxes scaled back and their 28 x 28
   mask probabilities pasted at the original size (coco_eval.detections_at_original_size).

    detections = detect_images(model, variables, [image_a, image_b], min_size=800,
                               max_size=1333, mean=MEAN, std=STD)
    # [{'boxes' [n, 4] xyxy original pixels, 'scores' [n], 'labels' [n], 'masks' [n, H, W]}, ...]

A canvas larger than torchvision's batch (a fixed one) changes results slightly near the
right/bottom image border: intermediate features there see the canvas's padding, not a zero
border, and padded-area anchors take part in the RPN's top-k.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from segjax.instance.coco_eval import MASK_THRESHOLD, detections_at_original_size, encode_masks
from segjax.instance.maskrcnn import MaskRCNN

SIZE_DIVISIBLE = 32  # torchvision's GeneralizedRCNNTransform size_divisible
# torchvision's image_mean / image_std for its detection models, in 0-255 units.
TORCHVISION_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TORCHVISION_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class PreparedImages(NamedTuple):
    images: np.ndarray          # float32 [B, H, W, 3], normalised, zero-padded
    image_sizes: np.ndarray     # int32 [B, 2] (height, width) after resizing
    original_sizes: np.ndarray  # int32 [B, 2] (height, width) as given


def resized_size(height: int, width: int, *, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision's test-time size: scale = min(min_size / short, max_size / long) in Python
    floats, size = floor(side * scale) (F.interpolate's recompute_scale_factor rule).

    segjax.data.instance_transforms.resized_size is the tf twin (float32) used in training.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(math.floor(height * scale), 1), max(math.floor(width * scale), 1)


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     np.ndarray]:
    """(low, high, low weight, high weight) [target] of a bilinear resize along one axis, in
    torch's upsample_bilinear2d arithmetic (float32, align_corners=False, source >= 0)."""
    ratio = np.float32(source) / np.float32(target)
    real = np.maximum(ratio * (np.arange(target, dtype=np.float32) + np.float32(0.5))
                      - np.float32(0.5), np.float32(0.0))
    low = real.astype(np.int64)
    high = np.where(low < source - 1, low + 1, low)
    high_weight = real - low.astype(np.float32)
    return low, high, np.float32(1.0) - high_weight, high_weight


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [H, W, C] -> [h, w, C], as torch's F.interpolate(mode='bilinear',
    align_corners=False) without antialiasing: columns interpolated first, then rows."""
    image = np.asarray(image, np.float32)
    if tuple(image.shape[:2]) == tuple(size):
        return image
    rows, cols = _linear_taps(image.shape[0], size[0]), _linear_taps(image.shape[1], size[1])
    across = (image[:, cols[0]] * cols[2][:, None] + image[:, cols[1]] * cols[3][:, None])
    return across[rows[0]] * rows[2][:, None, None] + across[rows[1]] * rows[3][:, None, None]


def canvas_size(sizes: Sequence[Sequence[int]], multiple: int = SIZE_DIVISIBLE
                ) -> tuple[int, int]:
    """The smallest (H, W), multiples of `multiple`, holding every (h, w) in `sizes`
    (torchvision's batch_images)."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    return tuple(int(math.ceil(s / multiple) * multiple) for s in sizes.max(axis=0))


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    """uint8 [H, W, 3] with H, W >= 1, or a ValueError naming `name` and what it got."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'{name}: expected an RGB image [H, W, 3], got shape {image.shape}')
    if image.dtype != np.uint8:
        raise ValueError(f'{name}: expected 8-bit (uint8) pixels, got {image.dtype}')
    if 0 in image.shape[:2]:
        raise ValueError(f'{name}: the image is empty (size {image.shape[:2]})')
    return image


# Pillow modes that hold more than 8 bits per sample, and those with an alpha channel.
_WIDE_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] from an 8-bit RGB, grayscale or palette image file; a ValueError naming
    the file for anything else (an alpha channel or 4 channels, more than 8 bits per sample,
    an empty image, an unreadable file). Pillow silently narrows 16-bit RGB PNGs to 8 bits, so
    a PNG's bit depth is read from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, 'rb') as f:
            header = f.read(26)
        with Image.open(path) as image:
            mode, bands, size = image.mode, len(image.getbands()), image.size
            if mode in _ALPHA_MODES or bands == 4:
                raise ValueError(f'{path}: {bands} channels ({mode}); expected an RGB or '
                                 f'grayscale image (remove the alpha channel first)')
            if mode in _WIDE_MODES or (header.startswith(_PNG_SIGNATURE) and header[24] == 16):
                raise ValueError(f'{path}: 16-bit or wider pixels ({mode}); expected 8 bits '
                                 f'per channel')
            if 0 in size:
                raise ValueError(f'{path}: the image is empty (size {size[1]}x{size[0]})')
            pixels = np.asarray(image.convert('RGB'))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f'{path}: cannot read the image: {e}') from None
    return check_image(pixels, path)


def prepare_images(images: Sequence[np.ndarray], *, min_size: int, max_size: int,
                   mean: Sequence[float] = TORCHVISION_MEAN,
                   std: Sequence[float] = TORCHVISION_STD,
                   canvas: tuple[int, int] | None = None) -> PreparedImages:
    """uint8 [H_i, W_i, 3] images of any sizes -> one normalised, resized, padded batch.

    canvas: static (H, W) (multiples of 32) every resized image must fit; default
    `canvas_size` of the resized sizes (torchvision's own padding)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    originals = [check_image(image, f'image {i}').shape[:2] for i, image in enumerate(images)]
    sizes = [resized_size(h, w, min_size=min_size, max_size=max_size) for h, w in originals]
    canvas = canvas_size(sizes) if canvas is None else tuple(canvas)
    if canvas[0] % SIZE_DIVISIBLE or canvas[1] % SIZE_DIVISIBLE:
        raise ValueError(f'canvas {canvas} must be multiples of {SIZE_DIVISIBLE}')
    batch = np.zeros((len(images), *canvas, 3), np.float32)
    for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        if h > canvas[0] or w > canvas[1]:
            raise ValueError(f'image {i}: resized to {(h, w)}, larger than the canvas {canvas}')
        # Normalise then resize, torchvision's order (the same up to float rounding).
        batch[i, :h, :w] = resize_bilinear((image.astype(np.float32) - mean) / std, (h, w))
    return PreparedImages(batch, np.asarray(sizes, np.int32).reshape(-1, 2),
                          np.asarray(originals, np.int32).reshape(-1, 2))


def detector(model: MaskRCNN) -> Callable[[Any, Any, Any], dict]:
    """jit(variables, images [B, H, W, 3], image_sizes [B, 2]) -> `model`'s fixed-size eval
    outputs without pasted masks (they are pasted at the original size afterwards)."""
    model = model.clone(paste_masks=False)
    return jax.jit(functools.partial(model.apply))


def at_original_size(outputs: dict, image_sizes: np.ndarray, original_sizes: np.ndarray
                     ) -> list[dict]:
    """Batched fixed-size outputs -> per image {'boxes' [n, 4], 'scores' [n], 'labels' [n],
    'masks' [n, H, W] probabilities} of its n valid detections at its original (H, W)."""
    outputs = jax.device_get(outputs)
    results = []
    for b, (resized, original) in enumerate(zip(image_sizes, original_sizes, strict=True)):
        valid = np.asarray(outputs['valid'][b], bool)
        one = {k: np.asarray(outputs[k][b])[valid]
               for k in ('boxes', 'scores', 'labels', 'mask_probs')}
        if not valid.any():  # nothing to paste
            results.append({'boxes': one['boxes'], 'scores': one['scores'],
                            'labels': one['labels'],
                            'masks': np.zeros((0, *map(int, original)), np.float32)})
            continue
        one['valid'] = valid[valid]
        pasted = detections_at_original_size(one, tuple(resized), tuple(original))
        results.append({k: pasted[k] for k in ('boxes', 'scores', 'labels', 'masks')})
    return results


def detect_images(model: MaskRCNN, variables: Any, images: Sequence[np.ndarray], *,
                  min_size: int, max_size: int, mean: Sequence[float] = TORCHVISION_MEAN,
                  std: Sequence[float] = TORCHVISION_STD, canvas: tuple[int, int] | None = None,
                  detect_fn: Callable | None = None) -> list[dict]:
    """Detections of a batch of uint8 images of any sizes at their original sizes (see the
    module docstring). detect_fn: a `detector(model)` to reuse across calls (its compiled
    shapes are cached)."""
    prepared = prepare_images(images, min_size=min_size, max_size=max_size, mean=mean,
                              std=std, canvas=canvas)
    detect_fn = detector(model) if detect_fn is None else detect_fn
    outputs = detect_fn(variables, prepared.images, prepared.image_sizes)
    return at_original_size(outputs, prepared.image_sizes, prepared.original_sizes)


def detect_image(model: MaskRCNN, variables: Any, image: np.ndarray, **options) -> dict:
    """One uint8 [H, W, 3] image's detections (see detect_images for the options)."""
    return detect_images(model, variables, [image], **options)[0]


def detections_record(detections: dict, class_names: Sequence[str], image_size: Sequence[int],
                      *, image: str = '') -> dict:
    """JSON-ready record of one image's detections (as `at_original_size` gives them):
    {'image', 'height', 'width', 'detections': [{'box' [x1, y1, x2, y2] (original pixels),
    'label', 'class_name', 'score', 'mask' (COCO RLE of probabilities > 0.5, counts as str)}]}."""
    labels = np.asarray(detections['labels']).astype(int)
    rles = encode_masks(np.asarray(detections['masks']) > MASK_THRESHOLD)
    rows = [{'box': [float(v) for v in box], 'label': int(label),
             'class_name': class_names[label] if 0 <= label < len(class_names) else str(label),
             'score': float(score), 'mask': {'size': [int(s) for s in rle['size']],
                                             'counts': rle['counts']}}
            for box, label, score, rle in zip(np.asarray(detections['boxes']).reshape(-1, 4),
                                              labels, np.asarray(detections['scores']), rles,
                                              strict=True)]
    return {'image': image, 'height': int(image_size[0]), 'width': int(image_size[1]),
            'detections': rows}
