"""An exported directory: its spec file (export.json) and running its model on images.

    exported = artefact.load('runs/demo/export_onnx')
    outputs = exported(images)   # uint8 [B,H,W,3] -> {'classes', 'probabilities'} numpy

Only the runtime of the directory's format is imported (jax, TensorFlow / TFLite, or ONNX
Runtime); segjax's model code never is.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable

import numpy as np

SPEC_FILE = 'export.json'


class ExportedInputError(ValueError):
    """Images that do not fit an exported model's input (dtype, channels, size)."""


def write_spec(directory: str, spec: dict) -> str:
    path = os.path.join(directory, SPEC_FILE)
    with open(path, 'w') as f:
        json.dump(spec, f, indent=2)
    return path


def read_spec(directory: str) -> dict:
    """The directory's export.json; FileNotFoundError naming it when absent."""
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{directory!r} is not an exported model: no {SPEC_FILE} '
                                '(write one with python -m segjax.export)')
    with open(path) as f:
        return json.load(f)


def check_images(images, spec: dict) -> np.ndarray:
    """`images` as uint8 [B,H,W,3] matching the spec's input, or an ExportedInputError saying
    what differs. A single [H,W,3] image is a batch of one."""
    expected = spec['input']
    if not isinstance(images, np.ndarray):
        images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ExportedInputError(f'images of dtype {images.dtype}; the exported model takes '
                                 'uint8 RGB (0..255), normalisation is inside it')
    if images.ndim == 3:
        images = images[None]
    _, height, width, channels = expected['shape']
    if images.ndim != 4 or images.shape[-1] != channels:
        raise ExportedInputError(f'images shaped {images.shape}; expected [batch, height, '
                                 f'width, {channels}] (RGB)')
    multiple = expected.get('size_multiple')
    if height is None and multiple and (images.shape[1] % multiple or images.shape[2] % multiple):
        raise ExportedInputError(
            f'images of {images.shape[1]}x{images.shape[2]} pixels; this model takes sizes '
            f'that are multiples of {multiple}')
    if height is not None and images.shape[1:3] != (height, width):
        raise ExportedInputError(
            f'images of {images.shape[1]}x{images.shape[2]} pixels; this model was exported at '
            f'{height}x{width} (export again with --image_size {images.shape[1]} '
            f'{images.shape[2]})')
    return images


class Exported:
    """A loaded exported model: call it on uint8 [B,H,W,3] images."""

    def __init__(self, directory: str, spec: dict, run: Callable[[np.ndarray], dict]):
        self.directory = directory
        self.spec = spec
        self._run = run

    def __call__(self, images) -> dict:
        images = check_images(images, self.spec)
        outputs = self._run(images)
        return {name: np.asarray(outputs[name]) for name in ('classes', 'probabilities')}


def load(directory: str) -> Exported:
    """The model in `directory` (any format segjax.export writes), ready to run."""
    spec = read_spec(directory)
    path = os.path.join(directory, spec['file'])
    loaders = {'stablehlo': _stablehlo, 'savedmodel': _savedmodel, 'tflite': _tflite,
               'tflite_int8': _tflite, 'onnx': _onnx}
    if spec.get('format') not in loaders:
        raise ValueError(f'{os.path.join(directory, SPEC_FILE)}: format {spec.get("format")!r}; '
                         f'expected one of {sorted(loaders)}')
    return Exported(directory, spec, loaders[spec['format']](path))


def _stablehlo(path: str):
    import jax

    with open(path, 'rb') as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    # Jitted once: a bare .call re-dispatches the whole call each time (~10x slower on 32x32).
    return jax.jit(exported.call)


def _savedmodel(path: str):
    import tensorflow as tf

    signature = tf.saved_model.load(path).signatures['serving_default']
    return lambda images: {k: v.numpy() for k, v in signature(image=tf.constant(images)).items()}


def _tflite(path: str):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=path)
    # The signature runner resizes the input (a new batch size) and re-allocates as needed.
    runner = interpreter.get_signature_runner('serving_default')
    return lambda images: runner(image=images)


def _onnx(path: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = ['classes', 'probabilities']
    return lambda images: dict(zip(names, session.run(names, {'image': images}), strict=True))
