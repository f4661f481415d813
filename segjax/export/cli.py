"""python -m segjax.export --config <exp> --workdir <dir> --format <fmt> --output <dir>

Exports a checkpoint as a deployable model: uint8 RGB images [B,H,W,3] in (normalisation
inside), the class map 'classes' [B,H,W] and the softmax 'probabilities' [B,H,W,C] out, the batch
size symbolic, the spatial size fixed (--image_size, default config.data.crop_size). Formats:
stablehlo (jax.export), savedmodel (jax2tf), tflite and tflite_int8 (from that SavedModel; int8
calibrated on --representative images of the eval split), onnx (tf2onnx from the float TFLite).
The output directory holds the model and export.json (its input/output spec, palette, classes);
`python -m segjax.predict --exported <dir>` runs it on images.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from segjax import cli, experiment, quantization, sharding
from segjax.data import prepare
from segjax.export import artefact, formats, serving

REPRESENTATIVE_IMAGES = 100


def representative_images(config: ml_collections.ConfigDict, height: int, width: int,
                          count: int) -> Iterator[np.ndarray]:
    """The first `count` uint8 images of the eval split, resized bilinearly to height x width
    where their size differs (TFLite calibrates on images of the exported size)."""
    import tensorflow as tf

    builder = experiment.dataset_builder(config)
    dataset = builder.as_dataset(split=config.data.eval_split, shuffle_files=False).take(count)
    for example in dataset.as_numpy_iterator():
        image = example['image']
        if image.shape[:2] != (height, width):
            resized = tf.image.resize(image, (height, width), method='bilinear')
            image = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
        yield image


def image_size(config: ml_collections.ConfigDict, requested: Sequence[int] | None
               ) -> tuple[int, int]:
    """--image_size, else config.data.crop_size (the size the model was trained at)."""
    height, width = requested if requested else tuple(config.data.crop_size)
    if height < 1 or width < 1:
        raise serving.ExportError(f'--image_size {height} {width}: expected positive sizes')
    return int(height), int(width)


def spec(args, config: ml_collections.ConfigDict, fmt: str, path: str, height: int,
         width: int, step_number: int) -> dict:
    """export.json: what the model takes and returns, and what it was exported from."""
    model_fn = getattr(config.model.fn, 'func', config.model.fn)  # a variant's partial
    if args.symbolic_size:  # None: any size, a multiple of size_multiple
        height = width = None
    return {
        'format': fmt, 'file': os.path.basename(path),
        'input': {'name': serving.INPUT_NAME, 'dtype': 'uint8',
                  'shape': [None, height, width, 3], 'size_multiple': args.symbolic_size},
        'outputs': serving.output_shapes(height, width, config.data.num_classes),
        'num_classes': config.data.num_classes,
        'class_names': experiment.class_names(config),
        'palette': experiment.palette(config).tolist(),
        'mean': list(config.data.mean), 'std': list(config.data.std),
        'source': {'config': args.config, 'workdir': os.path.abspath(args.workdir),
                   'step': step_number, 'weights': 'ema' if args.ema else 'params',
                   'model': f'{model_fn.__module__}.{model_fn.__qualname__}'},
        'versions': {'jax': jax.__version__},
    }


def main(argv: Sequence[str]) -> str:
    parser = cli.argument_parser('segjax.export', __doc__.splitlines()[2])
    parser.add_argument('--format', required=True, help=', '.join(formats.FORMATS))
    parser.add_argument('--output', required=True, help='directory for the model + export.json')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
    parser.add_argument('--ema', action='store_true', help="export the checkpoint's EMA weights")
    parser.add_argument('--image_size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                        help='spatial size of the exported input (default config.data.crop_size)')
    parser.add_argument('--symbolic_size', type=int, default=None, metavar='M',
                        help='stablehlo: any spatial size that is a multiple of M (2**depth '
                             'for a U-Net, 1 for DeepLabV3+) instead of --image_size')
    parser.add_argument('--float_ops', default='',
                        help='tflite_int8: comma-separated TFLite op types kept in float, e.g. '
                             'BATCH_MATMUL (DeepLabV3+\'s ASPP image pool)')
    parser.add_argument('--representative', type=int, default=REPRESENTATIVE_IMAGES,
                        help='eval-split images that calibrate tflite_int8')
    parser.add_argument('--platforms', default='cpu',
                        help='stablehlo: comma-separated platforms to lower for (cpu,cuda,tpu)')
    args, config = cli.parse(parser, argv)
    try:
        formats.check_format(args.format)  # a missing converter fails before any work
        options = serving.network_options(config)
        height, width = image_size(config, args.image_size)
        mesh = sharding.make_mesh()
        model, state = experiment.restore_state(config, args.workdir, mesh, args.step)
        variables = serving.model_variables(state, ema=args.ema)
        # QAT: the float model (the int8 converter quantizes); weight-only int8: int8 kernels.
        model, variables = quantization.for_export(model, variables)
        function = serving.serving_function(model, variables, mean=config.data.mean,
                                            std=config.data.std, options=options)
        path = formats.write(
            args.format, function, height, width, args.output,
            representative=lambda: representative_images(config, height, width,
                                                          args.representative),
            platforms=args.platforms.split(','), size_multiple=args.symbolic_size,
            float_ops=[op for op in args.float_ops.split(',') if op])
    except (serving.ExportError, FileNotFoundError, prepare.PrepareError) as e:
        parser.exit(1, f'segjax.export: error: {e}\n')
    spec_path = artefact.write_spec(args.output, spec(args, config, args.format, path, height,
                                                      width, int(state.step)))
    print(f'wrote {args.format} ({path}) and {spec_path}')
    return path


def run() -> None:
    main(sys.argv[1:])
