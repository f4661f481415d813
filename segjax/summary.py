"""Where training's scalars and images go: TensorBoard event files, Weights & Biases when
config.wandb.project is set (segjax.wandb_writer), plus any writer a sweep adds (anything with
`scalars`, `images`, `flush` and `close`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import ml_collections
import numpy as np


class Writer(Protocol):
    """What the train loop writes to; each writer decides which processes write."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def images(self, step: int, name: str, images: np.ndarray) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


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


def make_writers(config: ml_collections.ConfigDict, workdir: str) -> list[Writer]:
    """A run's writers: TensorBoard under `workdir` always, W&B when config.wandb.project is set
    (wandb is imported only then)."""
    writers: list[Writer] = [SummaryWriter(workdir)]
    if config.wandb.project is not None:
        from segjax.wandb_writer import WandbWriter  # imports wandb when it is built

        writers.append(WandbWriter(config, workdir))
    return writers


class Writers:
    """Writes every summary to each of `writers` in order; closes them all, even if one fails."""

    def __init__(self, writers: Sequence[Writer]):
        self._writers = tuple(writers)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for writer in self._writers:
            writer.scalars(step, values)

    def images(self, step: int, name: str, images: np.ndarray) -> None:
        for writer in self._writers:
            writer.images(step, name, images)

    def flush(self) -> None:
        for writer in self._writers:
            writer.flush()

    def close(self) -> None:
        errors = []
        for writer in self._writers:
            try:
                writer.close()
            except Exception as e:  # noqa: BLE001 - close the rest, then raise the first
                errors.append(e)
        if errors:
            raise errors[0]
