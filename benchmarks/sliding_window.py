"""Sliding-window inference: batched inside jit vs a per-window Python loop, same model/image.

    python benchmarks/sliding_window.py [--height 512 --width 1024 --repeats 3]

Each variant runs in its own process so that its peak RSS is its own. Prints a JSON line per
variant and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, height: int, width: int, repeats: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax import inference, sharding
    from segjax.models import unet

    sharding.configure_runtime()
    window, stride, window_batch = (256, 256), (171, 171), 8
    if variant == 'deeplabv3plus_r50_slide':
        from segjax.models import deeplab  # written with the model zoo

        model = deeplab.DeepLabV3Plus(num_classes=19, depth=50)
        window, stride = (512, 1024), (341, 683)
        window_batch = 2
    else:
        model = unet.UNet(num_classes=19, base_width=16, depth=4)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, height, width, 3)),
                         jnp.float32)
    variables = model.init(jax.random.key(0), images[:, :window[0], :window[1]], train=False)

    def apply_fn(x):
        return model.apply(variables, x, train=False)

    if variant == 'loop':
        apply_jit = jax.jit(apply_fn)
        ys = inference.window_starts(height, window[0], stride[0])
        xs = inference.window_starts(width, window[1], stride[1])

        def run():
            total = np.zeros((height, width, 19), np.float32)
            count = np.zeros((height, width, 1), np.float32)
            for y in ys:
                for x in xs:
                    crop = images[:, y:y + window[0], x:x + window[1]]
                    total[y:y + window[0], x:x + window[1]] += np.asarray(apply_jit(crop))[0]
                    count[y:y + window[0], x:x + window[1]] += 1
            return total / count
    else:
        slide = jax.jit(functools.partial(inference.sliding_window_logits, apply_fn,
                                          window=window, stride=stride,
                                          window_batch=window_batch))

        def run():
            return jax.block_until_ready(slide(images))

    start = time.perf_counter()
    run()
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return {'variant': variant, 'image': f'{height}x{width}', 'window': f'{window[0]}x{window[1]}',
            'window_batch': window_batch if variant != 'loop' else 1,
            'seconds_per_image': round(median, 3), 'images_per_s': round(1 / median, 3),
            'first_call_s': round(compile_and_first, 1),
            'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--height', type=int, default=512)
    parser.add_argument('--width', type=int, default=1024)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--variant', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--deeplab', action='store_true',
                        help='also measure DeepLabV3+-R50 sliding windows on 1024x2048')
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.height, args.width, args.repeats)))
        return
    runs = [('batched', args.height, args.width), ('loop', args.height, args.width)]
    if args.deeplab:
        runs.append(('deeplabv3plus_r50_slide', 1024, 2048))
    rows = []
    for variant, height, width in runs:
        out = subprocess.run([sys.executable, __file__, '--variant', variant, '--height',
                              str(height), '--width', str(width), '--repeats',
                              str(args.repeats)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print('\n| ' + ' | '.join(keys) + ' |\n|' + '---|' * len(keys))
    for row in rows:
        print('| ' + ' | '.join(str(row[k]) for k in keys) + ' |')


if __name__ == '__main__':
    main()
