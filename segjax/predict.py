"""python -m segjax.predict --config <exp> --workdir <dir> --input <file|dir|glob> --output <dir>

Segments images with a checkpoint. For each input image `name.ext` it writes `name_mask.png`
(class index per pixel), `name_color.png` (the classes in the palette's colours) and
`name_overlay.png` (the colours blended over the image). With the dense CRF on
(--config.eval.crf.iterations=10) those are the CRF's, and the same network pass without it is
written beside them as `name_nocrf_mask.png`, `name_nocrf_color.png` and `name_nocrf_overlay.png`,
plus `name_crf_compare.png`: the image, the overlay without and the overlay with the CRF, side by
side.

With --exported <dir> (instead of --config/--workdir) it runs a model written by
python -m segjax.export, in any of its formats, and writes the same mask/color/overlay PNGs.

For an instance experiment (a segjax.instance.maskrcnn.MaskRCNN model) it writes
`name_instances.png` (each detection in its own colour: mask, outline, box, "class score") and
`name_detections.json` (boxes xyxy in original pixels, labels, class names, scores, masks as
COCO RLE), the image resized by config.trainer.min_size / max_size as in training.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from segjax import cli, experiment, pretrained, sharding, step, visualize
from segjax.instance import inference as instance_inference
from segjax.instance import visualize as instance_visualize
from segjax.instance.maskrcnn import MaskRCNN

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')


class InputError(ValueError):
    """An input path that names no image, or an image that cannot be read."""


def list_inputs(pattern: str) -> list[str]:
    """Image files named by a file path, a directory (its images) or a glob pattern."""
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, f) for f in sorted(os.listdir(pattern))
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise InputError(f'--input {pattern!r} matches no image file (a file, a directory of '
                         f'{"/".join(IMAGE_EXTENSIONS)} images, or a glob pattern)')
    return paths


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H,W,3]; an unreadable file is an InputError naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert('RGB'))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f'cannot read image {path!r}: {e}') from None


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    return ((image.astype(np.float32) - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))


def write_outputs(output_dir: str, name: str, image: np.ndarray, mask: np.ndarray,
                  palette: np.ndarray) -> np.ndarray:
    """Writes name_mask/_color/_overlay.png; returns the overlay."""
    color = visualize.color_mask(mask, palette)
    overlay = visualize.overlay(image, color)
    Image.fromarray(mask.astype(np.uint8)).save(os.path.join(output_dir, f'{name}_mask.png'))
    Image.fromarray(color).save(os.path.join(output_dir, f'{name}_color.png'))
    Image.fromarray(overlay).save(os.path.join(output_dir, f'{name}_overlay.png'))
    return overlay


def write_crf_comparison(output_dir: str, name: str, image: np.ndarray, mask: np.ndarray,
                         mask_without_crf: np.ndarray, palette: np.ndarray) -> None:
    """name_* (with the CRF), name_nocrf_* and name_crf_compare.png: image | without | with."""
    with_crf = write_outputs(output_dir, name, image, mask, palette)
    without_crf = write_outputs(output_dir, f'{name}_nocrf', image, mask_without_crf, palette)
    Image.fromarray(np.concatenate([image, without_crf, with_crf], axis=1)).save(
        os.path.join(output_dir, f'{name}_crf_compare.png'))


def predict_exported(argv: Sequence[str]) -> list[str]:
    """--exported DIR: the same PNGs from a model written by segjax.export (no checkpoint, no
    model code; the palette comes from the directory's export.json)."""
    from segjax.export import artefact

    parser = argparse.ArgumentParser(
        prog='segjax.predict', description='segments images with an exported model')
    parser.add_argument('--exported', required=True, help='a directory segjax.export wrote')
    parser.add_argument('--input', required=True, help='an image, a directory or a glob')
    parser.add_argument('--output', required=True, help='directory for the output PNGs')
    args = parser.parse_args(argv)
    try:
        paths = list_inputs(args.input)
        images = [read_rgb(p) for p in paths]
        exported = artefact.load(args.exported)
        masks = [exported(image[None])['classes'][0] for image in images]
    except (InputError, FileNotFoundError, artefact.ExportedInputError) as e:
        parser.exit(1, f'segjax.predict: error: {e}\n')
    palette = np.asarray(exported.spec['palette'], np.uint8)
    os.makedirs(args.output, exist_ok=True)
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    for name, image, mask in zip(names, images, masks, strict=True):
        write_outputs(args.output, name, image, mask, palette)
    print(f'wrote {len(names)} x (mask, color, overlay) PNGs to {args.output} '
          f'({exported.spec["format"]} model)')
    return names


def main(argv: Sequence[str]) -> list[str]:
    if any(a == '--exported' or a.startswith('--exported=') for a in argv):
        return predict_exported(argv)
    parser = cli.argument_parser('segjax.predict', __doc__.splitlines()[2])
    parser.add_argument('--input', required=True, help='an image, a directory or a glob')
    parser.add_argument('--output', required=True, help='directory for the output PNGs')
    parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
    args, config = cli.parse(parser, argv)
    try:
        paths = list_inputs(args.input)
        images = [read_rgb(p) for p in paths]  # fail on a bad file before any model work
        mesh = sharding.make_mesh()
        model, state = experiment.restore_state(config, args.workdir, mesh, args.step)
    except (InputError, FileNotFoundError, pretrained.PretrainedError) as e:
        parser.exit(1, f'segjax.predict: error: {e}\n')
    if isinstance(model, MaskRCNN):
        try:  # stricter than read_rgb: no alpha channel, no 16-bit pixels
            images = [instance_inference.read_image(p) for p in paths]
        except ValueError as e:
            parser.exit(1, f'segjax.predict: error: {e}\n')
        return predict_instances(config, model, state, mesh, paths, images, args.output)
    options = experiment.inference_options(config)
    compare_crf = options is not None and 'crf' in options
    # With the CRF on, one network pass gives the masks with and without it.
    predict_fn = jax.jit(functools.partial(
        step.predict_with_and_without_crf if compare_crf else step.predict_step, model=model,
        inference_options=options))
    palette = experiment.palette(config)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path, image in zip(paths, images, strict=True):
        # One image at a time, replicated: sizes differ and a batch of one cannot be split.
        batch = jax.device_put(normalize(image, config.data.mean, config.data.std)[None],
                               sharding.replicated(mesh))
        masks = [np.asarray(m)[0] for m in jax.tree.leaves(jax.device_get(
            predict_fn(state, batch)))]
        name = os.path.splitext(os.path.basename(path))[0]
        if jax.process_index() == 0 and compare_crf:
            write_crf_comparison(args.output, name, image, *masks, palette)
        elif jax.process_index() == 0:
            write_outputs(args.output, name, image, masks[0], palette)
        written.append(name)
    if jax.process_index() == 0:
        kinds = ('mask, color, overlay with and without CRF, crf_compare' if compare_crf
                 else 'mask, color, overlay')
        print(f'wrote {len(written)} x ({kinds}) PNGs to {args.output}')
    return written


def predict_instances(config, model: MaskRCNN, state, mesh, paths: Sequence[str],
                      images: Sequence[np.ndarray], output_dir: str) -> list[str]:
    """name_instances.png and name_detections.json per image (Mask R-CNN experiments).

    The canvas is config.data.crop_size (one compiled shape, as in evaluation) for every image
    whose resized size fits it, else the image's own size rounded up to 32."""
    detect_fn = instance_inference.detector(model)
    replicated = sharding.replicated(mesh)

    def detect(variables, batch, image_sizes):
        return detect_fn(variables, jax.device_put(batch, replicated),
                         jax.device_put(image_sizes, replicated))

    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    min_size, max_size = config.trainer.min_size, config.trainer.max_size
    crop = tuple(config.data.crop_size)
    names = experiment.class_names(config)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path, image in zip(paths, images, strict=True):
        size = instance_inference.resized_size(*image.shape[:2], min_size=min_size,
                                               max_size=max_size)
        fits = size[0] <= crop[0] and size[1] <= crop[1] and not (crop[0] % 32 or crop[1] % 32)
        detections = instance_inference.detect_image(
            model, variables, image, min_size=min_size, max_size=max_size,
            mean=config.data.mean, std=config.data.std, canvas=crop if fits else None,
            detect_fn=detect)
        name = os.path.splitext(os.path.basename(path))[0]
        if jax.process_index() == 0:
            picture = instance_visualize.draw_instances(
                image, detections['boxes'], detections['labels'], detections['scores'],
                detections['masks'], names)
            Image.fromarray(picture).save(os.path.join(output_dir, f'{name}_instances.png'))
            record = instance_inference.detections_record(
                detections, names, image.shape[:2], image=os.path.basename(path))
            with open(os.path.join(output_dir, f'{name}_detections.json'), 'w') as f:
                json.dump(record, f)
        written.append(name)
    if jax.process_index() == 0:
        print(f'wrote {len(written)} x (instances PNG, detections JSON) to {output_dir}')
    return written


def run() -> None:
    main(sys.argv[1:])


if __name__ == '__main__':
    run()
