"""Writing the serving function (serving.py) in each format, through the maintained converters.

    stablehlo    jax.export: model.stablehlo (serialized), loadable with jax alone
    savedmodel   jax2tf (native serialization, an XlaCallModule op), signature serving_default
    tflite       TFLiteConverter from that SavedModel (it lowers the StableHLO inside), float32
    tflite_int8  the same, full-integer post-training quantization on representative images
    onnx         tf2onnx from the float32 TFLite model (tf2onnx cannot read XlaCallModule)

Every format keeps the symbolic batch; the spatial size is the one exported. segjax writes only
the glue: names (input 'image', outputs 'classes' and 'probabilities') and the spec file.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from segjax.export.serving import INPUT_NAME, OUTPUT_NAMES, ExportError, input_spec

FORMATS = ('stablehlo', 'savedmodel', 'tflite', 'tflite_int8', 'onnx')
# The file (or directory) each format writes inside the output directory.
ARTEFACTS = {'stablehlo': 'model.stablehlo', 'savedmodel': 'saved_model',
             'tflite': 'model.tflite', 'tflite_int8': 'model.tflite', 'onnx': 'model.onnx'}
# (import name, pip requirement) of the converters and runtimes each format needs.
REQUIREMENTS = {
    'stablehlo': (),
    'savedmodel': (('tensorflow', 'tensorflow-cpu==2.21.0'),),
    'tflite': (('tensorflow', 'tensorflow-cpu==2.21.0'),),
    'tflite_int8': (('tensorflow', 'tensorflow-cpu==2.21.0'),),
    'onnx': (('tensorflow', 'tensorflow-cpu==2.21.0'), ('tf2onnx', 'tf2onnx==1.17.0'),
             ('onnx', 'onnx==1.23.2'), ('onnxruntime', 'onnxruntime==1.32.0')),
}
ONNX_OPSET = 17


def check_format(name: str) -> None:
    """An ExportError for an unknown format or one whose converter is not installed, naming the
    packages to install."""
    if name not in FORMATS:
        raise ExportError(f'--format {name!r}: expected one of {", ".join(FORMATS)}')
    missing = [pip for module, pip in REQUIREMENTS[name]
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ExportError(f'--format {name} needs {", ".join(missing)}, which is not installed: '
                          f'pip install {" ".join(missing)}')


def write_stablehlo(serving: Callable, height: int, width: int, path: str, *,
                    platforms: Sequence[str] = ('cpu',), size_multiple: int | None = None
                    ) -> None:
    """jax.export's serialized artefact: jax.export.deserialize(bytes).call(images). With
    `size_multiple`, any spatial size that is a multiple of it (serving.input_spec)."""
    exported = jax.export.export(jax.jit(serving), platforms=tuple(platforms))(
        input_spec(height, width, size_multiple))
    with open(path, 'wb') as f:
        f.write(exported.serialize())


def write_savedmodel(serving: Callable, height: int, width: int, path: str) -> None:
    """A SavedModel whose serving_default signature takes 'image' and returns the outputs."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(serving, polymorphic_shapes=[f'(b, {height}, {width}, 3)'],
                               with_gradient=False)
    module = tf.Module()
    module.serving = tf.function(
        converted, autograph=False,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=INPUT_NAME)])
    tf.saved_model.save(module, path, signatures={'serving_default': module.serving})


def write_tflite(saved_model: str, path: str,
                 representative: Iterable[np.ndarray] | None = None,
                 float_ops: Sequence[str] = ()) -> None:
    """TFLite from a SavedModel: float32, or with `representative` uint8 [H,W,3] images
    full-integer int8 (every op int8; the uint8 input and the outputs keep their types).
    `float_ops`: TFLite op types (e.g. 'BATCH_MATMUL') kept in float inside the int8 model
    (TFLite's selective quantization through its QuantizationDebugger)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    if representative is not None:
        images = list(representative)
        if not images:
            raise ExportError('int8 quantization needs at least one representative image')
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in images)
        if float_ops:
            options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_ops=list(float_ops))
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_options=options,
                debug_dataset=lambda: ([image[None]] for image in images[:1]))
            with open(path, 'wb') as f:
                f.write(debugger.get_nondebug_quantized_model())
            return
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with open(path, 'wb') as f:
        f.write(converter.convert())


def write_onnx(tflite_path: str, path: str) -> None:
    """ONNX through tf2onnx's TFLite front end, its graph inputs/outputs renamed to ours."""
    import onnx
    import tf2onnx

    proto, _ = tf2onnx.convert.from_tflite(
        tflite_path, opset=ONNX_OPSET,
        custom_op_handlers={'UnsortedSegmentProd': (segment_product, [])})
    rename_graph_values(proto.graph, onnx_names(proto.graph))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def segment_product(ctx, node, name, args) -> None:
    """tf2onnx handler for UnsortedSegmentProd with constant segment ids: one Gather and
    ReduceProd per segment, concatenated. TFLite computes reshape targets under a symbolic
    batch this way, and tf2onnx 1.17's own handler gives wrong products in the segmentation
    models (ONNX Runtime then fails on the Reshape; ResNet backbones, DeepLabV3+'s ASPP)."""
    import tf2onnx

    data, ids_node, count_node = node.input[0], node.inputs[1], node.inputs[2]
    if not (ids_node.is_const() and count_node.is_const()):
        raise ExportError(f'ONNX: {node.name}: UnsortedSegmentProd with computed segment ids '
                          'is not supported')
    ids = np.asarray(ids_node.get_tensor_value(as_list=True)).ravel()
    count = int(np.asarray(count_node.get_tensor_value(as_list=True)).ravel()[0])
    products = []
    for segment in range(count):
        index = ctx.make_const(tf2onnx.utils.make_name(f'{name}_segment'),
                               np.flatnonzero(ids == segment).astype(np.int64))
        members = ctx.make_node('Gather', [data, index.output[0]], attr={'axis': 0})
        products.append(ctx.make_node('ReduceProd', [members.output[0]],
                                      attr={'axes': [0], 'keepdims': 1}).output[0])
    output = node.output[0]
    ctx.remove_node(node.name)
    ctx.make_node('Concat', products, attr={'axis': 0}, outputs=[output])


def onnx_names(graph) -> dict:
    """{converter's name: ours}: the one input is 'image'; the int32 output is 'classes', the
    float one 'probabilities' (tf2onnx names them after TFLite's tensors)."""
    import onnx

    if len(graph.input) != 1 or len(graph.output) != 2:
        raise ExportError(f'tf2onnx produced inputs {[i.name for i in graph.input]} and outputs '
                          f'{[o.name for o in graph.output]}; expected one input, two outputs')
    names = {graph.input[0].name: INPUT_NAME}
    for output in graph.output:
        is_int = output.type.tensor_type.elem_type == onnx.TensorProto.INT32
        names[output.name] = OUTPUT_NAMES[0] if is_int else OUTPUT_NAMES[1]
    return names


def rename_graph_values(graph, names: dict) -> None:
    """Renames values everywhere they appear: graph inputs/outputs and node inputs/outputs."""
    for value in [*graph.input, *graph.output]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]


def write(fmt: str, serving: Callable, height: int, width: int, directory: str, *,
          representative: Callable[[], Iterable[np.ndarray]] | None = None,
          platforms: Sequence[str] = ('cpu',), size_multiple: int | None = None,
          float_ops: Sequence[str] = ()) -> str:
    """Writes format `fmt` into `directory`; returns the artefact's path. `representative`
    (tflite_int8 only) returns the calibration images when called; `size_multiple`
    (stablehlo only) makes the spatial size symbolic; `float_ops` (tflite_int8 only) are
    TFLite op types left in float."""
    check_format(fmt)
    if size_multiple is not None and fmt != 'stablehlo':
        raise ExportError(f'--symbolic_size: only --format stablehlo has a symbolic spatial '
                          f'size (the TFLite converter needs static shapes); got {fmt}')
    if size_multiple is not None and size_multiple < 1:
        raise ExportError(f'--symbolic_size {size_multiple}: expected a positive multiple')
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ARTEFACTS[fmt])
    if fmt == 'stablehlo':
        write_stablehlo(serving, height, width, path, platforms=platforms,
                        size_multiple=size_multiple)
        return path
    if fmt == 'savedmodel':
        write_savedmodel(serving, height, width, path)
        return path
    if fmt == 'tflite_int8' and representative is None:
        raise ExportError('--format tflite_int8 needs representative images')
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)  # tf.lite's deprecation notice
        saved_model = os.path.join(scratch, 'saved_model')
        write_savedmodel(serving, height, width, saved_model)
        if fmt == 'onnx':
            tflite_path = os.path.join(scratch, 'model.tflite')
            write_tflite(saved_model, tflite_path)
            write_onnx(tflite_path, path)
        else:
            write_tflite(saved_model, path,
                         representative() if fmt == 'tflite_int8' else None,
                         float_ops=float_ops if fmt == 'tflite_int8' else ())
    return path
