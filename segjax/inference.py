"""Inference on images of any size: whole image, batched sliding window, multi-scale + flip.

All functions are pure and jit-able; `apply_fn(images [N,h,w,3]) -> logits [N,h,w,C]` is the
model with its variables bound. The same code serves in-training evaluation, segjax.evaluate and
segjax.predict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.layers import resize_bilinear

ApplyFn = Callable[[jax.Array], jax.Array]


def whole_logits(apply_fn: ApplyFn, images: jax.Array, *, size_multiple: int = 1) -> jax.Array:
    """Logits of the whole image, zero-padded bottom/right to a multiple of `size_multiple`."""
    height, width = images.shape[1:3]
    pad_h, pad_w = -height % size_multiple, -width % size_multiple
    padded = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return apply_fn(padded)[:, :height, :width]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, plus one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_window_logits(apply_fn: ApplyFn, images: jax.Array, *,
                          window: Sequence[int], stride: Sequence[int],
                          window_batch: int = 8) -> jax.Array:
    """Logits from overlapping windows, summed and divided by each pixel's window count.

    Windows are cut inside jit and run `window_batch` at a time (a lax.scan over full batches,
    then one call for the rest), so memory grows with the window batch, not with the image.
    Images smaller than the window are zero-padded to it and the logits cropped back.
    """
    batch, height, width, _ = images.shape
    win_h, win_w = window
    padded_h, padded_w = max(height, win_h), max(width, win_w)
    images = jnp.pad(images, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))
    ys = window_starts(padded_h, win_h, stride[0])
    xs = window_starts(padded_w, win_w, stride[1])
    # One row per window: (image index, y, x): full chunks of window_batch, then the rest.
    table = np.array([(b, y, x) for b in range(batch) for y in ys for x in xs], np.int32)
    num_full = len(table) // window_batch
    full_chunks = table[:num_full * window_batch].reshape(num_full, window_batch, 3)
    remainder = table[num_full * window_batch:]

    def cut(index):
        b, y, x = index
        return jax.lax.dynamic_slice(images[b], (y, x, 0), (win_h, win_w, images.shape[-1]))

    def run_chunk(canvas, indices):
        logits = apply_fn(jax.vmap(cut)(indices)).astype(jnp.float32)

        def add(i, canvas):
            b, y, x = indices[i]
            start = (b, y, x, 0)
            size = (1, win_h, win_w, canvas.shape[-1])
            current = jax.lax.dynamic_slice(canvas, start, size)
            return jax.lax.dynamic_update_slice(canvas, current + logits[i][None], start)

        return jax.lax.fori_loop(0, len(indices), add, canvas), None

    num_classes = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct(
        (1, win_h, win_w, images.shape[-1]), images.dtype)).shape[-1]
    canvas = jnp.zeros((batch, padded_h, padded_w, num_classes), jnp.float32)
    if num_full:
        canvas, _ = jax.lax.scan(run_chunk, canvas, jnp.asarray(full_chunks))
    if len(remainder):  # one smaller call rather than padding a chunk with wasted windows
        canvas, _ = run_chunk(canvas, jnp.asarray(remainder))
    counts = np.zeros((padded_h, padded_w), np.float32)
    for y in ys:
        for x in xs:
            counts[y:y + win_h, x:x + win_w] += 1
    return (canvas / counts[None, :, :, None])[:, :height, :width]


def probabilities(apply_fn: ApplyFn, images: jax.Array, *, mode: str = 'whole',
                  scales: Sequence[float] = (1.0,), flip: bool = False,
                  window: Sequence[int] | None = None, stride: Sequence[int] | None = None,
                  window_batch: int = 8, size_multiple: int = 1) -> jax.Array:
    """Class probabilities [B,H,W,C] averaged over scales (and horizontal flips), at the
    original resolution; `mode` 'whole' or 'slide' decides how each scaled image is run.

    As mmsegmentation's test-time augmentation: the image is resized to round(scale * size),
    its logits resized back before the softmax, both with `resize_bilinear` (half-pixel
    centres, no antialiasing, = torch's bilinear with align_corners=False)."""
    if mode not in ('whole', 'slide'):
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if mode == 'slide' and (window is None or stride is None):
        raise ValueError("inference mode 'slide' needs a window and a stride (config.eval)")
    height, width = images.shape[1:3]

    def logits_of(x):
        if mode == 'slide':
            return sliding_window_logits(apply_fn, x, window=window, stride=stride,
                                         window_batch=window_batch)
        return whole_logits(apply_fn, x, size_multiple=size_multiple)

    total, count = 0.0, 0
    for scale in scales:
        scaled = resize_bilinear(images, round(height * scale), round(width * scale))
        views = [(scaled, False)] + ([(scaled[:, :, ::-1], True)] if flip else [])
        for view, flipped in views:
            logits = logits_of(view)
            logits = logits[:, :, ::-1] if flipped else logits
            logits = resize_bilinear(logits, height, width).astype(jnp.float32)
            total = total + jax.nn.softmax(logits)
            count += 1
    return total / count
