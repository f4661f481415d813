"""XLA:CPU flag sets compared: float32 reduction accuracy and training-step time.

    python benchmarks/xla_cpu_flags.py                                   # U-Net, 3 rounds
    python benchmarks/xla_cpu_flags.py --models unet,deeplabv3plus_r50 --rounds 3
    python benchmarks/xla_cpu_flags.py --candidates segjax_2026_11,ynn_reduce --rounds 1

XLA reads XLA_FLAGS once, when jax is imported, so every candidate runs in its own processes:
one measures the relative error of float32 reductions against float64 numpy on the same
float32 inputs (the sums, means and BatchNorm-style variances below, the cross-entropy of a
batch of logits; and, in a column of its own, segjax's BatchNorm statistics, which are
matmuls), the others time `benchmarks/train_step.py --measure_one` (the real jitted
`segjax.step.train_step`, median of --repeats calls after a warm-up). Candidates run
interleaved (A B C A B C ...) for --rounds rounds, so that load from other processes falls on
all of them alike; reported: the median over rounds of each process's median step time and the
range over rounds, of wall time and of the process's CPU seconds per step (the work done, less
sensitive to other processes on a shared machine). Results go to
benchmarks/results/<date>-xla_cpu_flags.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# name -> XLA_FLAGS. `--xla_cpu_experimental_ynn_fusion_type` takes a comma-separated list of
# dot, eltwise, reduce, individual_dot, individual_convolution (an exact list replaces jaxlib's
# default list; '+x'/'-x' items add to or remove from it); jaxlib 0.10.2's default list holds at
# least reduce and individual_convolution. '+reduce' is that default list unchanged (reduce is
# already in it), written out so that segjax.sharding.configure_runtime adds no flag of its own.
CANDIDATES = {
    'segjax_2026_11': '--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=',
    'ynn_reduce': '--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=reduce',
    'ynn_default': '--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type=+reduce',
    'ynn_default_no_conv': ('--xla_cpu_use_onednn=true '
                            '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'),
    'jax_default': '--xla_cpu_use_onednn=false --xla_cpu_experimental_ynn_fusion_type=+reduce',
}


def reduction_errors() -> dict:
    """Relative error of float32 reductions (jitted, flags in effect) against float64 numpy on
    the same float32 inputs; the largest over channels where a result is per channel."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax import losses
    from segjax.models import ops

    rng = np.random.default_rng(0)

    def rel(value, reference) -> float:
        value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
        return float(np.max(np.abs(value - reference) / np.abs(reference)))

    errors = {}
    # The example shape; a constant 1/3 is the worst case of sequential rounding.
    for name, x in [('sum_48x32x32_uniform', rng.uniform(0, 1, (48, 32, 32))),
                    ('sum_48x32x32_third', np.full((48, 32, 32), 1 / 3))]:
        x = x.astype(np.float32)
        errors[name] = rel(jax.jit(jnp.sum)(x), x.astype(np.float64).sum())
    # BatchNorm statistics: per-channel mean and variance over batch and space.
    x = (0.5 + 2 * rng.normal(size=(16, 64, 64, 32))).astype(np.float32)
    x64 = x.astype(np.float64)
    errors['bn_mean_16x64x64x32'] = rel(jax.jit(lambda x: jnp.mean(x, (0, 1, 2)))(x),
                                        x64.mean((0, 1, 2)))
    errors['bn_var_16x64x64x32'] = rel(jax.jit(lambda x: jnp.var(x, (0, 1, 2)))(x),
                                       x64.var((0, 1, 2)))
    # segjax's own BatchNorm (models/ops.py) sums with ones-vector matmuls, not reductions.
    _, mean, var = jax.jit(functools.partial(ops.batch_normalize, epsilon=1e-5))(
        x, jnp.ones(32), jnp.zeros(32))
    errors['segjax_bn_mean'] = rel(mean, x64.mean((0, 1, 2)))
    errors['segjax_bn_var'] = rel(var, x64.var((0, 1, 2)))
    # The loss: class-weighted cross-entropy of a [8, 64, 64, 21] batch.
    logits = rng.normal(size=(8, 64, 64, 21)).astype(np.float32)
    labels = rng.integers(0, 21, (8, 64, 64)).astype(np.int32)
    weights = rng.uniform(0.5, 2, 21).astype(np.float32)
    log_p = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1,
                                                                                   keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    reference = (weights[labels] * nll).sum() / weights[labels].astype(np.float64).sum()
    errors['cross_entropy_8x64x64x21'] = rel(jax.jit(
        lambda z, y: losses.cross_entropy(z, y, class_weights=weights))(logits, labels),
        reference)
    return {name: float(f'{e:.3g}') for name, e in errors.items()}


def in_process(flags: str, command: list[str]) -> dict:
    """The last JSON line `command` prints, run with XLA_FLAGS=flags; {'error'} if it failed."""
    env = {**os.environ, 'XLA_FLAGS': flags, 'TF_CPP_MIN_LOG_LEVEL': '2'}
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {'error': (out.stderr.strip().splitlines() or [f'exit {out.returncode}'])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--candidates', default=','.join(CANDIDATES))
    parser.add_argument('--models', default='unet', help='models of train_step.py')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=5, help='timed steps per process')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'))
    parser.add_argument('--accuracy_one', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accuracy_one:
        print(json.dumps(reduction_errors()))
        return
    names = args.candidates.split(',')
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f'unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}')
    sys.path.insert(0, HERE)
    import train_step  # noqa: E402  (the benchmark's own model table and default shapes)

    results = {name: {'xla_flags': CANDIDATES[name]} for name in names}
    for name in names:
        results[name]['errors'] = in_process(
            CANDIDATES[name], [sys.executable, __file__, '--accuracy_one'])
        print(name, json.dumps(results[name]['errors']), flush=True)
    for model in args.models.split(','):
        batch, size = train_step.shapes(model, None, None)
        for round_index in range(args.rounds):
            for name in names:  # interleaved: A B C, A B C, ...
                row = in_process(CANDIDATES[name], [
                    sys.executable, os.path.join(HERE, 'train_step.py'), '--measure_one', model,
                    '--batch', str(batch), '--size', str(size), '--dtype', 'float32',
                    '--repeats', str(args.repeats)])
                results[name].setdefault(model, []).append(
                    {k: row[k] for k in ('train_step_s', 'train_cpu_s', 'error') if k in row})
                print(f'round {round_index} {model} {name}: {json.dumps(row)}', flush=True)

    models = args.models.split(',')
    lines = ['| flag set | XLA_FLAGS | max reduction rel. error | segjax BatchNorm stats | '
             + ' | '.join(f'{m} step s | {m} CPU s/step' for m in models) + ' |',
             '|---|---|---:|---:|' + '---:|---:|' * len(models)]
    for name in names:
        r = results[name]
        failed = 'error' in r['errors']
        errors = [e for k, e in r['errors'].items() if not k.startswith('segjax_bn')]
        bn_errors = [e for k, e in r['errors'].items() if k.startswith('segjax_bn')]
        cells = []
        for model, key in [(m, k) for m in models for k in ('train_step_s', 'train_cpu_s')]:
            times = [row[key] for row in r.get(model, []) if key in row]
            cells.append(f'{statistics.median(times):.3f} [{min(times):.3f}, {max(times):.3f}]'
                         if times else ('failed' if r.get(model) else 'not run'))
        lines.append(f'| {name} | `{r["xla_flags"]}` | '
                     + ('failed | failed | ' if failed else
                        f'{max(errors):.2g} | {max(bn_errors, default=float("nan")):.2g} | ')
                     + ' | '.join(cells) + ' |')
    table = '\n'.join(lines)
    print('\n' + table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f'{datetime.date.today()}-xla_cpu_flags')
    with open(stem + '.json', 'w') as f:
        json.dump({'args': vars(args), 'cpu_count': os.cpu_count(), 'results': results}, f,
                  indent=1)
    with open(stem + '.md', 'w') as f:
        f.write(table + '\n')


if __name__ == '__main__':
    main()
