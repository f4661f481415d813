"""Training-step and inference time, images/s, peak memory, FLOPs and MFU of segjax's models.

    python benchmarks/train_step.py                                  # all four, float32
    python benchmarks/train_step.py --models unet --repeats 10
    python benchmarks/train_step.py --dtype bfloat16 --json /tmp/train_step_bf16.json
    python benchmarks/train_step.py --size 64 --batch 2 --repeats 2 --matmul_size 1024  # smoke

What runs is the real training step: `segjax.step.train_step` on a state from
`step.create_state`, `segjax.optim.sgd(0.01)` (momentum 0.9, weight decay 5e-4) and pixel
cross-entropy (`segjax.losses.cross_entropy`), jitted as `segjax.train` jits it (replicated state
donated with `donate_argnums=0`, the batch sharded on the data mesh), on one fixed random batch
with 21 classes; and the jitted inference forward (`model.apply(..., train=False)`).
`segjax.sharding.configure_runtime()` is called before any JAX work, so the library's default
XLA:CPU flags (oneDNN convolutions) apply here as in training, unless XLA_FLAGS overrides them.

Reported per model, each in a fresh process (so that its peak RSS is its own):
  compile s      trace + lower + XLA compile of the step (ahead of time; the first call runs it)
  step s         median of `--repeats` timed calls after one warm-up call; images/s from it
  train_cpu_s    (JSON only) median CPU seconds of `--repeats` more calls, all threads
  GFLOP/step     XLA's cost analysis of the compiled step (a multiply-add counts as 2 FLOPs)
  GFLOP/s, MFU   achieved FLOP rate, and its fraction of the peak: the faster of a large
                 jitted matmul (--matmul_size) and a large 3x3 convolution, float32 and
                 bfloat16, measured by this script with the same flags just before
  peak RSS       resource.getrusage ru_maxrss of the model's process (init, compile, run)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax import losses, optim, sharding, step
from segjax.models import deeplab, fcn, pspnet, unet

NUM_CLASSES = 21

# name -> (model constructor taking num_classes and dtype, default batch, default input side).
# PSPNet and DeepLabV3+ use batch 2: their 1x1 pooled branches' BatchNorm needs more than one
# value per channel in PyTorch (benchmarks/peer_pytorch.py runs the same table).
MODELS = {
    'unet': (functools.partial(unet.UNet, base_width=32, depth=3), 4, 256),
    'fcn_r50': (fcn.FCNResNet50, 1, 512),
    'pspnet_r50': (pspnet.PSPNetResNet50, 2, 512),
    'deeplabv3plus_r50': (deeplab.DeepLabV3PlusResNet50, 2, 512),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def shapes(name: str, batch: int | None, size: int | None) -> tuple[int, int]:
    """(batch, side) of a model: the table's defaults unless overridden."""
    _, default_batch, default_size = MODELS[name]
    return (default_batch if batch is None else batch,
            default_size if size is None else size)


def parameter_count(model, image_shape: tuple[int, ...]) -> int:
    """Trainable parameters, from shapes only (`jax.eval_shape` of init: nothing runs)."""
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros(image_shape, jnp.float32), train=False))
    return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled computation from XLA's cost analysis (a dict, or a list of one dict
    per computation in some JAX versions)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(entry.get('flops', 0.0) for entry in analysis or []))


def seconds(fn) -> float:
    """Wall-clock seconds of fn(), which must block until its results are ready."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_gflops(dtype, size: int = 4096, repeats: int = 5) -> dict:
    """The machine's practical dense peak in `dtype` with the XLA flags in effect: median
    GFLOP/s of a jitted size x size matmul and of a 3x3 convolution ([size/512, 64, 64, 512] ->
    512 channels; XLA:CPU hands it to oneDNN), and the faster of the two ('peak'). On the
    reference CPU the convolution ran about 1.5x faster than the matmul, so a matmul-only peak
    gave model FLOP utilisations above 1."""
    keys = jax.random.split(jax.random.key(0), 4)
    a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys[:2])
    images = jax.random.normal(keys[2], (max(1, size // 512), 64, 64, 512)).astype(dtype)
    kernel = jax.random.normal(keys[3], (3, 3, 512, 512)).astype(dtype)
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                             padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    rates = {}
    for name, fn, args, flops in [
            ('matmul', jnp.matmul, (a, b), 2 * size**3),
            ('conv3x3', conv, (images, kernel), 2 * images.size * 512 * 9)]:
        jitted = jax.jit(fn)
        jitted(*args).block_until_ready()  # compile and warm up
        run = functools.partial(lambda f, a: f(*a).block_until_ready(), jitted, args)
        times = [seconds(run) for _ in range(repeats)]
        rates[name] = round(flops / statistics.median(times) / 1e9, 1)
    return {**rates, 'peak': max(rates.values())}


class SegjaxRunner:
    """One model's jitted training step and inference forward on one fixed random batch.

    Compiled ahead of time (so the compile time and FLOPs are measured separately from
    running); `train()` and `infer()` each run one call to completion and return its seconds.
    """

    def __init__(self, name: str, batch: int, size: int, dtype=jnp.float32, seed: int = 0,
                 model_fn=None):
        # model_fn (num_classes, dtype -> model) for models outside MODELS (peer_transformers.py)
        model_cls = MODELS[name][0] if model_fn is None else model_fn
        self.model = model_cls(num_classes=NUM_CLASSES, dtype=dtype)
        image_shape = (batch, size, size, 3)
        tx = optim.sgd(0.01)
        loss_fn = functools.partial(losses.cross_entropy, ignore_index=255)

        mesh = sharding.make_mesh()
        replicated = sharding.replicated(mesh)
        init = jax.jit(functools.partial(step.create_state, self.model, tx,
                                         image_shape=(1, size, size, 3)))
        self.state = init(jax.random.key(seed))
        self.num_params = sum(leaf.size for leaf in jax.tree.leaves(self.state.params))
        rng = np.random.default_rng(seed)
        host_batch = {'image': rng.normal(size=image_shape).astype(np.float32),
                      'label': rng.integers(0, NUM_CLASSES, image_shape[:3]).astype(np.int32)}
        self.batch = sharding.to_global(host_batch, mesh)
        self.rng = jax.random.key(seed + 1)
        # The inference weights are a copy: the training state is donated at every step.
        self.variables = jax.tree.map(jnp.copy, {'params': self.state.params,
                                                 'batch_stats': self.state.batch_stats})

        # As segjax.train: replicated state donated, batch sharded on 'data', rng replicated.
        state_shardings = jax.tree.map(lambda _: replicated, self.state)
        train_step = jax.jit(
            functools.partial(step.train_step, model=self.model, tx=tx, loss_fn=loss_fn,
                              ignore_index=255),
            in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0)
        start = time.perf_counter()
        self._train = train_step.lower(self.state, self.batch, self.rng).compile()
        self.train_compile_s = time.perf_counter() - start
        self.train_flops = compiled_flops(self._train)

        def forward(variables, images):
            return step.main_logits(self.model.apply(variables, images, train=False))

        start = time.perf_counter()
        self._infer = jax.jit(forward).lower(self.variables, self.batch['image']).compile()
        self.infer_compile_s = time.perf_counter() - start
        self.infer_flops = compiled_flops(self._infer)

    def train(self) -> float:
        def run():
            self.state, stats = self._train(self.state, self.batch, self.rng)
            jax.block_until_ready((self.state, stats))

        return seconds(run)

    def train_cpu(self) -> float:
        """CPU seconds (all threads of this process) of one training step: the work done, less
        sensitive than wall time to other processes on a shared machine."""
        start = time.process_time()
        self.train()
        return time.process_time() - start

    def infer(self) -> float:
        return seconds(lambda: self._infer(self.variables, self.batch['image'])
                       .block_until_ready())


def measure(name: str, batch: int, size: int, dtype_name: str, repeats: int) -> dict:
    """Everything but MFU for one model, in this process."""
    runner = SegjaxRunner(name, batch, size, DTYPES[dtype_name])
    first_train_s, first_infer_s = runner.train(), runner.infer()  # warm-up calls
    train_s = statistics.median(runner.train() for _ in range(repeats))
    train_cpu_s = statistics.median(runner.train_cpu() for _ in range(repeats))
    infer_s = statistics.median(runner.infer() for _ in range(repeats))
    return {
        'model': name, 'input': f'{batch}x{size}x{size}', 'dtype': dtype_name,
        'params': runner.num_params, 'repeats': repeats,
        'train_compile_s': round(runner.train_compile_s, 2),
        'train_first_call_s': round(runner.train_compile_s + first_train_s, 2),
        'train_step_s': round(train_s, 4), 'train_images_per_s': round(batch / train_s, 2),
        'train_cpu_s': round(train_cpu_s, 4),
        'train_gflop_per_step': round(runner.train_flops / 1e9, 2),
        'train_gflops': round(runner.train_flops / train_s / 1e9, 1),
        'infer_compile_s': round(runner.infer_compile_s, 2),
        'infer_first_call_s': round(runner.infer_compile_s + first_infer_s, 2),
        'infer_s': round(infer_s, 4), 'infer_images_per_s': round(batch / infer_s, 2),
        'infer_gflop': round(runner.infer_flops / 1e9, 2),
        'infer_gflops': round(runner.infer_flops / infer_s / 1e9, 1),
        'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def run_in_subprocess(name: str, batch: int, size: int, dtype: str, repeats: int) -> dict:
    """measure() in a fresh process; {'model', 'error'} if it failed."""
    command = [sys.executable, os.path.abspath(__file__), '--measure_one', name,
               '--batch', str(batch), '--size', str(size), '--dtype', dtype,
               '--repeats', str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        # The exception line (JAX appends a note after it), else the last line printed.
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r'[\w.]*(Error|Exception)\b', line)]
        return {'model': name, 'input': f'{batch}x{size}x{size}', 'dtype': dtype,
                'error': (errors or lines or [f'exit status {out.returncode}'])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


TABLE = [  # (column, key)
    ('model', 'model'), ('input', 'input'), ('dtype', 'dtype'), ('params', 'params'),
    ('train compile s', 'train_compile_s'), ('train step s', 'train_step_s'),
    ('train img/s', 'train_images_per_s'), ('train GFLOP/step', 'train_gflop_per_step'),
    ('train GFLOP/s', 'train_gflops'), ('train MFU', 'train_mfu'),
    ('infer compile s', 'infer_compile_s'), ('infer s', 'infer_s'),
    ('infer img/s', 'infer_images_per_s'), ('infer GFLOP/s', 'infer_gflops'),
    ('infer MFU', 'infer_mfu'), ('peak RSS MiB', 'peak_rss_mib'),
]


def markdown(rows: list[dict]) -> str:
    lines = ['| ' + ' | '.join(column for column, _ in TABLE) + ' |',
             '|' + '---|' * len(TABLE)]
    for row in rows:
        if 'error' in row:
            lines.append(f'| {row["model"]} | {row["input"]} | {row["dtype"]} | '
                         f'failed: {row["error"]} |')
        else:
            lines.append('| ' + ' | '.join(str(row[key]) for _, key in TABLE) + ' |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(MODELS),
                        help=f'comma-separated subset of {",".join(MODELS)}')
    parser.add_argument('--batch', type=int, default=None, help="default: the model's own")
    parser.add_argument('--size', type=int, default=None, help="input side; default: model's")
    parser.add_argument('--repeats', type=int, default=5, help='timed calls after 1 warm-up')
    parser.add_argument('--dtype', choices=list(DTYPES), default='float32',
                        help='compute dtype of the model (parameters stay float32)')
    parser.add_argument('--matmul_size', type=int, default=4096, help='side of the peak matmul')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    parser.add_argument('--measure_one', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sharding.configure_runtime()  # before any JAX computation: the XLA flags are read once

    if args.measure_one:
        print(json.dumps(measure(args.measure_one, args.batch, args.size, args.dtype,
                                 args.repeats)))
        return
    names = args.models.split(',')
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f'unknown model(s) {unknown}; choose from {list(MODELS)}')

    peaks = {dtype: peak_gflops(DTYPES[dtype], args.matmul_size) for dtype in DTYPES}
    print(f'peak GFLOP/s (jitted {args.matmul_size}^2 matmul / 3x3 convolution): '
          + ', '.join(f'{dtype} {p["matmul"]} / {p["conv3x3"]}' for dtype, p in peaks.items())
          + f'; {os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")}', flush=True)
    rows = []
    for name in names:
        row = run_in_subprocess(name, *shapes(name, args.batch, args.size), args.dtype,
                                args.repeats)
        if 'error' not in row:
            peak = peaks[args.dtype]['peak']
            row['train_mfu'] = round(row['train_gflops'] / peak, 3)
            row['infer_mfu'] = round(row['infer_gflops'] / peak, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'peak_gflops': peaks, 'matmul_size': args.matmul_size,
                       'xla_flags': os.environ.get('XLA_FLAGS', ''), 'rows': rows}, f, indent=1)
    if any('error' in row for row in rows):
        sys.exit(1)


if __name__ == '__main__':
    main()
