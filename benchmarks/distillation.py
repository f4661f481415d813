"""Knowledge distillation on the embedded data set: the teacher, the small student trained
alone and the same student distilled from the teacher (same steps, seed and data), each's
validation mIoU, parameter count and latency.

    python benchmarks/distillation.py                          # 600 + 600 + 600 steps
    python benchmarks/distillation.py --teacher_steps 100 --student_steps 50 --root /tmp/kd
    python benchmarks/distillation.py --distill trainer.pairwise_weight=1.0 --root /tmp/kd_pw

Trailing --config.key=value overrides apply to every run; --distill key=value to the
distilled run only.

Each run is an ordinary `python -m segjax.train` (workdir <root>/<run>; a finished one is not
re-run, so the command resumes a partial study):

  teacher    experiments/unet_synthetic.py                     (U-Net, width 16)
  student    experiments/unet_synthetic.py --config.model.base_width=8
  distilled  experiments/distill_unet_synthetic.py              (width 8, from <root>/teacher)

Latency: seconds per image at batch 1 (64 x 64), the trained weights' jitted whole-image
forward pass in this process, the median of --latency_repeats calls after a warm-up, the
three models timed in turn. The table
goes to benchmarks/results/<date>-distillation.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import (
    ROOT,
    load_average,
    load_config,
    machine_summary,
    parse_args_and_overrides,
    train_once,
    wall_seconds,
    write_report,
)

# name -> (experiment, its overrides): the teacher first, the students read its workdir.
RUNS = {
    'teacher': ('experiments/unet_synthetic.py', []),
    'student': ('experiments/unet_synthetic.py', ['--config.model.base_width=8']),
    'distilled': ('experiments/distill_unet_synthetic.py', []),
}


def run_overrides(name: str, args) -> list[str]:
    steps = args.teacher_steps if name == 'teacher' else args.student_steps
    overrides = [*RUNS[name][1], f'--config.num_steps={steps}', f'--config.seed={args.seed}',
                 '--config.eval_every=0', *args.overrides]
    if name == 'distilled':
        overrides.append(f'--config.trainer.teacher_workdir={os.path.join(args.root, "teacher")}')
        overrides += args.distill_overrides
    return overrides


def train(name: str, args) -> dict:
    workdir = os.path.join(args.root, name)
    metrics = train_once(RUNS[name][0], workdir, run_overrides(name, args))
    return {'miou': metrics['miou'], 'boundary_miou': metrics['boundary_miou'],
            'per_class_iou': metrics['per_class_iou'], 'train_wall_s': wall_seconds(workdir)}


def restored_forward(name: str, args):
    """(parameter count, a jitted batch-1 forward pass of the trained weights, compiled)."""
    import jax
    import numpy as np

    from segjax import experiment, sharding, step

    config = load_config(RUNS[name][0], run_overrides(name, args))
    model, state = experiment.restore_state(config, os.path.join(args.root, name),
                                            sharding.make_mesh())
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    forward = jax.jit(lambda v, x: step.main_logits(model.apply(v, x, train=False)))
    image = np.random.default_rng(0).normal(
        size=(1, *config.data.crop_size, 3)).astype(np.float32)
    for _ in range(5):  # compile and warm up
        forward(variables, image).block_until_ready()
    parameters = int(sum(x.size for x in jax.tree.leaves(state.params)))
    return parameters, lambda: forward(variables, image).block_until_ready()


def parameters_and_latency(args) -> dict:
    """Per run: its parameter count and median seconds per batch-1 forward pass, the runs
    timed in turn (round-robin), so that a change in the machine's load hits all alike; each
    timed call follows an untimed one of the same model."""
    forwards = {name: restored_forward(name, args) for name in RUNS}
    times = {name: [] for name in RUNS}
    for _ in range(args.latency_repeats):
        for name, (_, call) in forwards.items():
            call()  # untimed: the previous model's call left the caches holding its weights
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: {'parameters': forwards[name][0], 'latency_s': statistics.median(times[name])}
            for name in RUNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'distillation'))
    parser.add_argument('--teacher_steps', type=int, default=600)
    parser.add_argument('--student_steps', type=int, default=600)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--latency_repeats', type=int, default=200)
    parser.add_argument('--out', default=os.path.join(
        ROOT, 'benchmarks', 'results', time.strftime('%Y-%m-%d') + '-distillation'))
    parser.add_argument('--distill', action='append', default=[], metavar='KEY=VALUE',
                        help='a config override of the distilled run only, e.g. '
                             'trainer.kd_weight=0.5 (repeatable)')
    args = parse_args_and_overrides(parser)  # the rest: --config.key=value for every run
    args.distill_overrides = ['--config.' + o for o in args.distill]

    from segjax import sharding

    sharding.configure_runtime()  # the CLIs' XLA:CPU flags, before any JAX computation
    start, load_start = time.time(), load_average()
    results = {}
    for name in RUNS:
        results[name] = train(name, args)
    for name, measured in parameters_and_latency(args).items():
        results[name].update(measured)

    steps = {name: args.teacher_steps if name == 'teacher' else args.student_steps
             for name in RUNS}
    lines = ['| run | steps | parameters | mIoU | boundary mIoU | latency s/image (batch 1) | '
             'train minutes |', '|---|---|---|---|---|---|---|']
    for name, r in results.items():
        lines.append(f'| {name} | {steps[name]} | {r["parameters"]:,} | {100 * r["miou"]:.2f} | '
                     f'{100 * r["boundary_miou"]:.2f} | {r["latency_s"]:.4f} | '
                     f'{r["train_wall_s"] / 60:.1f} |')
    gain = 100 * (results['distilled']['miou'] - results['student']['miou'])
    table = '\n'.join(lines)
    machine = machine_summary(start, load_start)
    text = (f'# Distillation on the embedded data set ({time.strftime("%Y-%m-%d")})\n\n'
            f'`python benchmarks/distillation.py --teacher_steps {args.teacher_steps} '
            f'--student_steps {args.student_steps} --seed {args.seed}'
            f'{"".join(" --distill " + o for o in args.distill)}'
            f'{"".join(" " + o for o in args.overrides)}`\n\n{table}\n\n'
            f'distilled - student alone: {gain:+.2f} mIoU (one seed).\n\n'
            f'machine: {machine}\n')
    print(text)
    write_report(args.out, text, {'args': vars(args), 'steps': steps, 'results': results,
                                  'distilled_minus_student_miou': gain / 100,
                                  'machine': machine})


if __name__ == '__main__':
    main()
