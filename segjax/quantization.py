"""int8 quantization in JAX: quantization-aware training (fake quant) and weight-only int8.

    config.quantization.mode = None                # float training and export
    config.quantization.mode = 'qat'               # int8 weights and activations simulated
    config.quantization.mode = 'weight_only_int8'  # int8 weights simulated; exported as int8

Fake quantization rounds a float tensor to the int8 grid and back in the forward pass and
passes the gradient straight through (the straight-through estimator, Bengio et al. 2013;
Jacob et al. 2018 for integer inference), so training sees what int8 inference will compute:

    weights      symmetric, per output channel (the last kernel axis), levels -127..127, the
                 scale max|w| / 127 (TFLite's scheme for int8 conv / dense weights)
    activations  asymmetric, per tensor, levels -128..127 over the range [min(x, 0), max(x, 0)]
                 of the batch (TFLite calibrates the same kind of range on representative data);
                 the input of every layer that owns a 'kernel' and the model's logits

`quantization_aware(model, mode)` wraps any segjax model (same `init`/`apply`, same variables,
so a float checkpoint resumes into QAT); `for_export` undoes the wrapper for the exporter:
QAT weights go to the TFLite int8 converter as floats (it quantizes them on the same grid),
weight-only int8 stores int8 kernels + float32 scales in the artefact, dequantized inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODES = (None, 'qat', 'weight_only_int8')
WEIGHT_LEVELS = 127  # symmetric int8 weights: -127..127 (TFLite's narrow range)
ACTIVATION_RANGE = (-128, 127)


class QuantizationError(ValueError):
    """A config.quantization value the code cannot use."""


def check_mode(mode: Any) -> None:
    if mode not in MODES:
        raise QuantizationError(f'config.quantization.mode={mode!r}: expected one of '
                                f'{list(MODES)}')


@jax.custom_vjp
def _round_with_range_gradient(x: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(x, low, high))


def _round_fwd(x, low, high):
    return _round_with_range_gradient(x, low, high), (x, low, high)


def _round_bwd(residuals, cotangent):
    x, low, high = residuals
    # Straight-through where x rounds into [low, high] (half a level of slack, so a tensor's
    # own max, x / scale = 127.00001 in float32, keeps its gradient); zero where clipped.
    inside = (x >= low - 0.5) & (x <= high + 0.5)
    return (jnp.where(inside, cotangent, 0).astype(cotangent.dtype),
            jnp.zeros_like(low), jnp.zeros_like(high))


_round_with_range_gradient.defvjp(_round_fwd, _round_bwd)


def fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array, *, qmin: int,
               qmax: int) -> jax.Array:
    """(clip(round(x / scale + zero_point), qmin, qmax) - zero_point) * scale, with the
    gradient d/dx = 1 where x / scale + zero_point rounds into [qmin, qmax] and 0 outside.
    `scale` and `zero_point` broadcast against x and get no gradient.

    >>> fake_quant(jnp.array([0.26, -1.0, 5.0]), jnp.array(0.5), jnp.array(0.0),
    ...            qmin=-2, qmax=2).tolist()
    [0.5, -1.0, 1.0]
    """
    scale = jax.lax.stop_gradient(scale)
    zero_point = jax.lax.stop_gradient(zero_point)
    levels = _round_with_range_gradient(x / scale + zero_point, jnp.asarray(qmin, x.dtype),
                                        jnp.asarray(qmax, x.dtype))
    return (levels - zero_point) * scale


def weight_scale(kernel: jax.Array) -> jax.Array:
    """Per-output-channel symmetric scale, shaped to broadcast against `kernel` (last axis =
    output channels); channels of zeros get scale 1 (any scale represents them)."""
    reduce_axes = tuple(range(kernel.ndim - 1))
    absmax = jnp.max(jnp.abs(kernel), axis=reduce_axes, keepdims=True)
    return jnp.where(absmax > 0, absmax / WEIGHT_LEVELS, 1.0).astype(kernel.dtype)


def fake_quant_weight(kernel: jax.Array) -> jax.Array:
    """The kernel on the symmetric per-channel int8 grid (no value is clipped: gradient 1)."""
    return fake_quant(kernel, weight_scale(kernel), jnp.zeros((), kernel.dtype),
                      qmin=-WEIGHT_LEVELS, qmax=WEIGHT_LEVELS)


def activation_scale_zero_point(low: jax.Array, high: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
    """Asymmetric int8 (scale, integer zero point) for the range [low, high] widened to hold
    0, so that 0 (padding, ReLU) is exact; a zero-width range gets scale 1."""
    qmin, qmax = ACTIVATION_RANGE
    low = jnp.minimum(low, 0.0)
    high = jnp.maximum(high, 0.0)
    scale = jnp.where(high > low, (high - low) / (qmax - qmin), 1.0)
    zero_point = jnp.clip(jnp.round(qmin - low / scale), qmin, qmax)
    return scale, zero_point


def fake_quant_activation(x: jax.Array) -> jax.Array:
    """x on the per-tensor asymmetric int8 grid of its own range (the batch's min and max)."""
    low = jax.lax.stop_gradient(jnp.min(x).astype(jnp.float32))
    high = jax.lax.stop_gradient(jnp.max(x).astype(jnp.float32))
    scale, zero_point = activation_scale_zero_point(low, high)
    qmin, qmax = ACTIVATION_RANGE
    return fake_quant(x, scale.astype(x.dtype), zero_point.astype(x.dtype), qmin=qmin,
                      qmax=qmax)


def is_kernel(path: tuple, leaf: jax.Array) -> bool:
    """A 'kernel' parameter of at least 2 dimensions (conv, transposed conv, dense)."""
    name = getattr(path[-1], 'key', None) if path else None
    return name == 'kernel' and getattr(leaf, 'ndim', 0) >= 2


def fake_quant_params(params: Any) -> Any:
    """Every kernel fake-quantized per output channel; biases, norms and the rest unchanged."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fake_quant_weight(leaf) if is_kernel(path, leaf) else leaf, params)


def _quantize_layer_inputs(next_fun, args, kwargs, context):
    """nn.intercept_methods hook: a layer that owns a kernel sees int8-grid inputs."""
    module = context.module
    if (context.method_name == '__call__' and args and isinstance(args[0], jax.Array)
            and jnp.issubdtype(args[0].dtype, jnp.floating)
            and module.has_variable('params', 'kernel')):
        args = (fake_quant_activation(args[0]), *args[1:])
    return next_fun(*args, **kwargs)


def _quantize_logits(outputs: Any) -> Any:
    if isinstance(outputs, dict) and 'logits' in outputs:
        return {**outputs, 'logits': fake_quant_activation(outputs['logits'])}
    return fake_quant_activation(outputs)


@dataclasses.dataclass(frozen=True)
class QuantizationAware:
    """`model` trained and evaluated with fake-quantized int8 kernels (both modes) and layer
    inputs and logits (mode 'qat'). Its variables are the float model's: the fake
    quantization happens inside `apply`, so checkpoints stay float and interchangeable."""

    model: nn.Module
    mode: str

    def init(self, *args, **kwargs):
        return self.model.init(*args, **kwargs)

    def apply(self, variables: dict, *args, **kwargs):
        variables = {**variables, 'params': fake_quant_params(variables['params'])}
        if self.mode == 'weight_only_int8':
            return self.model.apply(variables, *args, **kwargs)
        with nn.intercept_methods(_quantize_layer_inputs):
            result = self.model.apply(variables, *args, **kwargs)
        if kwargs.get('mutable'):  # (outputs, updated collections)
            return _quantize_logits(result[0]), result[1]
        return _quantize_logits(result)

    def __getattr__(self, name: str):  # the model's fields (num_classes, ...)
        if name == 'model':  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def quantization_aware(model: nn.Module, mode: str | None):
    """`model` itself for mode None, else wrapped in QuantizationAware."""
    check_mode(mode)
    return model if mode is None else QuantizationAware(model, mode)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    """A kernel stored as int8 levels and a float32 scale per output channel."""

    levels: jax.Array
    scale: jax.Array

    def dequantize(self) -> jax.Array:
        # jnp, not numpy: under a trace the conversion is staged, so int8 constants are stored.
        return jnp.asarray(self.levels).astype(jnp.float32) * jnp.asarray(self.scale)


def int8_kernel(kernel) -> Int8Kernel:
    """The kernel's symmetric per-channel int8 levels (numpy, so they export as constants)."""
    kernel = np.asarray(kernel, np.float32)
    scale = np.asarray(weight_scale(jnp.asarray(kernel)))
    levels = np.clip(np.round(kernel / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    return Int8Kernel(levels, scale)


def int8_params(params: Any) -> Any:
    """Every kernel as an Int8Kernel; the other leaves as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: int8_kernel(leaf) if is_kernel(path, leaf) else leaf, params)


def dequantize_params(params: Any) -> Any:
    return jax.tree.map(lambda leaf: leaf.dequantize() if isinstance(leaf, Int8Kernel) else leaf,
                        params, is_leaf=lambda leaf: isinstance(leaf, Int8Kernel))


@dataclasses.dataclass(frozen=True)
class Int8Weights:
    """`model` applied to variables whose kernels are Int8Kernels, dequantized inside `apply`:
    a traced (exported) function holds int8 constants, ~4x fewer bytes than float32."""

    model: nn.Module

    def apply(self, variables: dict, *args, **kwargs):
        return self.model.apply({**variables, 'params': dequantize_params(variables['params'])},
                                *args, **kwargs)


def for_export(model, variables: dict) -> tuple[Any, dict]:
    """(model, variables) to export: the float model for None and 'qat' (the TFLite int8
    converter quantizes the QAT-trained float weights itself), int8-stored kernels for
    'weight_only_int8'."""
    if not isinstance(model, QuantizationAware):
        return model, variables
    if model.mode == 'weight_only_int8':
        return Int8Weights(model.model), {**variables, 'params': int8_params(variables['params'])}
    return model.model, variables
