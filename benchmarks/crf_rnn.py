"""CRF-as-RNN trained end to end vs the same U-Net with a post-hoc dense CRF, on the embedded
data set (issue 14): same steps, seed and data; mIoU and boundary mIoU, train time, the learnt
CRF weights.

    python benchmarks/crf_rnn.py --steps 100 --seed 0 --workdir runs/crf_rnn_benchmark \
        --config.schedule.warmup_steps=20
    # + CRF-as-RNN fine-tuned from a U-Net trained 1500 steps, and its no-CRF control
    python benchmarks/crf_rnn.py --steps 100 --workdir runs/crf_rnn_benchmark \
        --finetune_base_steps 1500 --finetune_steps 200 --config.schedule.warmup_steps=20

Each training is an ordinary `python -m segjax.train` (a finished one is not re-run, so the
command resumes a partial study); the U-Net is unet_synthetic's at --base_width / --depth:

  unet       experiments/unet_synthetic.py, --steps. Evaluated without CRF, with the post-hoc
             CRF at DeepLab-LargeFOV's defaults (--posthoc_iterations mean-field iterations, as
             many as CRF-as-RNN runs), and with the best setting of `segjax.evaluate --crf_grid
             GRID` (chosen on the same validation images it is scored on: optimistic).
  crf_rnn    experiments/crf_rnn_unet_synthetic.py (5 iterations, learnt w1, w2 and
             compatibility), --steps, from scratch; evaluated as is (its CRF inside), and its
             inner U-Net alone (the CRF taken off).
  unet_base  with --finetune_base_steps > 0: the same U-Net trained that many steps, evaluated
             as `unet` is; the start of `finetuned` (else `unet` is).
  finetuned  the same CRF-as-RNN initialised from that U-Net's trained weights
             (--config.pretrained=<its workdir>: the CRF's at their initial values, a fresh
             optimizer), then --finetune_steps more steps at
             --finetune_lr without warm-up (Zheng et al. fine-tuned a trained FCN so); skipped
             at 0.

Train minutes: segjax.train's own wall time (metrics.json's wall_seconds_this_run: compilation
and the final evaluation included) on a shared machine, so only roughly comparable.

The table goes to benchmarks/results/<date>-crf_rnn.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import (
    ROOT,
    load_average,
    load_config,
    machine_summary,
    parse_args_and_overrides,
    train_once,
    write_report,
)

UNET = 'experiments/unet_synthetic.py'
CRF_RNN = 'experiments/crf_rnn_unet_synthetic.py'
PLAIN_UNETS = ('unet', 'unet_base', 'finetuned_plain')


def run_overrides(name: str, args) -> list[str]:
    """The --config.* overrides of run `name` (unet, crf_rnn or finetuned)."""
    if name in PLAIN_UNETS:
        model = [f'--config.model.base_width={args.base_width}',
                 f'--config.model.depth={args.depth}']
    else:
        model = [f'--config.model.inner.base_width={args.base_width}',
                 f'--config.model.inner.depth={args.depth}']
    steps = [f'--config.num_steps={args.steps}']
    if name == 'unet_base':
        steps = [f'--config.num_steps={args.finetune_base_steps}']
    if name in ('finetuned', 'finetuned_plain'):
        # Warm-up is for a network starting from random weights; this one starts trained (its
        # U-Net from finetune_base's workdir: the whole model, or CRF-as-RNN's inner).
        steps = [f'--config.num_steps={args.finetune_steps}', f'--config.optimizer.lr='
                 f'{args.finetune_lr}', '--config.schedule.warmup_steps=0',
                 f'--config.pretrained={os.path.join(args.workdir, finetune_base(args))}']
    # The run's own overrides last, so that they win over the shared ones.
    return [*args.overrides, *model, f'--config.seed={args.seed}', '--config.eval_every=0',
            '--config.checkpoint_every=100000', *steps]


def experiment_of(name: str) -> str:
    return UNET if name in PLAIN_UNETS else CRF_RNN


def finetune_base(args) -> str:
    return 'unet_base' if args.finetune_base_steps else 'unet'


def config_of(name: str, args):
    return load_config(experiment_of(name), run_overrides(name, args))


def train(name: str, args) -> dict:
    """Trains run `name` unless its metrics.json exists; its final evaluation and wall time."""
    metrics = train_once(experiment_of(name), os.path.join(args.workdir, name), [
        '--compilation_cache', args.compilation_cache, *run_overrides(name, args)])
    return {'miou': metrics['miou'], 'boundary_miou': metrics['boundary_miou'],
            'train_wall_s': metrics['wall_seconds_this_run']}


def evaluate(name: str, args, tag: str, *extra: str) -> dict:
    """segjax.evaluate's result for run `name` with `extra` flags (in this process), kept in
    <workdir>/<name>/benchmark_<tag>.json so that a re-run of the study reuses it."""
    from segjax import evaluate as evaluate_cli

    path = os.path.join(args.workdir, name, f'benchmark_{tag}.json')
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.time()
    result = evaluate_cli.main(['--config', os.path.join(ROOT, experiment_of(name)), '--workdir',
                                os.path.join(args.workdir, name), '--compilation_cache',
                                args.compilation_cache, *run_overrides(name, args), *extra])
    result = {key: value for key, value in result.items()
              if key in ('miou', 'boundary_miou', 'results', 'best')}
    result['wall_s'] = time.time() - start
    evaluate_cli.write_json(path, result)
    return result


def inner_alone(name: str, args) -> dict:
    """A CRF-as-RNN run's inner U-Net evaluated without the CRF (its trained weights as they
    are): what the network learnt to leave to the CRF."""
    from segjax import evaluate as evaluate_cli
    from segjax import experiment, sharding

    mesh = sharding.make_mesh()
    _, state = experiment.restore_state(config_of(name, args), os.path.join(args.workdir, name),
                                        mesh)
    config = config_of('unet', args)
    state = state.replace(params=state.params['inner'], batch_stats=state.batch_stats['inner'])
    model = experiment.make_model(config)
    counts = evaluate_cli.counts_over_split(
        state, evaluate_cli.make_eval_fn(config, model, mesh), experiment.dataset_builder(config),
        config, mesh, progress_every_s=None)
    summary = evaluate_cli.summarize_counts(counts)
    return {'miou': summary['miou'], 'boundary_miou': summary['boundary_miou']}


def learnt_crf(name: str, args) -> dict:
    """The CRF parameters of a CRF-as-RNN run's last checkpoint."""
    import numpy as np

    from segjax import experiment, sharding

    _, state = experiment.restore_state(config_of(name, args), os.path.join(args.workdir, name),
                                        sharding.make_mesh())
    learnt = {key: np.asarray(state.params[key]).tolist()
              for key in ('appearance_weight', 'smoothness_weight', 'compatibility')
              if key in state.params}
    return learnt


def percent(x: float) -> str:
    return f'{100 * x:.2f}'


def unet_rows(name: str, unet: dict, args) -> list[tuple]:
    grid_best = unet['crf_grid']['best']
    best_name = ', '.join(f'{k}={v:g}' for k, v in grid_best['crf'].items())
    return [
        (name, 'no CRF', unet['miou'], unet['boundary_miou'], unet['train_wall_s']),
        (name, f'post-hoc CRF, DeepLab defaults, {args.posthoc_iterations} iterations',
         unet['posthoc_default']['miou'], unet['posthoc_default']['boundary_miou'], None),
        (name, f'post-hoc CRF, grid best ({best_name})', grid_best['miou'],
         grid_best['boundary_miou'], None),
    ]


def table(results: dict, args) -> str:
    rnn, rnn_name = results['crf_rnn'], f'crf_rnn ({args.steps} steps)'
    rows = [
        *unet_rows(f'unet ({args.steps} steps)', results['unet'], args),
        (rnn_name, 'as trained (CRF inside, 5 iterations)', rnn['miou'], rnn['boundary_miou'],
         rnn['train_wall_s']),
        (rnn_name, 'its inner U-Net alone (CRF removed)', rnn['inner_alone']['miou'],
         rnn['inner_alone']['boundary_miou'], None),
    ]
    if 'unet_base' in results:
        rows += unet_rows(f'unet_base ({args.finetune_base_steps} steps)', results['unet_base'],
                          args)
    if 'finetuned_plain' in results:
        rows += unet_rows(f'finetuned_plain ({finetune_base(args)} + {args.finetune_steps} '
                          'steps, no CRF)', results['finetuned_plain'], args)
    if 'finetuned' in results:
        tuned = results['finetuned']
        name = f'finetuned ({finetune_base(args)} + {args.finetune_steps} steps)'
        rows += [
            (name, 'as trained (CRF inside, 5 iterations)', tuned['miou'],
             tuned['boundary_miou'], tuned['train_wall_s']),
            (name, 'its inner U-Net alone (CRF removed)', tuned['inner_alone']['miou'],
             tuned['inner_alone']['boundary_miou'], None),
        ]
    lines = ['| run | evaluation | mIoU | boundary mIoU | train minutes |', '|---|---|---|---|---|']
    for run, evaluation, miou, boundary, wall in rows:
        minutes = '' if wall is None else f'{wall / 60:.1f}'
        lines.append(f'| {run} | {evaluation} | {percent(miou)} | {percent(boundary)} | '
                     f'{minutes} |')
    return '\n'.join(lines)


def learnt_lines(results: dict) -> str:
    import numpy as np

    lines = []
    for name in ('crf_rnn', 'finetuned'):
        if name not in results:
            continue
        learnt = results[name]['learnt_crf']
        text = (f'- {name}: w1 (appearance) {learnt["appearance_weight"]:.3f}, w2 (smoothness) '
                f'{learnt["smoothness_weight"]:.3f} (initial 4, 3)')
        if 'compatibility' in learnt:
            mu = np.asarray(learnt['compatibility'])
            off = mu[~np.eye(len(mu), dtype=bool)]
            text += (f'; compatibility (initial Potts: 0 diagonal, 1 off it): diagonal '
                     f'{np.diag(mu).min():.3f}..{np.diag(mu).max():.3f}, off-diagonal '
                     f'{off.min():.3f}..{off.max():.3f} (mean {off.mean():.3f})')
        lines.append(text)
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'crf_rnn_benchmark'))
    parser.add_argument('--base_width', type=int, default=8)
    parser.add_argument('--depth', type=int, default=3)
    parser.add_argument('--posthoc_iterations', type=int, default=5)
    parser.add_argument('--crf_grid', default='iterations=5;appearance_weight=3,10;'
                        'theta_alpha=15,60')
    parser.add_argument('--finetune_steps', type=int, default=0)
    parser.add_argument('--finetune_base_steps', type=int, default=0)
    parser.add_argument('--finetune_lr', type=float, default=1e-3)
    parser.add_argument('--out', default=os.path.join(
        ROOT, 'benchmarks', 'results', time.strftime('%Y-%m-%d') + '-crf_rnn'))
    args = parse_args_and_overrides(parser)  # the rest: --config.key=value for every run
    args.compilation_cache = os.path.join(args.workdir, 'jax_cache')

    from segjax import sharding

    sharding.configure_runtime(args.compilation_cache)  # before any JAX computation
    start, load_start = time.time(), load_average()
    unets = ['unet'] + (['unet_base'] if args.finetune_steps and args.finetune_base_steps
                        else []) + (['finetuned_plain'] if args.finetune_steps else [])
    rnns = ['crf_rnn'] + (['finetuned'] if args.finetune_steps else [])
    results = {}
    for name in unets + rnns:
        results[name] = train(name, args)
    for name in unets:
        results[name]['posthoc_default'] = evaluate(
            name, args, f'posthoc_default_{args.posthoc_iterations}',
            f'--config.eval.crf.iterations={args.posthoc_iterations}')
        results[name]['crf_grid'] = evaluate(name, args, 'crf_grid', '--crf_grid', args.crf_grid)
    for name in rnns:
        results[name]['inner_alone'] = inner_alone(name, args)
        results[name]['learnt_crf'] = learnt_crf(name, args)

    command = (f'python benchmarks/crf_rnn.py --steps {args.steps} --seed {args.seed} '
               f'--workdir {args.workdir} --base_width {args.base_width} '
               f'--depth {args.depth} --finetune_steps {args.finetune_steps} '
               f'--finetune_base_steps {args.finetune_base_steps} '
               f"--crf_grid '{args.crf_grid}'{''.join(' ' + o for o in args.overrides)}")
    machine = machine_summary(start, load_start)
    text = (f'# CRF-as-RNN vs post-hoc dense CRF on the embedded data set '
            f'({time.strftime("%Y-%m-%d")})\n\n`{command}`\n\n{table(results, args)}\n\n'
            f'Learnt CRF parameters:\n\n{learnt_lines(results)}\n\n'
            'The grid was searched on the same 300 validation images it is scored on. '
            'One seed.\n\n'
            f'machine: {machine}\n')
    print(text)
    write_report(args.out, text, {'args': vars(args), 'command': command, 'results': results,
                                  'machine': machine})


if __name__ == '__main__':
    main()
