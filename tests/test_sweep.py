"""segjax.sweep: the search space syntax and its checks against the config, the objective and the
workers' loop on an in-memory study (with a stand-in for training), the report; and (slow) a real
6-trial study run by two worker processes on one SQLite file, one of them killed mid-trial."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna import distributions as d
from optuna.trial import TrialState, create_trial
from test_end_to_end import EXPERIMENT, ROOT, tiny_overrides

from segjax import config as config_lib
from segjax import sweep
from segjax.data import prepare, synthetic
from segjax.sweep import cli
from segjax.sweep import report as reports
from segjax.sweep import space as search_space
from segjax.sweep import study as studies
from segjax.sweep import trials as objectives
from segjax.train import NonFiniteError

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope='module')
def config():
    return config_lib.load(os.path.join(ROOT, EXPERIMENT))


# --- search space -----------------------------------------------------------------------------


def test_space_items_become_optuna_distributions():
    assert search_space.parse_space_item('optimizer.lr=loguniform(1e-4, 1e-2)') == (
        'optimizer.lr', d.FloatDistribution(1e-4, 1e-2, log=True))
    assert search_space.parse_space_item('loss.terms.dice.weight = uniform(0, 1)') == (
        'loss.terms.dice.weight', d.FloatDistribution(0.0, 1.0))
    assert search_space.parse_space_item('x=uniform(0, 1, 0.25)')[1] == d.FloatDistribution(
        0.0, 1.0, step=0.25)
    assert search_space.parse_space_item('model.depth=int(2, 5)')[1] == d.IntDistribution(2, 5)
    assert search_space.parse_space_item('num_steps=int(100, 500, 100)')[1] == d.IntDistribution(
        100, 500, step=100)
    assert search_space.parse_space_item('batch_size=logint(8, 64)')[1] == d.IntDistribution(
        8, 64, log=True)
    # Tuples are kept as their literal text, which the override parses back to the tuple.
    key, dist = search_space.parse_space_item("data.crop_size=choice((32, 32), (64, 64))")
    assert dist.choices == ('(32, 32)', '(64, 64)')
    assert search_space.parse_space_item("dtype=choice('float32', 'bfloat16')")[1].choices == (
        'float32', 'bfloat16')
    assert search_space.parse_space_item('data.flip=choice(True, False, None)')[1].choices == (
        True, False, None)


@pytest.mark.parametrize('item, message', [
    ('optimizer.lr', 'must look like KEY=SPEC'),
    ('optimizer.lr=loguniform(1e-4', 'not a valid SPEC'),
    ('optimizer.lr=loguniform(1e-4)', 'loguniform() takes low, high; got 1 argument'),
    ('optimizer.lr=loguniform(1e-4, 1e-2, 1e-3)', 'takes low, high; got 3'),
    ('optimizer.lr=normal(0, 1)', "unknown distribution 'normal'"),
    ('optimizer.lr=uniform(1, 0)', 'low 1 is above high 0'),
    ('optimizer.lr=loguniform(0, 1)', 'low'),  # Optuna's: a log scale needs low > 0
    ('optimizer.lr=uniform(a, b)', 'must be literals'),
    ("optimizer.lr=uniform('0', 1)", 'takes numbers'),
    ('model.depth=int(2, 5.5)', 'takes integers'),
    ('optimizer.lr=os.system("true")', 'expected uniform(low, high[, step])'),
    ('optimizer.lr=uniform(low=0, high=1)', 'expected uniform(low, high[, step])'),
    ('optimizer.lr=choice()', 'at least one value'),
    ("optimizer.lr=uniform(0, float('inf'))", 'must be literals'),
])
def test_malformed_space_items_are_clear_errors(item, message):
    with pytest.raises(sweep.SweepError, match='search space item') as error:
        search_space.parse_space_item(item)
    assert message in str(error.value)


def test_command_line_space_items_replace_the_files():
    space = search_space.merged_space({'optimizer.lr': 'uniform(0, 1)', 'model.depth': 'int(2, 4)'},
                                      ['optimizer.lr=loguniform(1e-4,1e-2)', 'seed=int(0, 3)'])
    assert space == {'optimizer.lr': 'loguniform(1e-4,1e-2)', 'model.depth': 'int(2, 4)',
                     'seed': 'int(0, 3)'}
    with pytest.raises(sweep.SweepError, match='search space is empty'):
        search_space.parse_space({})


def test_an_experiment_file_can_define_its_search_space(tmp_path):
    path = tmp_path / 'tuned.py'
    path.write_text('from experiments.unet_synthetic import get_config  # noqa: F401\n\n\n'
                    'def get_search_space():\n'
                    "    return {'optimizer.lr': 'loguniform(1e-4, 1e-2)'}\n")
    assert search_space.experiment_space(str(path)) == {'optimizer.lr': 'loguniform(1e-4, 1e-2)'}
    assert search_space.experiment_space(os.path.join(ROOT, EXPERIMENT)) == {}
    path.write_text('def get_search_space():\n    return {"optimizer.lr": 0.1}\n')
    with pytest.raises(sweep.SweepError, match='must return a dict of KEY -> SPEC strings'):
        search_space.experiment_space(str(path))


def test_space_keys_are_checked_like_overrides(config):
    good = search_space.parse_space({'optimizer.lr': 'loguniform(1e-4,1e-2)',
                                     'model.depth': 'int(2, 3)', 'data.flip': 'choice(True, False)',
                                     'data.crop_size': 'choice((32, 32), (48, 48))'})
    search_space.check_space(config, good, [], 'x.py')
    for space, message in [
            ({'data.flipp': 'choice(True, False)'}, "unknown config key 'data.flipp'"),
            ({'optimizer.lrr': 'uniform(0, 1)'},
             "adamw takes no option 'lrr' (did you mean 'lr'?)"),
            ({'model.widht': 'int(2, 8)'}, "UNet takes no option 'widht'"),
            ({'num_steps': 'uniform(10, 20)'}, "'num_steps': expected a int"),
            ({'data.flip': 'choice(True, 3)'}, 'expected True or False'),
            ({'eval.mode': "choice('whole', 'tiles')"}, "config.eval.mode='tiles'")]:
        with pytest.raises(sweep.SweepError, match='search space item') as error:
            search_space.check_space(config, search_space.parse_space(space), [], 'x.py')
        assert message in str(error.value)
    with pytest.raises(sweep.SweepError, match='both searched'):
        search_space.check_space(config, good, ['optimizer.lr=0.1'], 'x.py')


def test_metric_must_be_an_evaluation_scalar(config):
    objectives.check_metric(config, 'val/miou')
    objectives.check_metric(config, 'val/iou/circle')
    with pytest.raises(sweep.SweepError, match="'val/mIoU' is not a scalar"):
        objectives.check_metric(config, 'val/mIoU')
    with pytest.raises(sweep.SweepError, match='val/pixel_accuracy'):
        objectives.check_metric(config, 'val_ema/miou')  # no EMA in this config


def test_baseline_is_the_configs_own_values(config):
    space = search_space.parse_space({'optimizer.lr': 'loguniform(1e-4,1e-2)',
                                      'model.depth': 'choice(2, 4)'})
    assert search_space.baseline_params(config, space) == {'optimizer.lr': 3e-3, 'model.depth': 4}
    with pytest.raises(sweep.SweepError, match=r'config.optimizer.lr=0.003 is not in'):
        search_space.baseline_params(
                   config, search_space.parse_space({'optimizer.lr': 'uniform(0.1, 1)'}))


def test_grid_needs_choices():
    space = search_space.parse_space({'a': 'choice(1, 2)', 'b': "choice('x', 'y', 'z')"})
    assert search_space.grid_of(space) == {'a': [1, 2], 'b': ['x', 'y', 'z']}
    with pytest.raises(sweep.SweepError, match="'c' is not a choice"):
        search_space.grid_of(search_space.parse_space({'c': 'uniform(0, 1)'}))


def test_train_command_round_trips_through_a_shell():
    overrides = ['data.crop_size=(32, 32)', "dtype=bfloat16", 'optimizer.lr=0.001']
    command = objectives.train_command('experiments/x.py', 'runs/s/trials/3', overrides)
    assert shlex.split(command) == [
        'python', '-m', 'segjax.train', '--config', 'experiments/x.py', '--workdir',
        'runs/s/trials/3', '--config.data.crop_size=(32, 32)', '--config.dtype=bfloat16',
        '--config.optimizer.lr=0.001']


def test_sampled_values_become_overrides_the_config_parses(config):
    space = search_space.parse_space({'data.crop_size': 'choice((32, 32), (48, 48))',
                                      'dtype': "choice('bfloat16',)",
                                      'optimizer.lr': 'uniform(0, 1)'})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    overrides = [search_space.override_text(k, search_space.suggest(trial, k, dist))
                 for k, dist in space.items()]
    loaded = config_lib.load(os.path.join(ROOT, EXPERIMENT), overrides)
    assert loaded.data.crop_size in ((32, 32), (48, 48)) and loaded.dtype == 'bfloat16'
    assert loaded.optimizer.lr == trial.params['optimizer.lr']


# --- storage ----------------------------------------------------------------------------------


@pytest.mark.parametrize('url, message', [
    ('sqlite:////nonexistent-dir/sub/study.db', 'cannot open the study database'),
    ('not a url', 'is not a database URL'),
])
def test_unusable_storage_is_a_clear_error(url, message):
    with pytest.raises(sweep.SweepError, match=message):
        studies.open_storage(url)


def test_unreachable_server_is_a_clear_error_without_its_password():
    # A refused port: a clear error whether or not a PostgreSQL driver is installed here.
    with pytest.raises(sweep.SweepError) as error:
        studies.open_storage('postgresql://user:secret@127.0.0.1:1/db')
    text = str(error.value)
    assert 'postgresql://user:***@127.0.0.1:1/db' in text and 'secret' not in text
    assert 'driver is not installed' in text or 'cannot open the study database' in text


def test_resuming_checks_the_study_searches_the_same_thing(tmp_path):
    storage = studies.open_storage(f'sqlite:///{tmp_path}/s.db', heartbeat_seconds=5)
    attrs = {'space': {'optimizer.lr': 'uniform(0, 1)'}, 'metric': 'val/miou'}
    make = dict(direction='maximize', sampler=None, pruner=None)
    first = studies.create_or_resume(storage, 's', attrs=attrs, **make)
    again = studies.create_or_resume(storage, 's', attrs=attrs, **make)
    assert first._study_id == again._study_id
    with pytest.raises(sweep.SweepError, match="created with space"):
        studies.create_or_resume(storage, 's', attrs={**attrs, 'space': {'seed': 'int(0, 1)'}},
                                 **make)
    with pytest.raises(sweep.SweepError, match='created to maximize'):
        studies.create_or_resume(storage, 's', attrs=attrs, **{**make, 'direction': 'minimize'})
    with pytest.raises(sweep.SweepError, match=r"no study named 't'.*\['s'\]"):
        studies.load_study(storage, 't')


# --- the objective and the workers' loop (training replaced by a stand-in) --------------------


def fake_train(scores, failing=()):
    """A stand-in for segjax.train.train: reports scores[i] at steps 10, 20 and returns."""

    def train(config, workdir, extra_writers=()):
        number = int(os.path.basename(workdir))
        assert os.path.isdir(workdir)
        if number in failing:
            raise NonFiniteError('10 consecutive steps had a non-finite loss')
        for step in (10, 20):
            for writer in extra_writers:
                writer.scalars(step, {'val/miou': scores[number] * step / 20, 'val/fwiou': 0.5})
        return {'miou': scores[number]}

    return train


def test_objective_runs_each_trial_in_its_directory_and_failures_do_not_stop_the_study(tmp_path):
    scores = [0.3, 0.6, 0.5, 0.4]
    space = search_space.parse_space({'optimizer.lr': 'loguniform(1e-4,1e-2)'})
    objective = objectives.make_objective(os.path.join(ROOT, EXPERIMENT), ['num_steps=20'], space,
                                          str(tmp_path), 'val/miou', 'demo',
                                          train_fn=fake_train(scores, failing={1}))
    study = optuna.create_study(direction='maximize', pruner=optuna.pruners.NopPruner())
    studies.run_worker(study, objective, trials=3, max_failed=3, poll_seconds=0.1)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                      TrialState.COMPLETE]
    assert 'NonFiniteError: 10 consecutive steps' in study.trials[1].user_attrs['error']
    assert [t.value for t in study.trials] == [0.3, None, 0.5, 0.4]
    assert study.trials[2].intermediate_values == {10: 0.25, 20: 0.5}
    best = study.best_trial
    assert best.number == 2
    lr = best.params['optimizer.lr']
    assert best.user_attrs['overrides'] == [f'optimizer.lr={lr!r}']
    assert shlex.split(best.user_attrs['command'])[6:] == [
        str(tmp_path / 'trials' / '2'), '--config.num_steps=20', f'--config.optimizer.lr={lr!r}']
    assert sorted(os.listdir(tmp_path / 'trials')) == ['0', '1', '2', '3']
    # A study with only failures stops instead of sampling forever.
    failing = objectives.make_objective(os.path.join(ROOT, EXPERIMENT), [], space,
                                        str(tmp_path / 'f'), 'val/miou', 'demo',
                                        train_fn=fake_train([0, 0], {0, 1}))
    with pytest.raises(sweep.SweepError, match=r'2 trials failed \(--max_failed 2\)'):
        studies.run_worker(optuna.create_study(), failing, trials=5, max_failed=2,
                           poll_seconds=0.1)


def test_trials_are_grouped_in_wandb_only_when_it_is_on():
    off = config_lib.load(os.path.join(ROOT, EXPERIMENT))
    objectives.tag_wandb(off, 'lr', 3)
    assert off.wandb.group is None and tuple(off.wandb.tags) == ()
    on = config_lib.load(os.path.join(ROOT, EXPERIMENT),
                         ['wandb.project=segjax', "wandb.tags=('mine',)"])
    objectives.tag_wandb(on, 'lr', 3)
    assert on.wandb.group == 'lr'
    assert tuple(on.wandb.tags) == ('mine', 'study:lr', 'trial:3')
    config_lib.validate(on)


def test_the_pruner_stops_a_trial_below_the_median():
    study = optuna.create_study(direction='maximize',
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for value in (0.5, 0.7):  # two finished trials: the median at step 10 is 0.6
        study.add_trial(create_trial(value=value, intermediate_values={10: value},
                                     params={}, distributions={}))
    trial = study.ask()
    reporter = objectives.PruningReporter(trial, 'val/miou')
    reporter.scalars(5, {'train/loss': 1.0})  # not the metric: ignored
    assert reporter.last is None
    with pytest.raises(optuna.TrialPruned, match='pruned at step 10: val/miou 0.4000'):
        reporter.scalars(10, {'val/miou': 0.4, 'val/fwiou': 0.9})
    assert reporter.last == (10, 0.4)
    good = objectives.PruningReporter(study.ask(), 'val/miou')
    good.scalars(10, {'val/miou': 0.65})  # above the median: goes on
    assert good.last == (10, 0.65)
    # --pruner_warmup_steps 20: the same low value at step 10 is not judged.
    study.pruner = studies.make_pruner('median', startup_trials=2, first_eval=10, num_steps=30,
                                       warmup_steps=20)
    objectives.PruningReporter(study.ask(), 'val/miou').scalars(10, {'val/miou': 0.4})
    # The last step's evaluation is never pruned: the run trained to the end.
    study.pruner = studies.make_pruner('median', startup_trials=2, first_eval=10, num_steps=30,
                                       warmup_steps=0)
    last = objectives.PruningReporter(study.ask(), 'val/miou', last_step=10)
    last.scalars(10, {'val/miou': 0.4})
    assert last.last == (10, 0.4)


def test_interrupted_trials_are_queued_again_once():
    study = optuna.create_study()
    dist = {'x': d.FloatDistribution(0, 1)}
    study.add_trial(create_trial(state=TrialState.FAIL, params={'x': 0.25}, distributions=dist,
                                 user_attrs={'error': 'interrupted (Ctrl-C or SIGTERM)'}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={'x': 0.5}, distributions=dist,
                                 user_attrs={'error': 'ValueError: bad'}))
    studies.retry_interrupted(study, retries=1)
    studies.retry_interrupted(study, retries=1)  # already queued: not twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == {'x': 0.25}
    never = optuna.create_study()
    never.add_trial(create_trial(state=TrialState.FAIL, params={'x': 0.75}, distributions=dist,
                                 user_attrs={'error': 'interrupted (Ctrl-C or SIGTERM)'}))
    studies.retry_interrupted(never, retries=0)
    assert not never.get_trials(states=(TrialState.WAITING,))


# --- report -----------------------------------------------------------------------------------


def in_memory_study():
    study = optuna.create_study(study_name='demo', direction='maximize')
    study.set_user_attr('metric', 'val/miou')
    dist = {'optimizer.lr': d.FloatDistribution(1e-4, 1e-2, log=True),
            'model.depth': d.IntDistribution(2, 4)}
    rows = [(TrialState.COMPLETE, 0.61, 1e-3, 2), (TrialState.COMPLETE, 0.72, 3e-3, 3),
            (TrialState.PRUNED, None, 1e-4, 4), (TrialState.FAIL, None, 5e-3, 2),
            (TrialState.COMPLETE, 0.55, 8e-3, 4)]
    for number, (state, value, lr, depth) in enumerate(rows):
        params = {'optimizer.lr': lr, 'model.depth': depth}
        attrs = {'overrides': [f'optimizer.lr={lr!r}', f'model.depth={depth}'],
                 'command': f'python -m segjax.train --workdir w/trials/{number}'}
        if state == TrialState.FAIL:
            attrs['error'] = 'NonFiniteError: 10 consecutive | steps'
        study.add_trial(create_trial(state=state, value=value, params=params, distributions=dist,
                                     user_attrs=attrs,
                                     intermediate_values={50: 0.2} if state.name == 'PRUNED'
                                     else {}))
    return study


def test_report_table_best_command_and_plots(tmp_path):
    study = in_memory_study()
    table = reports.trials_table(study, 'val/miou').splitlines()
    assert table[0] == '| trial | state | val/miou | time | overrides | note |'
    assert len(table) == 2 + 5
    assert table[3].startswith('| 1 | COMPLETE | 0.7200 | ')
    assert '`optimizer.lr=0.003 model.depth=3`' in table[3]
    assert table[4].startswith('| 2 | PRUNED | (0.2000) |') and 'pruned at step 50' in table[4]
    # A '|' in an error would break the markdown row.
    assert table[5].endswith('| NonFiniteError: 10 consecutive / steps |')
    text = reports.report(study, str(tmp_path))
    assert 'study demo: maximize val/miou; 3 complete, 1 fail, 1 pruned' in text
    assert 'best: trial 1, val/miou 0.7200' in text
    assert '    python -m segjax.train --workdir w/trials/1' in text
    for name in ('optimization_history', 'param_importances', 'parallel_coordinate'):
        with open(tmp_path / f'{name}.png', 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'report.md').read_text().startswith('study demo')


def test_report_of_a_study_without_complete_trials(tmp_path):
    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}))
    text = reports.report(study, str(tmp_path))
    assert 'no trial has completed yet' in text
    assert 'worker stopped (no heartbeat)' in text
    assert 'optimization_history: skipped: no complete trial' in text
    assert not list(tmp_path.glob('*.png'))


# --- command line -----------------------------------------------------------------------------


def run_sweep(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_bad_input_fails_before_any_trial_or_database(tmp_path, capsys):
    base = ['--config', os.path.join(ROOT, EXPERIMENT), '--workdir', str(tmp_path / 'w'),
            '--study', 's', '--trials', '2']
    code, err = run_sweep([*base, '--space', 'optimizer.lrr=loguniform(1e-4,1e-2)'], capsys)
    assert code == 2
    assert "segjax.sweep: error: search space item 'optimizer.lrr'" in err
    assert "adamw takes no option 'lrr' (did you mean 'lr'?)" in err
    code, err = run_sweep([*base, '--space', 'optimizer.lr=loguniform(1e-2)'], capsys)
    assert code == 2 and 'loguniform() takes low, high; got 1 argument' in err
    code, err = run_sweep([*base, '--space', 'optimizer.lr=uniform(0,1)', '--metric', 'miou'],
                          capsys)
    assert code == 2 and "--metric 'miou' is not a scalar" in err
    code, err = run_sweep([*base, '--space', 'optimizer.lr=uniform(0,1)',
                           '--config.num_stepz=3'], capsys)
    assert code == 2 and "unknown config key 'num_stepz'" in err
    assert not (tmp_path / 'w').exists()  # no storage, no trial directory
    code, err = run_sweep([*base, '--space', 'optimizer.lr=uniform(0,1)', '--storage',
                           'postgresql://u:pw@127.0.0.1:1/db'], capsys)
    assert code == 2 and 'postgresql://u:***@127.0.0.1:1/db' in err
    code, err = run_sweep(['--study', 'nope', '--storage', f'sqlite:///{tmp_path}/r.db',
                           '--report'], capsys)
    assert code == 2 and "no study named 'nope'" in err


# --- the real thing: two workers, one killed -------------------------------------------------


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f'timed out after {timeout}s waiting for {what}')


@pytest.mark.slow  # two worker processes, 7 short trainings, a reproduction: `pytest -m slow`
@pytest.mark.long
def test_two_workers_one_killed_complete_the_study(tmp_path, e2e_data):
    # Prepared first, as for runs on several machines (docs/data.md): this test is about trials.
    prepare.prepared(lambda: synthetic.SyntheticShapes(data_dir=e2e_data, config='smoke'))
    workdir = tmp_path / 'study'
    storage = f'sqlite:///{tmp_path}/study.db'
    args = [sys.executable, '-m', 'segjax.sweep', '--config', EXPERIMENT, '--workdir', workdir,
            '--study', 'smoke', '--storage', storage, '--trials', '6', '--startup_trials', '2',
            '--heartbeat_seconds', '1', '--retries', '1',
            '--space', 'optimizer.lr=loguniform(1e-3,3e-2)',
            '--space', 'optimizer.weight_decay=loguniform(1e-6,1e-3)',
            *tiny_overrides(e2e_data, num_steps=6, eval_every=2, checkpoint_every=100,
                            num_summary_images=0, **{'schedule.warmup_steps': 1})]
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    logs = [open(tmp_path / f'worker{i}.log', 'w') for i in range(2)]
    workers = [subprocess.Popen(list(map(str, args)), cwd=ROOT, env=env, stdout=logs[i],
                                stderr=subprocess.STDOUT) for i in range(2)]
    try:
        storage_for_test = optuna.storages.RDBStorage(storage)
        victim = workers[0].pid

        def victims_running_trial():
            try:
                study = optuna.load_study(study_name='smoke', storage=storage_for_test)
            except KeyError:
                return None
            for trial in study.get_trials(states=(TrialState.RUNNING,)):
                if trial.user_attrs.get('worker', '').endswith(f':{victim}'):
                    return trial.number
            return None

        killed = wait_for(victims_running_trial, 300, "worker 0's first trial")
        time.sleep(2)  # inside its training (data, compilation or steps)
        os.kill(victim, signal.SIGKILL)
        workers[0].wait(timeout=30)
        assert workers[1].wait(timeout=900) == 0, (tmp_path / 'worker1.log').read_text()[-4000:]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        for log in logs:
            log.close()
    output = (tmp_path / 'worker1.log').read_text()

    study = optuna.load_study(study_name='smoke', storage=storage_for_test)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[killed].state == TrialState.FAIL
    assert 'error' not in trials[killed].user_attrs  # it died; its heartbeat told
    with sweep.experimental_ok():
        retries = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback
                   .retried_trial_number(t) == killed]
    assert len(retries) == 1 and retries[0].params == trials[killed].params
    # Each trial trained in its own directory.
    assert {int(n) for n in os.listdir(workdir / 'trials')} == set(numbers)

    assert 'best: trial' in output and (workdir / 'report.md').exists()
    for name in ('optimization_history', 'param_importances', 'parallel_coordinate'):
        assert (workdir / f'{name}.png').stat().st_size > 1000
    # The best trial's command, run again in a fresh directory, reaches the same metric.
    best = study.best_trial
    command = best.user_attrs['command']
    assert f'best: trial {best.number}, val/miou {best.value:.4f}' in output
    assert command in output
    argv = shlex.split(command)
    assert argv[:3] == ['python', '-m', 'segjax.train']
    argv[argv.index('--workdir') + 1] = str(tmp_path / 'again')
    subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    again = json.loads((tmp_path / 'again' / 'metrics.json').read_text())
    assert again['miou'] == pytest.approx(best.value, abs=1e-6)
