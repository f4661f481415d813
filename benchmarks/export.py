"""Exported models, per format: artefact size, load time, s/image and agreement with segjax.

    python -m segjax.train --config experiments/unet_synthetic.py --workdir W/unet \
        --config.num_steps=200 --config.ema_decay=0.99
    python -m segjax.train --config experiments/deeplabv3plus_synthetic.py --workdir W/dlv3p \
        --config.num_steps=150
    python benchmarks/export.py --unet W/unet --deeplab W/dlv3p [--out benchmarks/results/X]

For each checkpoint and format (segjax.export.formats.FORMATS) it exports at 64x64 (the data's
size) and 512x512, then measures: the artefact's bytes; artefact.load's time; seconds per
image at batch 1 (median of --repeats after one warm-up); on the whole validation split at
64x64, the share of pixels whose class equals segjax's own prediction (step.predict_step, as
segjax.predict and segjax.evaluate compute it) and the mIoU of each against the labels.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax import config as config_lib
from segjax import experiment, metrics, sharding, step
from segjax.export import artefact, cli, formats, serving

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {'unet': 'experiments/unet_synthetic.py',
          'deeplabv3plus': 'experiments/deeplabv3plus_synthetic.py'}
SIZES = (64, 512)


def validation_split(config) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N,H,W,3] and int32 labels [N,H,W] of the eval split."""
    builder = experiment.dataset_builder(config)
    examples = list(builder.as_dataset(split=config.data.eval_split,
                                       shuffle_files=False).as_numpy_iterator())
    images = np.stack([e['image'] for e in examples])
    labels = np.stack([e['label'][..., 0] for e in examples]).astype(np.int32)
    if config.data.label_map is not None:
        labels = np.asarray(config.data.label_map, np.int32)[labels]
    return images, labels


def segjax_predictions(model, state, config, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """segjax.predict's classes: numpy normalisation, then the jitted step.predict_step."""
    predict = jax.jit(lambda s, x: step.predict_step(s, x, model=model))
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        normalised = ((chunk.astype(np.float32) - np.float32(config.data.mean))
                      / np.float32(config.data.std))
        out.append(np.asarray(predict(state, jnp.asarray(normalised))))
    return np.concatenate(out)


def write_artefact(fmt: str, function, size: int, directory: str, config, *,
                   calibration: int = 0, float_ops: tuple = ()) -> str:
    """Writes `function` (serving.serving_function) as format `fmt` for uint8 size x size
    images into `directory`, with the export.json artefact.load reads; returns the model
    file's path. tflite_int8 calibrates on `calibration` images of the train split and keeps
    `float_ops` in float."""
    path = formats.write(
        fmt, function, size, size, directory,
        representative=lambda: cli.representative_images(config, size, size, calibration),
        float_ops=float_ops)
    artefact.write_spec(directory, {
        'format': fmt, 'file': os.path.basename(path),
        'input': {'name': 'image', 'dtype': 'uint8', 'shape': [None, size, size, 3]},
        'outputs': serving.output_shapes(size, size, config.data.num_classes)})
    return path


def exported_predictions(exported, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([exported(images[i:i + batch])['classes']
                           for i in range(0, len(images), batch)])


def miou(pred: np.ndarray, labels: np.ndarray, config) -> float:
    cm = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(labels),
                                  config.data.num_classes, ignore_index=config.data.ignore_index)
    return float(metrics.summarize(np.asarray(cm, np.int64))['miou'])


def size_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def seconds_per_image(exported, height: int, width: int, repeats: int) -> float:
    image = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    exported(image)  # warm-up: compilation, allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        exported(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_model(name: str, workdir: str, overrides: list[str], scratch: str,
                  repeats: int) -> list[dict]:
    config = config_lib.load(os.path.join(ROOT, MODELS[name]), overrides)
    model, state = experiment.restore_state(config, workdir, sharding.make_mesh())
    variables = serving.model_variables(state, ema=False)
    images, labels = validation_split(config)
    reference = segjax_predictions(model, state, config, images)
    reference_miou = miou(reference, labels, config)
    function = serving.serving_function(model, variables, mean=config.data.mean,
                                        std=config.data.std)
    rows = []
    for fmt in formats.FORMATS:
        row = {'model': name, 'format': fmt, 'segjax_miou': reference_miou,
               'val_images': len(images)}
        for size in SIZES:
            directory = os.path.join(scratch, f'{name}_{fmt}_{size}')
            count = 100 if size == 64 else 16
            start = time.perf_counter()
            path = write_artefact(fmt, function, size, directory, config, calibration=count)
            row[f'export_s_{size}'] = time.perf_counter() - start
            start = time.perf_counter()
            exported = artefact.load(directory)
            row[f'load_s_{size}'] = time.perf_counter() - start
            row[f'bytes_{size}'] = size_bytes(path)
            row[f's_per_image_{size}'] = seconds_per_image(exported, size, size, repeats)
            if size == 64:
                predictions = exported_predictions(exported, images)
                row['pixels_equal'] = float((predictions == reference).mean())
                row['miou'] = miou(predictions, labels, config)
                row['miou_delta_points'] = 100 * (row['miou'] - reference_miou)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, '']
    for name in dict.fromkeys(r['model'] for r in rows):
        model_rows = [r for r in rows if r['model'] == name]
        lines += [f'### {name} (segjax mIoU {100 * model_rows[0]["segjax_miou"]:.2f} on '
                  f'{model_rows[0]["val_images"]} validation images)', '',
                  '| format | size 64 (KiB) | size 512 (KiB) | load 64 (s) | s/image 64 | '
                  's/image 512 | pixels = segjax | mIoU | Δ mIoU (points) |',
                  '|---|---|---|---|---|---|---|---|---|']
        for r in model_rows:
            lines.append(
                f'| {r["format"]} | {r["bytes_64"] / 1024:.0f} | {r["bytes_512"] / 1024:.0f} | '
                f'{r["load_s_64"]:.2f} | {r["s_per_image_64"]:.4f} | '
                f'{r["s_per_image_512"]:.4f} | {100 * r["pixels_equal"]:.3f}% | '
                f'{100 * r["miou"]:.2f} | {r["miou_delta_points"]:+.2f} |')
        by_format = {r['format']: r for r in model_rows}
        ratio = by_format['tflite']['bytes_64'] / by_format['tflite_int8']['bytes_64']
        lines += ['', f'int8 TFLite: {ratio:.2f}x smaller than float32 TFLite; mIoU change '
                  f'{by_format["tflite_int8"]["miou_delta_points"]:+.2f} points.', '']
    return '\n'.join(lines)


def write_rows(out: str, title: str, rows: list[dict], to_markdown) -> None:
    """rows to out.json and, as `to_markdown(rows, header)`, to out.md and stdout; the header
    names the machine, its load at the end and the command line."""
    machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
               f'load average {os.getloadavg()[0]:.1f} at the end; jax {jax.__version__}')
    header = (f'## {title}, measured {time.strftime("%Y-%m-%d")} ({machine})\n\n'
              f'`{" ".join([os.path.basename(sys.executable), *sys.argv])}`')
    with open(out + '.json', 'w') as f:
        json.dump({'machine': machine, 'rows': rows}, f, indent=2)
    with open(out + '.md', 'w') as f:
        f.write(to_markdown(rows, header) + '\n')
    print(to_markdown(rows, header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--unet', required=True, help='workdir of unet_synthetic')
    parser.add_argument('--deeplab', required=True, help='workdir of deeplabv3plus_synthetic')
    # Config overrides as trained, without the '--config.' prefix (key=value).
    parser.add_argument('--unet_overrides', nargs='*', default=['ema_decay=0.99'])
    parser.add_argument('--deeplab_overrides', nargs='*', default=[])
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                      '2026-12-02-export'))
    args = parser.parse_args()
    sharding.configure_runtime()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        rows += measure_model('unet', args.unet, args.unet_overrides, scratch, args.repeats)
        rows += measure_model('deeplabv3plus', args.deeplab, args.deeplab_overrides, scratch,
                              args.repeats)
    write_rows(args.out, 'segjax.export', rows, markdown)


if __name__ == '__main__':
    main()
