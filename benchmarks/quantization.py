"""int8: post-training quantization (PTQ) against quantization-aware fine-tuning (QAT), and
weight-only int8, for the U-Net and DeepLabV3+ of the synthetic experiments.

    # a float run, then the same number of extra steps in float and in QAT (each a resume)
    python -m segjax.train --config experiments/unet_synthetic.py --workdir W/unet \
        --config.num_steps=300
    cp -r W/unet W/unet_float && cp -r W/unet W/unet_qat
    python -m segjax.train --config experiments/unet_synthetic.py --workdir W/unet_float \
        --config.num_steps=400
    python -m segjax.train --config experiments/unet_synthetic.py --workdir W/unet_qat \
        --config.num_steps=400 --config.quantization.mode=qat
    (the same for deeplabv3plus_synthetic: 400 steps, then 500)
    python benchmarks/quantization.py --unet W/unet_float W/unet_qat \
        --deeplab W/dlv3p_float W/dlv3p_qat [--out benchmarks/results/X]

On the whole validation split at 64x64 it measures the mIoU of: the float model in segjax;
its tflite_int8 export (PTQ) calibrated on --calibration image counts; the QAT model in segjax
(fake quantization on) and its tflite_int8 export; the float model's stablehlo export with
weight-only int8 kernels (quantization.for_export) against the float32 one (sizes too).
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import (  # noqa: E402  (benchmarks/export.py, next to this file)
    MODELS,
    ROOT,
    exported_predictions,
    miou,
    segjax_predictions,
    size_bytes,
    validation_split,
    write_artefact,
    write_rows,
)

from segjax import config as config_lib  # noqa: E402
from segjax import experiment, quantization, sharding  # noqa: E402
from segjax.export import artefact, serving  # noqa: E402

SIZE = 64


def export_and_score(fmt, model, variables, config, directory, images, labels, *,
                     calibration: int = 0, float_ops: tuple = ()) -> dict:
    """Exports (model, variables) as `fmt` at 64x64 and scores it on the validation split."""
    function = serving.serving_function(model, variables, mean=config.data.mean,
                                        std=config.data.std)
    start = time.perf_counter()
    path = write_artefact(fmt, function, SIZE, directory, config, calibration=calibration,
                          float_ops=float_ops)
    seconds = time.perf_counter() - start
    predictions = exported_predictions(artefact.load(directory), images)
    return {'miou': miou(predictions, labels, config), 'bytes': size_bytes(path),
            'export_s': seconds, 'predictions': predictions}


def restore(name: str, workdir: str, mode: str | None):
    config = config_lib.load(os.path.join(ROOT, MODELS[name]),
                             [f'quantization.mode={mode}'])
    model, state = experiment.restore_state(config, workdir, sharding.make_mesh())
    return config, model, state


def measure_model(name: str, float_workdir: str, qat_workdir: str, calibrations: list[int],
                  scratch: str, float_ops: tuple = ()) -> list[dict]:
    rows = []

    def add(variant, **values):
        row = {'model': name, 'variant': variant, **values}
        rows.append(row)
        print(json.dumps(row), flush=True)

    config, model, state = restore(name, float_workdir, None)
    images, labels = validation_split(config)
    reference = segjax_predictions(model, state, config, images)
    float_miou = miou(reference, labels, config)
    add('float (segjax)', miou=float_miou, step=int(state.step))
    variables = serving.model_variables(state, ema=False)
    for count in calibrations:
        result = export_and_score('tflite_int8', model, variables, config,
                                  os.path.join(scratch, f'{name}_ptq{count}'), images, labels,
                                  calibration=count)
        add(f'PTQ int8 TFLite ({count} calibration images)', miou=result['miou'],
            bytes=result['bytes'], export_s=result['export_s'],
            pixels_equal_float=float((result['predictions'] == reference).mean()))
    if float_ops:
        result = export_and_score('tflite_int8', model, variables, config,
                                  os.path.join(scratch, f'{name}_ptq_float_ops'), images,
                                  labels, calibration=calibrations[0], float_ops=float_ops)
        add(f'PTQ int8 TFLite, {",".join(float_ops)} in float ({calibrations[0]} calibration '
            'images)', miou=result['miou'], bytes=result['bytes'], export_s=result['export_s'],
            pixels_equal_float=float((result['predictions'] == reference).mean()))
    float_hlo = export_and_score('stablehlo', model, variables, config,
                                 os.path.join(scratch, f'{name}_hlo'), images, labels)
    add('float32 StableHLO', miou=float_hlo['miou'], bytes=float_hlo['bytes'])
    int8_model, int8_variables = quantization.for_export(
        quantization.QuantizationAware(model, 'weight_only_int8'), variables)
    int8_hlo = export_and_score('stablehlo', int8_model, int8_variables, config,
                                os.path.join(scratch, f'{name}_hlo_int8'), images, labels)
    add('weight-only int8 StableHLO (post-training)', miou=int8_hlo['miou'],
        bytes=int8_hlo['bytes'],
        pixels_equal_float=float((int8_hlo['predictions'] == reference).mean()))

    qat_config, qat_model, qat_state = restore(name, qat_workdir, 'qat')
    add('QAT (segjax, fake quantization)', step=int(qat_state.step),
        miou=miou(segjax_predictions(qat_model, qat_state, qat_config, images), labels, config))
    float_qat, qat_variables = quantization.for_export(
        qat_model, serving.model_variables(qat_state, ema=False))
    add('QAT weights in float (segjax)', miou=miou(
        segjax_predictions(float_qat, qat_state, qat_config, images), labels, config))
    result = export_and_score('tflite_int8', float_qat, qat_variables, qat_config,
                              os.path.join(scratch, f'{name}_qat'), images, labels,
                              calibration=calibrations[0])
    add(f'QAT int8 TFLite ({calibrations[0]} calibration images)', miou=result['miou'],
        bytes=result['bytes'], export_s=result['export_s'])
    for row in rows:
        if 'miou' in row:
            row['miou_delta_points'] = 100 * (row['miou'] - float_miou)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, '']
    for name in dict.fromkeys(r['model'] for r in rows):
        lines += [f'### {name}', '', '| variant | mIoU | Δ vs float (points) | size (KiB) |',
                  '|---|---|---|---|']
        for r in (r for r in rows if r['model'] == name):
            size = f'{r["bytes"] / 1024:.0f}' if 'bytes' in r else ''
            lines.append(f'| {r["variant"]} | {100 * r["miou"]:.2f} | '
                         f'{r["miou_delta_points"]:+.2f} | {size} |')
        lines.append('')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--unet', nargs=2, metavar=('FLOAT', 'QAT'), required=True)
    parser.add_argument('--deeplab', nargs=2, metavar=('FLOAT', 'QAT'), required=True)
    parser.add_argument('--calibration', type=int, nargs='+', default=[100, 300],
                        help='calibration image counts for PTQ (the first also for QAT)')
    parser.add_argument('--float_ops', nargs='*', default=['BATCH_MATMUL'],
                        help='TFLite op types kept in float in one more PTQ row')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results',
                                                      '2026-12-02-quantization'))
    args = parser.parse_args()
    sharding.configure_runtime()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, workdirs in (('unet', args.unet), ('deeplabv3plus', args.deeplab)):
            rows += measure_model(name, *workdirs, args.calibration, scratch,
                                  tuple(args.float_ops))
    write_rows(args.out, 'int8 quantization', rows, markdown)


if __name__ == '__main__':
    main()
