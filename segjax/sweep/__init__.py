"""Hyper-parameter sweeps with Optuna: `python -m segjax.sweep` (docs/sweeps.md).

Each trial is an ordinary segjax.train run in WORKDIR/trials/<number> whose validation metric is
reported to Optuna at every evaluation, so a pruner can stop it early. Any number of workers
(processes, or machines pointing at one --storage URL) run one study together; running the
command again resumes it.

    space.py    `KEY=SPEC` search space items -> Optuna distributions, checked against the config
    trials.py   the objective: one training run per trial, its evaluations reported to the pruner
    study.py    the database (heartbeats, retries), samplers, pruners, the workers' loop
    report.py   the table of trials, the best trial's command, the plots
    cli.py      the command line
"""

from __future__ import annotations

import contextlib
import warnings


class SweepError(ValueError):
    """A sweep that cannot start (bad space, metric, storage) or cannot go on."""


@contextlib.contextmanager
def experimental_ok():
    """Optuna 5 calls heartbeats, retries and its matplotlib plots experimental: they are what a
    sweep is built on, so their warnings would say nothing new at every trial."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        yield
