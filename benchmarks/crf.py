"""Dense CRF speed and memory: segjax.crf.dense_crf (jit, XLA:CPU) vs pydensecrf, same input.

    python benchmarks/crf.py [--repeats 3] [--sizes 375x500x21,1024x2048x19,188x250x21]
                             [--iterations 5,10] [--no-pydensecrf] [--out PREFIX]

The input is matplotlib's sample photograph (grace_hopper.jpg, a dependency already) resized to
each size, with logits bilinearly upsampled from random values at 1/8 resolution (what a
network at output stride 8 hands the CRF). Parameters: DeepLab-CRF-LargeFOV's (w1=4,
theta_alpha=121, theta_beta=5, w2=3, theta_gamma=3). Each implementation runs in its own worker
process, so its peak RSS is its own; `baseline_rss_mib` is the worker after imports and input
creation, so the CRF's own memory is peak - baseline (for segjax that includes the compiler's);
`xla_temp_mib` is XLA's planned temporary buffers for the call (segjax only). The two workers of
a case are timed alternately (segjax, pydensecrf, segjax, ...) after one warm-up call each, so
both see the same load on a shared machine; seconds per image is the median of `repeats` calls
(`min_s` the fastest), `compile_s` jit's lower + compile, timed apart, and `load` the 1-minute
load average over the case's timed calls. Prints a JSON line per case and a markdown table;
--out PREFIX also writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _inputs(height: int, width: int, classes: int):
    import matplotlib
    import numpy as np
    from PIL import Image

    path = matplotlib.get_data_path() + '/sample_data/grace_hopper.jpg'
    image = np.array(Image.open(path).convert('RGB').resize((width, height), Image.BILINEAR))
    coarse = np.random.default_rng(0).normal(0, 2, (-(-height // 8), -(-width // 8), classes))
    logits = np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize(
        (width, height), Image.BILINEAR)) for c in coarse.transpose(2, 0, 1)], -1)
    return np.ascontiguousarray(image), logits.astype(np.float32)


def _rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _prepare(impl: str, height: int, width: int, classes: int, iterations: int):
    """(run, facts): refines the case's input once; what setting it up measured."""
    image, logits = _inputs(height, width, classes)
    if impl == 'segjax':
        import functools

        import jax

        from segjax import crf, sharding

        sharding.configure_runtime()
        logits_d, images_d = jax.device_put(logits[None]), jax.device_put(image[None])
        refine = jax.jit(functools.partial(crf.dense_crf, iterations=iterations,
                                           **crf.DEEPLAB_LARGEFOV))
        baseline = _rss_mib()
        # XLA's own buffer plan for the call: the CRF's working memory, free of compiler noise.
        start = time.perf_counter()
        compiled = refine.lower(logits_d, images_d).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        xla_temp_mib = round(memory.temp_size_in_bytes / 2 ** 20) if memory else None

        def run():
            return jax.block_until_ready(compiled(logits_d, images_d))
        return run, {'compile_s': round(compile_s, 1), 'baseline_rss_mib': baseline,
                     'xla_temp_mib': xla_temp_mib}
    import numpy as np
    import pydensecrf.densecrf as dcrf

    shifted = logits - logits.max(-1, keepdims=True)
    unary = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))
    unary = np.ascontiguousarray(unary.transpose(2, 0, 1).reshape(classes, -1), np.float32)
    baseline = _rss_mib()

    def run():
        model = dcrf.DenseCRF2D(width, height, classes)
        model.setUnaryEnergy(unary)
        model.addPairwiseGaussian(sxy=3, compat=3)
        model.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4)
        return np.array(model.inference(iterations))
    return run, {'compile_s': 0.0, 'baseline_rss_mib': baseline, 'xla_temp_mib': None}


def worker(case: str) -> None:
    """One implementation on one case, timed on request: reads 'run' / 'done' lines on stdin."""
    impl, height, width, classes, iterations = case.split(',')
    run, facts = _prepare(impl, int(height), int(width), int(classes), int(iterations))
    run()  # warm-up
    print(json.dumps(facts), flush=True)
    for line in sys.stdin:
        if line.strip() != 'run':
            break
        start = time.perf_counter()
        run()
        print(json.dumps({'seconds': time.perf_counter() - start}), flush=True)
    print(json.dumps({'peak_rss_mib': _rss_mib()}), flush=True)


class _Worker:
    def __init__(self, case: str):
        self.process = subprocess.Popen([sys.executable, __file__, '--case', case],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.facts = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f'worker {self.process.args[-1]} exited with '
                               f'{self.process.wait()} (its stderr is above)')
        return json.loads(line)

    def time_once(self) -> float:
        self.process.stdin.write('run\n')
        self.process.stdin.flush()
        return self._read()['seconds']

    def finish(self) -> dict:
        self.process.stdin.write('done\n')
        self.process.stdin.flush()
        peak = self._read()
        self.process.wait()
        return peak


def run_case(impls: list[str], height: int, width: int, classes: int, iterations: int,
             repeats: int) -> list[dict]:
    """Rows for each implementation, timed alternately so that they share the machine's load."""
    workers = {impl: _Worker(f'{impl},{height},{width},{classes},{iterations}')
               for impl in impls}
    times, loads = {impl: [] for impl in impls}, []
    for _ in range(repeats):
        for impl, w in workers.items():
            loads.append(os.getloadavg()[0])
            times[impl].append(w.time_once())
    rows = []
    for impl, w in workers.items():
        peak = w.finish()
        rows.append({'impl': impl, 'image': f'{height}x{width}', 'classes': classes,
                     'iterations': iterations,
                     'seconds_per_image': round(statistics.median(times[impl]), 3),
                     'min_s': round(min(times[impl]), 3), 'compile_s': w.facts['compile_s'],
                     'peak_rss_mib': peak['peak_rss_mib'],
                     'baseline_rss_mib': w.facts['baseline_rss_mib'],
                     'xla_temp_mib': w.facts['xla_temp_mib'],
                     'load': f'{min(loads):.1f}-{max(loads):.1f}'})
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
    lines += ['| ' + ' | '.join(str(row[k]) for k in keys) + ' |' for row in rows]
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--sizes', default='375x500x21,1024x2048x19,188x250x21')
    parser.add_argument('--iterations', default='5,10')
    parser.add_argument('--no-pydensecrf', action='store_true')
    parser.add_argument('--out', default=None, help='write OUT.json and OUT.md too')
    parser.add_argument('--case', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        worker(args.case)
        return
    impls = ['segjax']
    if not args.no_pydensecrf:
        try:
            import pydensecrf.densecrf  # noqa: F401
            impls.append('pydensecrf')
        except ImportError:
            print('pydensecrf is not installed: segjax only', file=sys.stderr)
    rows = []
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
    for size in args.sizes.split(','):
        height, width, classes = (int(v) for v in size.split('x'))
        for iterations in (int(v) for v in args.iterations.split(',')):
            try:
                new = run_case(impls, height, width, classes, iterations, args.repeats)
            except RuntimeError as e:
                print(f'{size} x {iterations} iterations failed: {e}', file=sys.stderr)
                continue
            for row in new:
                print(json.dumps(row), flush=True)
            rows += new
    if not rows:
        return
    table = _markdown(rows)
    print('\n' + table)
    if args.out:
        import jax

        meta = {'started_utc': started,
                'finished_utc': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
                'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
                'python': platform.python_version(), 'jax': jax.__version__,
                'command': ' '.join(sys.argv)}
        with open(args.out + '.json', 'w') as f:
            json.dump({'meta': meta, 'rows': rows}, f, indent=1)
        with open(args.out + '.md', 'w') as f:
            f.write(f"# Dense CRF speed ({meta['started_utc']})\n\n`{meta['command']}`\n\n"
                    + table + '\n')


if __name__ == '__main__':
    main()
