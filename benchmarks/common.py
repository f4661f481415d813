"""What the training studies in benchmarks/ do alike: train each run once with the ordinary
`python -m segjax.train` (a finished run is not re-run, so a study resumes), read a run's config
back, build a fresh train state as segjax.train does, and describe the machine in the report.

Imported by the scripts as `from common import ...` (`python benchmarks/X.py` puts benchmarks/
first on sys.path). Only the standard library at import time: a benchmark may set XLA_FLAGS or
configure the runtime before JAX loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `import segjax` without installing it
    sys.path.insert(0, ROOT)


def train_once(experiment: str, workdir: str, flags: list[str]) -> dict:
    """The metrics.json of `python -m segjax.train --config experiment --workdir workdir *flags`,
    run (from the repository root) only when `workdir` holds no metrics.json yet; the run's wall
    seconds, compilation included, go to <workdir>/wall_seconds.txt (see `wall_seconds`)."""
    metrics_path = os.path.join(workdir, 'metrics.json')
    if not os.path.exists(metrics_path):
        command = [sys.executable, '-m', 'segjax.train', '--config', experiment, '--workdir',
                   workdir, *flags]
        print('$', ' '.join(command), flush=True)
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        with open(os.path.join(workdir, 'wall_seconds.txt'), 'w') as f:
            f.write(f'{time.time() - start:.1f}\n')
    with open(metrics_path) as f:
        return json.load(f)


def wall_seconds(workdir: str) -> float:
    """The wall seconds `train_once` measured for the run in `workdir`."""
    with open(os.path.join(workdir, 'wall_seconds.txt')) as f:
        return float(f.read())


def parse_args_and_overrides(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`parser`'s arguments, with every trailing `--config.key=value` (for every run) in
    `args.overrides`; any other unknown argument is the parser's usual error."""
    args, overrides = parser.parse_known_args()
    unknown = [o for o in overrides if not o.startswith('--config.')]
    if unknown:
        parser.error(f'unrecognized arguments: {" ".join(unknown)}')
    args.overrides = overrides
    return args


def load_config(experiment: str, flags: list[str]):
    """The run's ConfigDict: `experiment` (relative to the repository root) with the
    `--config.key=value` flags segjax.train was given."""
    from segjax import config as config_lib

    return config_lib.load(os.path.join(ROOT, experiment),
                           [flag[len('--config.'):] for flag in flags])


def initial_train_state(config, mesh):
    """(trainer, init, abstract state) built as segjax.train builds them; `init(key)` makes
    the state on its shardings, `abstract` has its shapes and shardings without allocating."""
    from segjax import experiment, optim

    tx, _ = optim.make(config)
    trainer = experiment.make_trainer(config, experiment.make_model(config), tx)
    init, abstract = experiment.initial_state(trainer, mesh, config)
    return trainer, init, abstract


def load_average() -> float:
    return os.getloadavg()[0]


def machine_summary(start: float, load_start: float) -> str:
    """The processor, core count, 1-minute load average at `start` and now, and the minutes
    since `start` (a `time.time()`): the line a report ends with."""
    return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load '
            f'average (1 min) {load_start:.2f} at start, {load_average():.2f} at end; '
            f'{(time.time() - start) / 60:.1f} minutes in all')


def write_report(out: str, text: str, record: dict) -> None:
    """`text` to <out>.md and `record` to <out>.json, creating the folder."""
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.md', 'w') as f:
        f.write(text)
    with open(out + '.json', 'w') as f:
        json.dump(record, f, indent=1)
