"""Dense CRF speed and memory: segjax.crf.dense_crf (jit, XLA:CPU) vs pydensecrf, same input.

    python benchmarks/crf.py [--repeats 3] [--sizes 375x500x21,1024x2048x19,188x250x21]
                             [--iterations 5,10] [--no-pydensecrf]

The input is matplotlib's sample photograph (grace_hopper.jpg, a dependency already) resized to
each size, with logits bilinearly upsampled from random values at 1/8 resolution (what a
network at output stride 8 hands the CRF). Parameters: DeepLab-CRF-LargeFOV's (w1=4,
theta_alpha=121, theta_beta=5, w2=3, theta_gamma=3). Each case runs in its own process so its
peak RSS is its own; `baseline_rss_mib` is the process after imports and input creation, so the
CRF's own memory is peak - baseline (for segjax that includes the compiler's); `xla_temp_mib`
is XLA's planned temporary buffers for the call (segjax only). Seconds per image: the median of
`repeats` calls after a warm-up call; `compile_s` is jit's lower + compile, timed apart.
Prints a JSON line per case and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def _time(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return median


def run_case(impl: str, height: int, width: int, classes: int, iterations: int,
             repeats: int) -> dict:
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
    else:
        import numpy as np
        import pydensecrf.densecrf as dcrf

        shifted = logits - logits.max(-1, keepdims=True)
        unary = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))
        unary = np.ascontiguousarray(unary.transpose(2, 0, 1).reshape(classes, -1), np.float32)
        baseline = _rss_mib()
        compile_s = 0.0

        def run():
            model = dcrf.DenseCRF2D(width, height, classes)
            model.setUnaryEnergy(unary)
            model.addPairwiseGaussian(sxy=3, compat=3)
            model.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4)
            return np.array(model.inference(iterations))

    median = _time(run, repeats)
    return {'impl': impl, 'image': f'{height}x{width}', 'classes': classes,
            'iterations': iterations, 'seconds_per_image': round(median, 3),
            'compile_s': round(compile_s, 1) if impl == 'segjax' else 0.0,
            'peak_rss_mib': _rss_mib(), 'baseline_rss_mib': baseline,
            'xla_temp_mib': xla_temp_mib if impl == 'segjax' else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--sizes', default='375x500x21,1024x2048x19,188x250x21')
    parser.add_argument('--iterations', default='5,10')
    parser.add_argument('--no-pydensecrf', action='store_true')
    parser.add_argument('--case', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        impl, height, width, classes, iterations = args.case.split(',')
        print(json.dumps(run_case(impl, int(height), int(width), int(classes), int(iterations),
                                  args.repeats)))
        return
    impls = ['segjax']
    if not args.no_pydensecrf:
        try:
            import pydensecrf.densecrf  # noqa: F401
            impls.append('pydensecrf')
        except ImportError:
            print('pydensecrf is not installed: segjax only', file=sys.stderr)
    rows = []
    for size in args.sizes.split(','):
        height, width, classes = (int(v) for v in size.split('x'))
        for iterations in (int(v) for v in args.iterations.split(',')):
            for impl in impls:
                case = f'{impl},{height},{width},{classes},{iterations}'
                out = subprocess.run([sys.executable, __file__, '--case', case, '--repeats',
                                      str(args.repeats)], capture_output=True, text=True)
                if out.returncode != 0:
                    print(f'{case} failed:\n{out.stderr[-2000:]}', file=sys.stderr)
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return
    keys = list(rows[0])
    print('\n| ' + ' | '.join(keys) + ' |\n|' + '---|' * len(keys))
    for row in rows:
        print('| ' + ' | '.join(str(row[k]) for k in keys) + ' |')


if __name__ == '__main__':
    main()
