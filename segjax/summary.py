"""TensorBoard event files (scalars and images); only process 0 writes."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


class SummaryWriter:
    """Writes TensorBoard scalars and images under `logdir` on process 0, nothing elsewhere."""

    def __init__(self, logdir: str):
        self._writer = None
        if jax.process_index() == 0:
            import tensorflow as tf  # already a dependency through TFDS

            self._tf = tf
            self._writer = tf.summary.create_file_writer(logdir)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, float(value))

    def images(self, step: int, name: str, images: np.ndarray) -> None:
        """`images` uint8 [N,H,W,3]."""
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            self._tf.summary.image(name, images, max_outputs=len(images))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
