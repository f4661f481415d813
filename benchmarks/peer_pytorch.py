"""segjax vs PyTorch: training-step and inference time of the same models, alternated in one
process on the same machine.

    python benchmarks/peer_pytorch.py                                  # eager PyTorch, float32
    python benchmarks/peer_pytorch.py --torch eager,channels_last,compile,bf16 --json peer.json
    python benchmarks/peer_pytorch.py --models unet --size 64 --batch 2 --repeats 2  # smoke

The segjax side is benchmarks/train_step.py's (the same model table, sizes and jitted
`segjax.step.train_step` / inference forward; `segjax.sharding.configure_runtime()` sets the
library's XLA:CPU flags). The PyTorch side runs the twins in benchmarks/torch_models.py, which
have exactly segjax's layers and parameter counts (checked here before anything is timed):
SGD (momentum 0.9, weight decay 5e-4 on kernels only, as segjax.optim.sgd), F.cross_entropy
with ignore_index 255, `zero_grad(set_to_none=True)`, backward, step; inference in eval mode
under `torch.inference_mode()`. Both use every core: XLA by default, torch through
`torch.set_num_threads(os.cpu_count())`.

PyTorch settings (`--torch`, a comma list; each is its own row, with its own segjax timings):
  eager          float32, NCHW, eager mode (default)
  channels_last  float32, model and input in torch.channels_last (NHWC) memory format
  compile        float32, torch.compile(model) (inductor; on CPU it needs a C++ compiler)
  bf16           torch.autocast('cpu', bfloat16) + channels_last, against the segjax model
                 built with dtype=jnp.bfloat16 (float32 parameters, bfloat16 compute)

Per row, after one warm-up call of every function (two for compile), training steps are timed
alternately, segjax then torch, `--repeats` pairs, then inference the same way; reported are
the medians and the ratio segjax / torch (below 1: segjax is faster). segjax's step also
checks the loss and gradients are finite and computes the gradient norm and pixel accuracy,
as it does in training; the torch step does only the update. Run on an otherwise idle machine:
PyTorch's OpenMP threads wait for each other at every op, so one core busy elsewhere can slow
its steps many-fold (a tiny U-Net step went from 0.02 s to 1.9 s on a shared 2-core machine).

Preload tcmalloc (run_all.py does; see the README): with glibc's malloc, segjax's large per-step
buffers are faulted in anew each step, and after a PyTorch step that costs 1-3 s of kernel time
per DeepLabV3+ step, so the ratio measures the allocator as much as the code.

torch is imported first, before JAX: importing torchvision after TensorFlow segfaults here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch  # first of the heavy imports (see the docstring)
import torch.nn.functional as F
import torch_models
import train_step

from segjax import sharding

# train_step.MODELS name -> its PyTorch twin (called with num_classes).
TWINS = {
    'unet': torch_models.unet,
    'fcn_r50': torch_models.fcn_resnet50,
    'pspnet_r50': torch_models.pspnet_resnet50,
    'deeplabv3plus_r50': torch_models.deeplabv3plus_resnet50,
}

SETTINGS = ('eager', 'channels_last', 'compile', 'bf16')


class TorchRunner:
    """A twin, its SGD optimizer and one fixed random batch in one PyTorch setting;
    `train()` and `infer()` each run one call and return its seconds."""

    def __init__(self, name: str, batch: int, size: int, setting: str, seed: int = 0,
                 twin=None):
        torch.manual_seed(seed)
        nhwc = setting in ('channels_last', 'bf16')
        memory_format = torch.channels_last if nhwc else torch.contiguous_format
        # twin (num_classes -> module) for models outside TWINS (peer_transformers.py)
        twin = TWINS[name] if twin is None else twin
        self.model = twin(train_step.NUM_CLASSES).to(memory_format=memory_format)
        self.images = torch.randn(batch, 3, size, size).to(memory_format=memory_format)
        self.labels = torch.randint(0, train_step.NUM_CLASSES, (batch, size, size))
        # As segjax.optim.sgd: weight decay on kernels (ndim >= 2) only.
        params = list(self.model.parameters())
        self.optimizer = torch.optim.SGD(
            [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': 5e-4},
             {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}],
            lr=0.01, momentum=0.9)
        self.forward = torch.compile(self.model) if setting == 'compile' else self.model
        self.bf16 = setting == 'bf16'

    def _autocast(self):
        return torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16)

    def train(self) -> float:
        self.model.train()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self.forward(self.images), self.labels, ignore_index=255)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def infer(self) -> float:
        self.model.eval()
        start = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            self.forward(self.images)
        return time.perf_counter() - start


SETTLE_S = 1.0  # pause before each timed call (see `alternate`)


def check_parameter_counts(names: list[str], sizes: dict) -> None:
    """Exits with the mismatches if a twin's trainable parameter count differs from segjax's."""
    problems = []
    for name in names:
        batch, size = sizes[name]
        model = train_step.MODELS[name][0](num_classes=train_step.NUM_CLASSES)
        segjax_count = train_step.parameter_count(model, (batch, size, size, 3))
        torch_count = torch_models.parameter_count(TWINS[name](train_step.NUM_CLASSES))
        if segjax_count != torch_count:
            problems.append(f'{name}: segjax {segjax_count:,} parameters, torch twin '
                            f'{torch_count:,} ({torch_count - segjax_count:+,})')
    if problems:
        sys.exit('peer_pytorch: the PyTorch twins in benchmarks/torch_models.py no longer match '
                 'segjax/models, so their times are not comparable:\n  ' + '\n  '.join(problems))


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here, or None: inductor's CPU backend builds C++ kernels."""
    if os.environ.get('CXX') or any(shutil.which(c) for c in ('g++', 'c++', 'clang++')):
        return None
    return 'torch.compile skipped: inductor on CPU needs a C++ compiler (g++/clang++), none found'


def alternate(segjax_fn, torch_fn, pairs: int) -> tuple[float, float]:
    """Medians of `pairs` alternated calls, segjax first in each pair.

    Each call starts after a pause: both runtimes' worker threads spin-wait for a while after
    their last op, and without it each side was timed against the other's spinning threads
    (the segjax U-Net step read 2.0 s alternated against 1.6 s alone).
    """
    segjax_times, torch_times = [], []
    for _ in range(pairs):
        time.sleep(SETTLE_S)
        segjax_times.append(segjax_fn())
        time.sleep(SETTLE_S)
        torch_times.append(torch_fn())
    return statistics.median(segjax_times), statistics.median(torch_times)


def compare(segjax_runner, name: str, batch: int, size: int, setting: str,
            repeats: int) -> dict:
    row = {'model': name, 'input': f'{batch}x{size}x{size}', 'setting': setting}
    if setting == 'compile' and (reason := compile_unavailable()):
        return {**row, 'error': reason}
    runner = TorchRunner(name, batch, size, setting)
    try:
        for _ in range(2 if setting == 'compile' else 1):  # warm-up (and compile)
            runner.train()
            runner.infer()
    except Exception as e:  # torch.compile can fail on a machine without a working toolchain
        if setting != 'compile':
            raise
        return {**row, 'error': f'torch.compile failed: {type(e).__name__}: '
                                f'{str(e).strip().splitlines()[0][:300]}'}
    segjax_runner.train()  # warm-up
    segjax_runner.infer()
    segjax_train, torch_train = alternate(segjax_runner.train, runner.train, repeats)
    segjax_infer, torch_infer = alternate(segjax_runner.infer, runner.infer, repeats)
    return {**row, 'pairs': repeats,
            'segjax_train_s': round(segjax_train, 4), 'torch_train_s': round(torch_train, 4),
            'train_ratio': round(segjax_train / torch_train, 3),
            'segjax_infer_s': round(segjax_infer, 4), 'torch_infer_s': round(torch_infer, 4),
            'infer_ratio': round(segjax_infer / torch_infer, 3)}


TABLE = [  # (column, key)
    ('model', 'model'), ('input', 'input'), ('setting', 'setting'),
    ('segjax train s', 'segjax_train_s'), ('torch train s', 'torch_train_s'),
    ('ratio', 'train_ratio'), ('segjax infer s', 'segjax_infer_s'),
    ('torch infer s', 'torch_infer_s'), ('ratio', 'infer_ratio'),
]


def markdown(rows: list[dict]) -> str:
    lines = ['| ' + ' | '.join(column for column, _ in TABLE) + ' |',
             '|---|---|---|' + '---:|' * (len(TABLE) - 3)]
    for row in rows:
        if 'error' in row:
            lines.append(f'| {row["model"]} | {row["input"]} | {row["setting"]} | '
                         f'{row["error"]} |')
        else:
            lines.append('| ' + ' | '.join(str(row[key]) for _, key in TABLE) + ' |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default=','.join(train_step.MODELS),
                        help=f'comma-separated subset of {",".join(train_step.MODELS)}')
    parser.add_argument('--torch', default='eager',
                        help=f'comma-separated PyTorch settings from {",".join(SETTINGS)}')
    parser.add_argument('--batch', type=int, default=None, help="default: the model's own")
    parser.add_argument('--size', type=int, default=None, help="input side; default: model's")
    parser.add_argument('--repeats', type=int, default=5, help='alternated pairs timed')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    args = parser.parse_args()
    names, settings = args.models.split(','), args.torch.split(',')
    if unknown := [n for n in names if n not in train_step.MODELS]:
        parser.error(f'unknown model(s) {unknown}; choose from {list(train_step.MODELS)}')
    if unknown := [s for s in settings if s not in SETTINGS]:
        parser.error(f'unknown --torch setting(s) {unknown}; choose from {list(SETTINGS)}')
    sharding.configure_runtime()  # before any JAX computation: the XLA flags are read once
    torch.set_num_threads(os.cpu_count())
    sizes = {name: train_step.shapes(name, args.batch, args.size) for name in names}
    check_parameter_counts(names, sizes)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")}', flush=True)

    rows = []
    for name in names:
        batch, size = sizes[name]
        segjax_runners = {}  # by compute dtype: bf16 rows compare with segjax in bfloat16
        for setting in settings:
            dtype = 'bfloat16' if setting == 'bf16' else 'float32'
            if dtype not in segjax_runners:
                segjax_runners[dtype] = train_step.SegjaxRunner(
                    name, batch, size, train_step.DTYPES[dtype])
            rows.append(compare(segjax_runners[dtype], name, batch, size, setting,
                                args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
                       'xla_flags': os.environ.get('XLA_FLAGS', ''), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
