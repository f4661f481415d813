"""The objective: one segjax.train run per trial in WORKDIR/trials/<number>, every evaluation
reported to Optuna so that a pruner can stop it; the command that reproduces a trial."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import optuna

from segjax import config as config_lib
from segjax import experiment
from segjax import train as train_lib
from segjax.sweep import SweepError
from segjax.sweep.space import override_text, suggest


def metric_names(config: ml_collections.ConfigDict) -> list[str]:
    """The scalars every evaluation writes, any of which can be the objective."""
    prefixes = ['val'] + (['val_ema'] if config.ema_decay else [])
    names = [f'{p}/{k}' for p in prefixes for k in train_lib.EVAL_SCALARS]
    for p in prefixes:
        names += [f'{p}/{kind}/{c}' for kind in ('iou', 'boundary_iou')
                  for c in experiment.class_names(config)]
    return names


def check_metric(config: ml_collections.ConfigDict, metric: str) -> None:
    names = metric_names(config)
    if metric not in names:
        shown = [n for n in names if n.count('/') == 1]
        raise SweepError(f'--metric {metric!r} is not a scalar training evaluates; expected one '
                         f'of {shown} or a class\'s val/iou/<class name>')


class PruningReporter:
    """A summary writer (segjax.summary.Writer) that reports `metric` to the trial at every
    evaluation and stops the run with optuna.TrialPruned when the pruner says so, except at
    `last_step`: a run that trained to the end is a complete trial, whatever its value."""

    def __init__(self, trial, metric: str, last_step: int | None = None):
        self.trial, self.metric, self.last_step = trial, metric, last_step
        self.last = None  # (step, value) of the latest evaluation

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.metric not in values:
            return
        value = float(values[self.metric])
        self.last = (step, value)
        self.trial.report(value, step)
        if step != self.last_step and self.trial.should_prune():
            raise optuna.TrialPruned(f'pruned at step {step}: {self.metric} {value:.4f}')

    def images(self, step: int, name: str, images) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def train_command(config_path: str, workdir: str, overrides: Sequence[str]) -> str:
    """The segjax.train command line that runs exactly this configuration."""
    args = ['python', '-m', 'segjax.train', '--config', config_path, '--workdir', workdir]
    return shlex.join(args + [f'--config.{item}' for item in overrides])


def tag_wandb(config: ml_collections.ConfigDict, study_name: str, number: int) -> None:
    """Groups a study's trials in W&B, when the experiment logs there (config.wandb.project)."""
    if config.wandb.project:
        config.wandb.group = study_name
        config.wandb.tags = (*config.wandb.tags, f'study:{study_name}', f'trial:{number}')


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a trial's training (it saved a checkpoint and returned)."""


def make_objective(config_path: str, fixed: Sequence[str], distributions: Mapping,
                   workdir: str, metric: str, study_name: str,
                   train_fn: Callable | None = None) -> Callable:
    """objective(trial) -> the trial's last `metric`, training in workdir/trials/<number>."""

    def objective(trial) -> float:
        run = train_fn or train_lib.train
        searched = [override_text(k, suggest(trial, k, dist)) for k, dist in distributions.items()]
        overrides = [*fixed, *searched]
        trial_dir = os.path.join(workdir, 'trials', str(trial.number))
        command = train_command(config_path, trial_dir, overrides)
        trial.set_user_attr('overrides', searched)
        trial.set_user_attr('command', command)
        trial.set_user_attr('worker', f'{os.uname().nodename}:{os.getpid()}')
        print(f'trial {trial.number}: {" ".join(searched)}  ({trial_dir})', flush=True)
        try:
            if os.path.exists(os.path.join(trial_dir, 'checkpoints')):
                raise SweepError(f'{trial_dir} already holds a run: another study used workdir '
                                 f'{workdir}; give each study its own --workdir')
            config = config_lib.load(config_path, overrides)
            reporter = PruningReporter(trial, metric, last_step=config.num_steps)
            tag_wandb(config, study_name, trial.number)
            os.makedirs(trial_dir, exist_ok=True)
            result = run(config, trial_dir, extra_writers=[reporter])
            if result and reporter.last is None:
                raise SweepError(f'training never reported {metric!r}')
        except optuna.TrialPruned as e:
            trial.set_user_attr('note', str(e))
            print(f'trial {trial.number}: {e}', flush=True)
            raise
        except Exception as e:
            trial.set_user_attr('error', f'{type(e).__name__}: {e}'[:2000])
            raise
        if not result:  # train() returns {} when Ctrl-C / SIGTERM stopped it
            trial.set_user_attr('error', 'interrupted (Ctrl-C or SIGTERM)')
            raise Interrupted
        return reporter.last[1]

    return objective
