"""segjax's transformer segmenters against Hugging Face `transformers`' own models: training-step
and inference time, XLA's FLOPs, MFU, and the segjax / PyTorch ratio, alternated in one process.

    python benchmarks/peer_transformers.py                     # every model, eager float32
    python benchmarks/peer_transformers.py --models segformer_b0 --json /tmp/sf.json
    python benchmarks/peer_transformers.py --models segformer_b0 --size 64 --batch 1 \\
        --repeats 1 --matmul_size 512                              # smoke: seconds

(Named peer_transformers.py, not transformers.py: a script's folder comes first on sys.path, and
a benchmarks/transformers.py would shadow the `transformers` package it imports.)

The pairs (MODELS below):
  segformer_b0, segformer_b2  segjax's SegFormer-B0 / -B2 against transformers'
                 SegformerForSemanticSegmentation with the same configuration (the twin's
                 stride-4 logits resized to the input with bilinear interpolation,
                 align_corners=False, as segjax's model does inside)
  vit_b16_linear segjax's vit.ViTLinearB16 (ViT-B/16 with a 224-pixel position grid resized to
                 the input's, and DINOv2's linear probe on the last block's patch tokens:
                 BatchNorm + 1x1 convolution + bilinear upsampling) against transformers'
                 ViTModel (`interpolate_pos_encoding=True`, no pooler) with the same probe
                 written in torch (ViTLinearTwin)
Both sides hold the same weights: the twin is built with torch's seed 0 and its state dict is
imported into the segjax model through `segjax.pretrained` (the functions that load hub
checkpoints; the ViT probe's two layers by hand), so before anything is timed the script checks
that parameter counts are equal and that the inference logits of one batch agree (max
|difference| reported per row; it stops if the difference exceeds 1e-4 + 1e-4 x max |logit|).

The method is benchmarks/peer_pytorch.py's, reused from there: segjax's side is
benchmarks/train_step.py's `SegjaxRunner` (the real jitted `segjax.step.train_step`, state
donated, SGD momentum 0.9 + weight decay 5e-4 on kernels, pixel cross-entropy, 21 classes; and
the jitted inference forward), PyTorch's is peer_pytorch's `TorchRunner` (the same SGD and
F.cross_entropy with ignore_index 255 on the input-size logits; inference under
`torch.inference_mode()`), `torch.set_num_threads(os.cpu_count())`, after warm-up calls
training steps timed alternately segjax then torch for `--repeats` pairs with a pause before
each call, then inference the same way; medians and the ratio segjax / torch (below 1: segjax
is faster). Dropout and stochastic depth are on in training on both sides (transformers'
defaults: drop path 0.1, decoder dropout 0.1; segjax's are the same). transformers runs its
default attention implementation (recorded per row: 'sdpa').

MFU: XLA's cost analysis of the compiled step (a multiply-add counts 2 FLOPs; it includes the
logits resize, which XLA lowers to two matmuls) over segjax's median time, as a fraction of the
machine's measured peak (`train_step.peak_gflops`: the faster of a large float32 matmul and 3x3
convolution, measured by this script first). 'torch MFU' divides the same FLOP count by
PyTorch's time. 'CPU-s ratio' is the ratio of the medians of CPU seconds (all threads of the
process, `time.process_time`) of the same calls: on a machine other jobs share, wall times
measure the load as much as the code (PyTorch's OpenMP threads wait for each other at every op,
so a core taken away slows them many-fold); CPU seconds less so. The 1-minute load average is
recorded before and after each row.

torch is imported first, before JAX (see peer_pytorch.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch  # first of the heavy imports (see peer_pytorch.py)

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
import peer_pytorch
import train_step
import transformers
from torch import nn

from segjax import pretrained, sharding
from segjax.models import segformer, vit

# transformers' SegformerConfig for each size (its defaults are B0; heads, reduction ratios,
# patch sizes and strides are the same for B0..B5).
SEGFORMER_B0 = {'hidden_sizes': [32, 64, 160, 256], 'depths': [2, 2, 2, 2],
                'decoder_hidden_size': 256}
SEGFORMER_B2 = {'hidden_sizes': [64, 128, 320, 512], 'depths': [3, 4, 6, 3],
                'decoder_hidden_size': 768}


def upsample(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Logits at the input's resolution: bilinear, align_corners=False, which equals segjax's
    resize_bilinear (tests/test_resize.py)."""
    return nn.functional.interpolate(logits, size=images.shape[-2:], mode='bilinear',
                                     align_corners=False)


class SegformerTwin(nn.Module):
    """transformers' SegformerForSemanticSegmentation under segjax's contract: one logits
    tensor [B, classes, H, W] at the input's resolution."""

    def __init__(self, config: dict, num_classes: int):
        super().__init__()
        self.hf = transformers.SegformerForSemanticSegmentation(
            transformers.SegformerConfig(num_labels=num_classes, **config))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return upsample(self.hf(pixel_values=images).logits, images)


def load_segformer_twin(variables: dict, twin: SegformerTwin) -> dict:
    return pretrained.load_segformer_into(variables, state_dict_numpy(twin.hf))


class ViTLinearTwin(nn.Module):
    """segjax's vit.ViTLinearB16 in PyTorch: transformers' ViTModel (224-pixel position grid,
    resized bicubically to the input's by `interpolate_pos_encoding`, as segjax resizes it; no
    pooler), then the same linear probe on the last block's patch tokens: BatchNorm, a 1x1
    convolution, bilinear upsampling to the input."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.hf = transformers.ViTModel(transformers.ViTConfig(image_size=224, patch_size=16),
                                        add_pooling_layer=False)
        width = self.hf.config.hidden_size
        self.bn = nn.BatchNorm2d(width)  # eps 1e-5, momentum 0.1: segjax's batch_norm
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patch = self.hf.config.patch_size
        height, width = images.shape[-2] // patch, images.shape[-1] // patch
        tokens = self.hf(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        maps = tokens[:, 1:].transpose(1, 2).reshape(len(images), -1, height, width)
        return upsample(self.classifier(self.bn(maps)), images)


def load_vit_linear_twin(variables: dict, twin: ViTLinearTwin) -> dict:
    """The encoder through segjax.pretrained.load_vit_into, the probe's BatchNorm and 1x1
    convolution by hand (no checkpoint format has this head)."""
    loaded = pretrained.load_vit_into(variables, state_dict_numpy(twin.hf))
    head = state_dict_numpy(twin)
    params = dict(loaded['params'])
    params['decode_head'] = {
        'bn': {'scale': head['bn.weight'], 'bias': head['bn.bias']},
        'classifier': {'kernel': head['classifier.weight'][:, :, 0, 0].T,
                       'bias': head['classifier.bias']}}
    stats = {'decode_head': {'bn': {'mean': head['bn.running_mean'],
                                    'var': head['bn.running_var']}}}
    expected = jax.tree.map(np.shape, {'params': variables['params'],
                                       'batch_stats': variables['batch_stats']})
    got = jax.tree.map(np.shape, {'params': params, 'batch_stats': stats})
    if got != expected:
        raise ValueError('peer_transformers: the ViT twin\'s head does not fit segjax\'s '
                         f'ViTLinear: {got} != {expected}')
    return {'params': params, 'batch_stats': stats}


@dataclasses.dataclass(frozen=True)
class Pair:
    """A segjax model, its transformers twin and how the twin's weights enter segjax's."""

    segjax: Callable  # (num_classes=, dtype=) -> flax module
    twin: Callable  # num_classes -> torch module: logits [B, classes, H, W] at input size
    load: Callable  # (segjax variables, twin) -> segjax variables holding the twin's weights
    batch: int  # default batch and input side
    size: int


MODELS = {
    'segformer_b0': Pair(segformer.SegFormerB0, functools.partial(SegformerTwin, SEGFORMER_B0),
                         load_segformer_twin, 2, 512),
    'segformer_b2': Pair(segformer.SegFormerB2, functools.partial(SegformerTwin, SEGFORMER_B2),
                         load_segformer_twin, 1, 512),
    'vit_b16_linear': Pair(vit.ViTLinearB16, ViTLinearTwin, load_vit_linear_twin, 1, 512),
}

SETTINGS = ('eager', 'channels_last', 'compile')  # float32 settings of peer_pytorch


def state_dict_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: value.detach().contiguous().numpy() for name, value in
            module.state_dict().items()}


def share_twin_weights(runner: train_step.SegjaxRunner, twin: nn.Module,
                       load: Callable) -> None:
    """Puts the twin's weights into the segjax runner's training state and inference
    variables, on the same devices and shardings as the arrays they replace (the compiled
    functions expect those)."""
    variables = {'params': runner.state.params, 'batch_stats': runner.state.batch_stats}
    loaded = load(variables, twin)
    placed = jax.tree.map(lambda new, old: jax.device_put(jnp.asarray(new), old.sharding),
                          {'params': loaded['params'], 'batch_stats': loaded['batch_stats']},
                          variables)
    runner.state = runner.state.replace(params=placed['params'],
                                        batch_stats=placed['batch_stats'])
    runner.variables = jax.tree.map(jnp.copy, placed)  # the state is donated at every step


def logits_difference(runner: train_step.SegjaxRunner, twin: nn.Module) -> tuple[float, float]:
    """(max |segjax - twin|, max |twin|) of the inference logits on the runner's batch."""
    images = np.array(runner.batch['image'])  # a writable copy, for torch.from_numpy
    segjax_logits = np.asarray(runner._infer(runner.variables, runner.batch['image']))
    twin.eval()
    with torch.inference_mode():
        twin_logits = twin(torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous())
    twin_logits = twin_logits.float().numpy().transpose(0, 2, 3, 1)
    return (float(np.abs(segjax_logits - twin_logits).max()),
            float(np.abs(twin_logits).max()))


def recording_cpu_seconds(fn: Callable[[], float], record: list) -> Callable[[], float]:
    """fn (which returns its wall seconds), also appending its CPU seconds, all threads of this
    process, to `record`: on a shared machine the work done, which other processes' load
    disturbs less than wall time (spin-waiting threads still count)."""
    def run() -> float:
        start = time.process_time()
        wall = fn()
        record.append(time.process_time() - start)
        return wall
    return run


def check_parameter_counts(name: str, segjax_count: int, twin: nn.Module) -> None:
    twin_count = sum(p.numel() for p in twin.parameters())
    if segjax_count != twin_count:
        sys.exit(f'peer_transformers: {name}: segjax {segjax_count:,} parameters, transformers '
                 f'{twin_count:,} ({twin_count - segjax_count:+,}): the configurations differ, '
                 'so the times are not comparable')


def compare(runner: train_step.SegjaxRunner, name: str, batch: int, size: int, setting: str,
            repeats: int, peak: float) -> dict:
    row = {'model': name, 'input': f'{batch}x{size}x{size}', 'setting': setting,
           'load_avg_1min_start': round(os.getloadavg()[0], 2)}
    if setting == 'compile' and (reason := peer_pytorch.compile_unavailable()):
        return {**row, 'error': reason}
    torch_runner = peer_pytorch.TorchRunner(name, batch, size, setting,
                                            twin=MODELS[name].twin)
    twin = torch_runner.model
    check_parameter_counts(name, runner.num_params, twin)
    share_twin_weights(runner, twin, MODELS[name].load)
    difference, largest = logits_difference(runner, twin)
    if difference > 1e-4 + 1e-4 * largest:
        sys.exit(f'peer_transformers: {name}: segjax and transformers logits differ by '
                 f'{difference:.3g} (max |logit| {largest:.3g}) with the same weights')
    for _ in range(2 if setting == 'compile' else 1):  # warm-up (and compile)
        torch_runner.train()
        torch_runner.infer()
    runner.train()  # warm-up
    runner.infer()
    cpu = {key: [] for key in ('segjax_train', 'torch_train', 'segjax_infer', 'torch_infer')}
    segjax_train, torch_train = peer_pytorch.alternate(
        recording_cpu_seconds(runner.train, cpu['segjax_train']),
        recording_cpu_seconds(torch_runner.train, cpu['torch_train']), repeats)
    segjax_infer, torch_infer = peer_pytorch.alternate(
        recording_cpu_seconds(runner.infer, cpu['segjax_infer']),
        recording_cpu_seconds(torch_runner.infer, cpu['torch_infer']), repeats)
    cpu = {key: statistics.median(values) for key, values in cpu.items()}
    train_gflop, infer_gflop = runner.train_flops / 1e9, runner.infer_flops / 1e9
    return {
        **row, 'params': runner.num_params, 'pairs': repeats,
        'attention': twin.hf.config._attn_implementation,
        'logits_max_abs_diff': float(f'{difference:.3g}'), 'logits_max_abs': round(largest, 3),
        'train_compile_s': round(runner.train_compile_s, 2),
        'infer_compile_s': round(runner.infer_compile_s, 2),
        'train_gflop_per_step': round(train_gflop, 2), 'infer_gflop': round(infer_gflop, 2),
        'segjax_train_s': round(segjax_train, 4), 'torch_train_s': round(torch_train, 4),
        'train_ratio': round(segjax_train / torch_train, 3),
        'train_mfu': round(train_gflop / segjax_train / peak, 3),
        'torch_train_mfu': round(train_gflop / torch_train / peak, 3),
        'segjax_infer_s': round(segjax_infer, 4), 'torch_infer_s': round(torch_infer, 4),
        'infer_ratio': round(segjax_infer / torch_infer, 3),
        'infer_mfu': round(infer_gflop / segjax_infer / peak, 3),
        'torch_infer_mfu': round(infer_gflop / torch_infer / peak, 3),
        **{f'{key}_cpu_s': round(value, 4) for key, value in cpu.items()},
        'train_cpu_ratio': round(cpu['segjax_train'] / cpu['torch_train'], 3),
        'infer_cpu_ratio': round(cpu['segjax_infer'] / cpu['torch_infer'], 3),
        'load_avg_1min_end': round(os.getloadavg()[0], 2),
    }


TABLE = [  # (column, key)
    ('model', 'model'), ('input', 'input'), ('setting', 'setting'), ('params', 'params'),
    ('GFLOP/step', 'train_gflop_per_step'), ('segjax train s', 'segjax_train_s'),
    ('torch train s', 'torch_train_s'), ('ratio', 'train_ratio'), ('MFU', 'train_mfu'),
    ('torch MFU', 'torch_train_mfu'), ('CPU-s ratio', 'train_cpu_ratio'),
    ('infer GFLOP', 'infer_gflop'),
    ('segjax infer s', 'segjax_infer_s'), ('torch infer s', 'torch_infer_s'),
    ('ratio', 'infer_ratio'), ('MFU', 'infer_mfu'), ('torch MFU', 'torch_infer_mfu'),
    ('CPU-s ratio', 'infer_cpu_ratio'),
    ('compile s (train)', 'train_compile_s'), ('logits max diff', 'logits_max_abs_diff'),
    ('load start/end', 'load'),
]


def markdown(rows: list[dict]) -> str:
    lines = ['| ' + ' | '.join(column for column, _ in TABLE) + ' |',
             '|---|---|---|' + '---:|' * (len(TABLE) - 3)]
    for row in rows:
        if 'error' in row:
            lines.append(f'| {row["model"]} | {row["input"]} | {row["setting"]} | '
                         f'{row["error"]} |')
            continue
        row = {**row, 'load': f'{row["load_avg_1min_start"]} / {row["load_avg_1min_end"]}'}
        lines.append('| ' + ' | '.join(str(row[key]) for _, key in TABLE) + ' |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(MODELS),
                        help=f'comma-separated subset of {",".join(MODELS)}')
    parser.add_argument('--torch', default='eager',
                        help=f'comma-separated PyTorch settings from {",".join(SETTINGS)}')
    parser.add_argument('--batch', type=int, default=None, help="default: the model's own")
    parser.add_argument('--size', type=int, default=None, help="input side; default: model's")
    parser.add_argument('--repeats', type=int, default=5, help='alternated pairs timed')
    parser.add_argument('--matmul_size', type=int, default=4096, help='side of the peak matmul')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    args = parser.parse_args()
    names, settings = args.models.split(','), args.torch.split(',')
    if unknown := [n for n in names if n not in MODELS]:
        parser.error(f'unknown model(s) {unknown}; choose from {list(MODELS)}')
    if unknown := [s for s in settings if s not in SETTINGS]:
        parser.error(f'unknown --torch setting(s) {unknown}; choose from {list(SETTINGS)}')
    sharding.configure_runtime()  # before any JAX computation: the XLA flags are read once
    torch.set_num_threads(os.cpu_count())
    load_start = os.getloadavg()
    peak = train_step.peak_gflops(jnp.float32, args.matmul_size)
    print(f'torch {torch.__version__}, transformers {transformers.__version__}, '
          f'{torch.get_num_threads()} threads; peak float32 GFLOP/s (jitted '
          f'{args.matmul_size}^2 matmul / 3x3 convolution): {peak["matmul"]} / '
          f'{peak["conv3x3"]}; load average {load_start[0]:.2f}; '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")}', flush=True)

    rows = []
    for name in names:
        batch = MODELS[name].batch if args.batch is None else args.batch
        size = MODELS[name].size if args.size is None else args.size
        runner = train_step.SegjaxRunner(name, batch, size, model_fn=MODELS[name].segjax)
        for setting in settings:
            rows.append(compare(runner, name, batch, size, setting, args.repeats,
                                peak['peak']))
            print(json.dumps(rows[-1]), flush=True)
        del runner
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'torch': torch.__version__, 'transformers': transformers.__version__,
                       'torch_threads': torch.get_num_threads(),
                       'peak_gflops_float32': peak, 'matmul_size': args.matmul_size,
                       'xla_flags': os.environ.get('XLA_FLAGS', ''),
                       'load_avg_start': load_start, 'load_avg_end': os.getloadavg(),
                       'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
