"""python -m segjax.sweep --config E --workdir W --study NAME --trials N --space KEY=SPEC ...

Searches config overrides with Optuna: each trial is an ordinary segjax.train run in
W/trials/<number> whose validation metric is reported to Optuna at every evaluation, so a pruner
can stop it early. Any number of workers (processes, or machines pointing at one --storage URL)
run one study together; running the command again resumes it. docs/sweeps.md has the details.

    python -m segjax.sweep --config experiments/unet_synthetic.py --workdir runs/sweep \
        --study lr --trials 12 --space 'optimizer.lr=loguniform(1e-4,1e-2)'
    python -m segjax.sweep --study lr --storage sqlite:///runs/sweep/study.db --report

A search space item is `KEY=SPEC`, KEY a config key as in `--config.KEY=value` and SPEC one of
  uniform(low, high[, step])  loguniform(low, high)  int(low, high[, step])  logint(low, high)
  choice(v1, v2, ...)         (Python literals: numbers, strings, True/False/None, tuples)
(segjax/sweep/space.py). An experiment file may define `get_search_space()` returning
{KEY: SPEC}; `--space` adds to it and replaces its items of the same KEY.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

import optuna

from segjax import cli, experiment, logs, sharding
from segjax import config as config_lib
from segjax.data import prepare
from segjax.sweep import SweepError
from segjax.sweep.report import report
from segjax.sweep.space import (
    baseline_params,
    check_space,
    experiment_space,
    grid_of,
    merged_space,
    parse_space,
)
from segjax.sweep.study import (
    create_or_resume,
    default_storage,
    load_study,
    make_pruner,
    make_sampler,
    open_storage,
    retry_interrupted,
    run_worker,
)
from segjax.sweep.trials import check_metric, make_objective


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='segjax.sweep', description=__doc__.splitlines()[0],
        epilog='Fixed config overrides apply to every trial: --config.num_steps=300')
    add = parser.add_argument
    add('--config', help='experiment file, e.g. experiments/unet_synthetic.py')
    add('--workdir', help='the study directory: trials/<number>/, report.md, plots (and the '
        'default SQLite database)')
    add('--study', required=True, help='study name in the storage')
    add('--storage', default=None, help='database URL shared by the workers (default: '
        'sqlite:///WORKDIR/study.db); postgresql://... or mysql+pymysql://... for many machines')
    add('--trials', type=int, default=None,
        help='finished (complete or pruned) trials the study needs, counted over all workers '
        'and runs (default: the grid size with --sampler grid)')
    add('--space', action='append', default=[], metavar='KEY=SPEC',
        help="a search space item, e.g. 'optimizer.lr=loguniform(1e-4,1e-2)' (repeatable)")
    add('--metric', default='val/miou', help='the objective: an evaluation scalar (val/miou)')
    add('--direction', choices=('maximize', 'minimize'), default='maximize')
    add('--sampler', choices=('tpe', 'random', 'grid'), default='tpe')
    add('--pruner', choices=('median', 'hyperband', 'none'), default='median')
    add('--startup_trials', type=int, default=5,
        help='trials sampled at random before TPE models the space, and finished before the '
        'median pruner prunes')
    add('--pruner_warmup_steps', type=int, default=0,
        help='the median pruner judges evaluations from this training step on (the first '
        'evaluations of short runs are noisy)')
    add('--seed', type=int, default=None, help="the sampler's seed (one worker: reproducible)")
    add('--baseline', action='store_true',
        help="queue the config's own values as the study's first trial")
    add('--retries', type=int, default=1,
        help='times a trial whose worker was killed or interrupted is queued again (0: never)')
    add('--heartbeat_seconds', type=int, default=60,
        help='workers beat this often; a trial silent for twice as long is marked failed')
    add('--max_failed', type=int, default=None,
        help='stop when the study holds this many failed trials (default: --trials)')
    add('--report', action='store_true',
        help='print the table, best command and plots of the study, then exit')
    add('--compilation_cache', default=None,
        help="persistent XLA compilation cache (default: segjax's; '' turns it off)")
    logs.add_verbose_flag(parser)
    return parser


def _fail(parser: argparse.ArgumentParser, message: str, code: int = 2):
    parser.exit(code, f'segjax.sweep: error: {message}\n')


def main(argv: Sequence[str]) -> int:
    overrides, rest = config_lib.split_argv(argv)
    parser = argument_parser()
    args = parser.parse_args(rest)
    logs.quiet(args.verbose)
    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not args.storage and not args.workdir:
        _fail(parser, 'give --storage URL or --workdir (whose study.db is the default storage)')
    storage_url = args.storage or default_storage(args.workdir)
    try:
        if args.report:
            study = load_study(open_storage(storage_url), args.study)
            print(report(study, args.workdir or study.user_attrs.get('workdir')))
            return 0
        return _sweep(parser, args, overrides, storage_url)
    except (SweepError, config_lib.ConfigError) as e:
        _fail(parser, str(e))


def _sweep(parser, args, overrides: list[str], storage_url: str) -> int:
    if not args.config or not args.workdir:
        _fail(parser, '--config and --workdir are needed to run trials (--report needs only '
              '--study and --storage)')
    # Everything a trial needs is checked here, before a storage or a trial exists.
    config = config_lib.load(args.config, overrides)
    space = merged_space(experiment_space(args.config), args.space)
    distributions = parse_space(space)
    check_space(config, distributions, overrides, args.config)
    check_metric(config, args.metric)
    grid = grid_of(distributions) if args.sampler == 'grid' else None
    if grid is not None:
        size = math.prod(len(v) for v in grid.values())
        trials = min(args.trials or size, size)
    elif args.trials is None:
        _fail(parser, '--trials N is needed (finished trials the study should hold)')
    else:
        trials = args.trials
    if (trials < 1 or args.heartbeat_seconds < 1 or args.retries < 0 or args.startup_trials < 0
            or args.pruner_warmup_steps < 0):
        _fail(parser, '--trials and --heartbeat_seconds must be >= 1, --retries, '
              '--startup_trials and --pruner_warmup_steps >= 0')
    baseline = baseline_params(config, distributions) if args.baseline else None

    sharding.configure_runtime(cli.DEFAULT_COMPILATION_CACHE if args.compilation_cache is None
                               else args.compilation_cache)
    os.makedirs(args.workdir, exist_ok=True)
    storage = open_storage(storage_url, heartbeat_seconds=args.heartbeat_seconds,
                           retries=args.retries)
    try:  # once, here: a data set that cannot be prepared is one error, not N failed trials
        experiment.dataset_builder(config)
    except prepare.PrepareError as e:
        raise SweepError(str(e)) from None
    sampler = make_sampler(args.sampler, grid=grid,
                           startup_trials=args.startup_trials, seed=args.seed)
    pruner = make_pruner(args.pruner, startup_trials=args.startup_trials,
                         first_eval=config.eval_every or config.num_steps,
                         num_steps=config.num_steps, warmup_steps=args.pruner_warmup_steps)
    attrs = {'space': space, 'metric': args.metric, 'config': args.config,
             'workdir': os.path.abspath(args.workdir), 'overrides': overrides}
    study = create_or_resume(storage, args.study, direction=args.direction, sampler=sampler,
                             pruner=pruner, attrs=attrs)
    if baseline is not None and not study.get_trials(deepcopy=False):
        study.enqueue_trial(baseline, user_attrs={'baseline': True}, skip_if_exists=True)

    objective = make_objective(args.config, overrides, distributions, args.workdir, args.metric,
                               args.study)
    start = time.time()
    try:
        run_worker(study, objective, trials=trials,
                   max_failed=args.max_failed if args.max_failed is not None else trials,
                   poll_seconds=min(args.heartbeat_seconds, 10))
    except KeyboardInterrupt:
        retry_interrupted(study, args.retries)
        print(f'interrupted: run the same command to resume study {args.study!r}', flush=True)
        return 130
    print(report(study, args.workdir))
    print(f'this worker: {logs.format_seconds(time.time() - start)}', flush=True)
    return 0


def run() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
    run()
