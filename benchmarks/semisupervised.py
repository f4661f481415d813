"""Supervised-only vs adversarial vs semi-supervised adversarial training with 1/8 of the labels,
on the embedded data set, same model, steps and labelled images, over several seeds.

    python benchmarks/semisupervised.py                       # 3 seeds x 3 kinds, 1,000 steps
    python benchmarks/semisupervised.py --seeds 0 --num_steps 100 --root /tmp/ss   # a quick look
    python benchmarks/semisupervised.py --kinds supervised semisupervised          # two of them

Each run is an ordinary `python -m segjax.train` (workdir <root>/<kind>-seed<N>; a finished one
is not re-run, so the command resumes a partial study); the table (validation mIoU and boundary
mIoU, mean and sample standard deviation over the seeds, and wall time) is printed and written
to <root>/semisupervised.md and .json.

  supervised      experiments/unet_synthetic.py --config.data.labelled_fraction=<f>
  adversarial     experiments/adversarial_unet_synthetic.py (Luc et al. 2016), labels only
  semisupervised  experiments/semisup_unet_synthetic.py (Hung et al. 2018), + the other images
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import ROOT, train_once, wall_seconds, write_report

KINDS = {'supervised': 'experiments/unet_synthetic.py',
         'adversarial': 'experiments/adversarial_unet_synthetic.py',
         'semisupervised': 'experiments/semisup_unet_synthetic.py'}


def train(kind: str, seed: int, args) -> dict:
    workdir = os.path.join(args.root, f'{kind}-seed{seed}')
    metrics = train_once(KINDS[kind], workdir, [
        f'--config.seed={seed}', f'--config.num_steps={args.num_steps}',
        f'--config.data.labelled_fraction={args.labelled_fraction}', '--config.eval_every=0',
        *args.overrides])
    return {'miou': metrics['miou'], 'boundary_miou': metrics['boundary_miou'],
            'wall': wall_seconds(workdir)}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default=os.path.join(ROOT, 'runs', 'semisupervised'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--num_steps', type=int, default=1000)
    parser.add_argument('--labelled_fraction', type=float, default=0.125)
    parser.add_argument('--kinds', nargs='+', choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument('overrides', nargs='*', help='--config.key=value for every run')
    args = parser.parse_args()
    results = {kind: [] for kind in KINDS if kind in args.kinds}
    for seed in args.seeds:  # seed-major: a partial study already compares all the kinds
        for kind in results:
            results[kind].append(train(kind, seed, args))
    lines = [f'| training ({args.labelled_fraction:g} of the labels, {args.num_steps} steps, '
             f'seeds {args.seeds}) | mIoU | boundary mIoU | minutes per run |',
             '|---|---|---|---|']
    for kind, runs in results.items():
        lines.append(f'| {kind} | {mean_std([r["miou"] for r in runs])} | '
                     f'{mean_std([r["boundary_miou"] for r in runs])} | '
                     f'{statistics.mean(r["wall"] for r in runs) / 60:.1f} |')
    table = '\n'.join(lines)
    print(table)
    write_report(os.path.join(args.root, 'semisupervised'), table + '\n',
                 {'args': vars(args), 'results': results})


if __name__ == '__main__':
    main()
