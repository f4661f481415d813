"""The study's database (with heartbeats: a killed worker's trial is marked failed and queued
again), samplers and pruners, and the loop each worker runs."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import optuna
import sqlalchemy

from segjax.sweep import SweepError, experimental_ok

# Trial states that count towards --trials: finished, whether by its last step or a pruner.
DONE = ('COMPLETE', 'PRUNED')


def default_storage(workdir: str) -> str:
    return f'sqlite:///{os.path.abspath(os.path.join(workdir, "study.db"))}'


def hidden_password(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show it as given
        return url


def open_storage(url: str, *, heartbeat_seconds: int = 60, retries: int = 1):
    """An Optuna RDBStorage with heartbeats: a trial whose worker stopped beating for
    2 x heartbeat_seconds is marked FAIL and, up to `retries` times, queued again."""
    shown = hidden_password(url)
    try:
        backend = sqlalchemy.engine.make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError:
        raise SweepError(f'--storage {shown!r} is not a database URL; expected e.g. '
                         'sqlite:///runs/sweep/study.db or '
                         'postgresql://user:password@host/database') from None
    # Waits for a busy SQLite file instead of failing; gives up on an unreachable server.
    connect_args = {'sqlite': {'timeout': 60}, 'postgresql': {'connect_timeout': 15},
                    'mysql': {'connect_timeout': 15}}.get(backend, {})
    try:
        with experimental_ok():
            return optuna.storages.RDBStorage(
                url, engine_kwargs={'connect_args': connect_args},
                heartbeat_interval=heartbeat_seconds, grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=retries))
    except ImportError as e:
        cause = e.__cause__ or e
        raise SweepError(f'--storage {shown!r}: its database driver is not installed ({cause}); '
                         "pip install it: 'psycopg[binary]' for postgresql://, psycopg2-binary "
                         'for postgresql+psycopg2://, pymysql for mysql+pymysql://') from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, 'orig', None) or e).strip().splitlines()[0]
        hint = (' (for SQLite, the directory must exist and be writable)'
                if backend == 'sqlite' else ' (is the server running and reachable?)')
        raise SweepError(f'cannot open the study database {shown!r}: {reason}{hint}') from None


def load_study(storage, name: str):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise SweepError(f'no study named {name!r} in {hidden_password(storage.url)}; it holds '
                         f'{names or "none"}') from None


def create_or_resume(storage, name: str, *, direction: str, sampler, pruner,
                     attrs: Mapping[str, object]):
    """The study `name`: created with `attrs` (what it searches), or resumed after checking it
    searches the same thing in the same direction."""
    study = optuna.create_study(storage=storage, study_name=name, direction=direction,
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    stored = study.user_attrs
    if not stored:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return study
    if study.direction.name.lower() != direction:
        raise SweepError(f'study {name!r} was created to {study.direction.name.lower()}; this '
                         f'command asks to {direction}: use a new --study name')
    for key in ('space', 'metric'):
        if stored.get(key) != attrs[key]:
            raise SweepError(f'study {name!r} was created with {key} {stored.get(key)!r}; this '
                             f'command gives {attrs[key]!r}: use a new --study name (or the '
                             'same settings to resume it)')
    return study


def make_sampler(kind: str, *, grid: dict | None, startup_trials: int, seed: int | None):
    """--sampler: TPE (after `startup_trials` random ones), random, or the grid of choices."""
    match kind:
        case 'tpe':
            return optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=seed)
        case 'random':
            return optuna.samplers.RandomSampler(seed=seed)
        case 'grid':
            return optuna.samplers.GridSampler(grid, seed=seed)
    raise SweepError(f'--sampler {kind!r}: expected tpe, random or grid')


def make_pruner(kind: str, *, startup_trials: int, first_eval: int, num_steps: int,
                warmup_steps: int = 0):
    """--pruner, over training steps: median (after `startup_trials` finished trials, from
    step `warmup_steps` on), Hyperband (rungs from the first evaluation to the last step), or
    none."""
    match kind:
        case 'median':
            return optuna.pruners.MedianPruner(n_startup_trials=startup_trials,
                                               n_warmup_steps=warmup_steps)
        case 'hyperband':
            return optuna.pruners.HyperbandPruner(min_resource=first_eval,
                                                  max_resource=num_steps)
        case 'none':
            return optuna.pruners.NopPruner()
    raise SweepError(f'--pruner {kind!r}: expected median, hyperband or none')


def count_states(study) -> dict[str, int]:
    counts = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def run_worker(study, objective: Callable, *, trials: int, max_failed: int,
               poll_seconds: float) -> None:
    """Runs trials until the study holds `trials` finished (complete or pruned) ones.

    While the others' running trials would reach the target, waits for them: a trial of a killed
    worker turns FAIL when its heartbeat goes stale (then it is queued again, if retries are
    left), and this worker takes it up.
    """
    with experimental_ok():
        while True:
            optuna.storages.fail_stale_trials(study)
            counts = count_states(study)
            done = sum(counts.get(s, 0) for s in DONE)
            if done >= trials:
                return
            if counts.get('FAIL', 0) >= max_failed:
                raise SweepError(f'{counts["FAIL"]} trials failed (--max_failed {max_failed}); '
                                 'the report lists their errors')
            if done + counts.get('RUNNING', 0) >= trials:
                time.sleep(poll_seconds)
                continue
            study.optimize(objective, n_trials=1, catch=(Exception,))


def retry_interrupted(study, retries: int) -> None:
    """Queues again (once each, within --retries) the study's trials that Ctrl-C or SIGTERM
    stopped, as heartbeats do for the trials of killed workers."""
    with experimental_ok():
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)
        trials = study.get_trials(deepcopy=False)
        retried = {retry.retried_trial_number(t) for t in trials}
        for trial in trials:
            if (trial.state.name == 'FAIL' and trial.number not in retried
                    and trial.user_attrs.get('error', '').startswith('interrupted')):
                retry(study, trial)
