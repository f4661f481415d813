"""The study's report: a table of trials, the best trial's command, PNG plots."""

from __future__ import annotations

import datetime
import os

import optuna

from segjax import logs
from segjax.sweep import experimental_ok
from segjax.sweep.space import override_text
from segjax.sweep.study import count_states


def _duration(trial) -> str:
    if trial.datetime_start is None:
        return ''
    end = trial.datetime_complete or datetime.datetime.now()
    return logs.format_seconds((end - trial.datetime_start).total_seconds())


def _note(trial) -> str:
    parts = []
    with experimental_ok():
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    if retried is not None:
        parts.append(f'retry of #{retried}')
    if trial.user_attrs.get('baseline'):
        parts.append("the config's own values")
    if trial.state.name == 'PRUNED' and trial.intermediate_values:
        parts.append(f'pruned at step {max(trial.intermediate_values)}')
    if trial.state.name == 'FAIL':
        parts.append(trial.user_attrs.get('error', 'worker stopped (no heartbeat)'))
    return '; '.join(parts).replace('|', '/').replace('\n', ' ')


def trials_table(study, metric: str) -> str:
    """A markdown table: number, state, metric (the last reported for pruned trials), time,
    overrides, notes."""
    rows = ['| trial | state | ' + metric + ' | time | overrides | note |',
            '|---:|---|---:|---:|---|---|']
    for trial in study.get_trials(deepcopy=False):
        if trial.value is not None:
            value = f'{trial.value:.4f}'
        elif trial.intermediate_values:
            value = f'({trial.intermediate_values[max(trial.intermediate_values)]:.4f})'
        else:
            value = ''
        overrides = ' '.join(trial.user_attrs.get('overrides') or [
            override_text(k, v) for k, v in trial.params.items()])
        rows.append(f'| {trial.number} | {trial.state.name} | {value} | {_duration(trial)} | '
                    f'`{overrides}` | {_note(trial)} |')
    return '\n'.join(rows)


def best_trial(study):
    """The best complete trial, or None while there is none."""
    try:
        return study.best_trial
    except ValueError:
        return None


def report_text(study) -> str:
    metric = study.user_attrs.get('metric', 'value')
    counts = count_states(study)
    lines = [f'study {study.study_name}: {study.direction.name.lower()} {metric}; '
             + ', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items())),
             '', trials_table(study, metric), '']
    best = best_trial(study)
    if best is None:
        lines.append('no trial has completed yet')
    else:
        lines += [f'best: trial {best.number}, {metric} {best.value:.4f}; reproduce it with',
                  '', f'    {best.user_attrs.get("command", "(no command recorded)")}']
    return '\n'.join(lines)


def write_plots(study, directory: str) -> dict[str, str]:
    """Optimisation history, parameter importances and parallel coordinates as PNGs in
    `directory`; {name: path, or why it was skipped}."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ('agg', 'pdf', 'svg', 'ps'):
        matplotlib.use('Agg')  # no display needed; plots go to files
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    metric = study.user_attrs.get('metric', 'Objective Value')
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = [k for k in study.best_trial.params if len({t.params.get(k) for t in complete}) > 1
              ] if complete else []
    needs = {'optimization_history': (1, 'no complete trial'),
             'param_importances': (2, 'fewer than 2 complete trials with different values'),
             'parallel_coordinate': (1, 'no complete trial')}
    functions = {'optimization_history': plots.plot_optimization_history,
                 'param_importances': plots.plot_param_importances,
                 'parallel_coordinate': plots.plot_parallel_coordinate}
    written = {}
    os.makedirs(directory, exist_ok=True)
    for name, plot in functions.items():
        minimum, why = needs[name]
        if len(complete) < minimum or (name == 'param_importances' and not varied):
            written[name] = f'skipped: {why}'
            continue
        with experimental_ok():
            axes = plot(study, target_name=metric)
        figure = axes.figure if hasattr(axes, 'figure') else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        path = os.path.join(directory, f'{name}.png')
        tmp = path + f'.{os.getpid()}.tmp.png'  # workers finishing together never mix files
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        plt.close(figure)
        written[name] = path
    return written


def report(study, directory: str | None) -> str:
    """report_text, also written to directory/report.md with the plots beside it."""
    text = report_text(study)
    if directory:
        os.makedirs(directory, exist_ok=True)
        plots = write_plots(study, directory)
        with open(os.path.join(directory, 'report.md'), 'w') as f:
            f.write(text + '\n')
        text += '\n\n' + '\n'.join(f'{name}: {path}' for name, path in plots.items())
        text += f'\nreport: {os.path.join(directory, "report.md")}'
    return text
