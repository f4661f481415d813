"""Search space items `KEY=SPEC`, parsed with ast (never eval) into Optuna distributions and
checked against the experiment's config like any `--config.KEY=value` override.

SPEC is one of
    uniform(low, high[, step])  loguniform(low, high)  int(low, high[, step])  logint(low, high)
    choice(v1, v2, ...)         (Python literals: numbers, strings, True/False/None, tuples)
An experiment file may define `get_search_space()` returning {KEY: SPEC}; `--space` items add to
it and replace its items of the same KEY.
"""

from __future__ import annotations

import ast
import copy
import math
from collections.abc import Mapping, Sequence

import ml_collections
from optuna import distributions as d

from segjax import config as config_lib
from segjax.sweep import SweepError


def parse_space_item(item: str):
    """('a.b', distribution) from 'a.b=loguniform(1e-4, 1e-2)' (see the module docstring)."""
    if '=' not in item:
        raise SweepError(f'search space item {item!r} must look like KEY=SPEC, e.g. '
                         "'optimizer.lr=loguniform(1e-4,1e-2)'")
    key, spec = (part.strip() for part in item.split('=', 1))
    where = f'search space item {item!r}'
    try:
        call = ast.parse(spec, mode='eval').body
    except SyntaxError:
        raise SweepError(f'{where}: {spec!r} is not a valid SPEC, e.g. uniform(0, 1)') from None
    if (not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name)
            or call.keywords):
        raise SweepError(f'{where}: expected uniform(low, high[, step]), loguniform(low, high), '
                         'int(low, high[, step]), logint(low, high) or choice(v1, v2, ...)')
    try:
        args = [ast.literal_eval(node) for node in call.args]
    except ValueError:
        raise SweepError(f'{where}: the arguments must be literals (numbers, strings, tuples, '
                         'True/False/None)') from None
    name = call.func.id
    try:
        match name:
            case 'uniform' | 'loguniform' | 'int' | 'logint':
                return key, _numeric_distribution(name, args, where)
            case 'choice':
                if not args:
                    raise SweepError(f'{where}: choice() needs at least one value')
                return key, d.CategoricalDistribution([_categorical_value(v) for v in args])
    except ValueError as e:  # Optuna's checks: low <= high, low > 0 on a log scale, ...
        if isinstance(e, SweepError):
            raise
        raise SweepError(f'{where}: {e}') from None
    raise SweepError(f'{where}: unknown distribution {name!r}; expected uniform, loguniform, int, '
                     'logint or choice')


def _numeric_distribution(name: str, args: list, where: str):
    is_int = name in ('int', 'logint')
    log = name.startswith('log')
    most = 2 if log else 3
    if not 2 <= len(args) <= most:
        raise SweepError(f'{where}: {name}() takes low, high{"" if log else "[, step]"}; got '
                         f'{len(args)} argument(s)')
    kind = int if is_int else int | float
    if any(isinstance(a, bool) or not isinstance(a, kind) for a in args):
        raise SweepError(f'{where}: {name}() takes {"integers" if is_int else "numbers"}, got '
                         f'{args}')
    if not all(math.isfinite(a) for a in args):
        raise SweepError(f'{where}: {name}() bounds must be finite, got {args}')
    low, high, *step = args
    if low > high:
        raise SweepError(f'{where}: low {low} is above high {high}')
    if is_int:
        return d.IntDistribution(low, high, log=log, step=step[0] if step else 1)
    return d.FloatDistribution(float(low), float(high), log=log,
                               step=float(step[0]) if step else None)


def _categorical_value(value):
    """Optuna stores None, bool, int, float and str; a tuple is kept as its literal text, which
    an override parses back to the tuple."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def override_text(key: str, value) -> str:
    """The `key=value` override (as after `--config.`) that sets `key` to a sampled value."""
    return f'{key}={value if isinstance(value, str) else repr(value)}'


def experiment_space(path: str) -> dict[str, str]:
    """The experiment file's get_search_space() ({KEY: SPEC}), or {} when it defines none."""
    module = config_lib._import_experiment(path)  # the same import path as config.load
    if not hasattr(module, 'get_search_space'):
        return {}
    space = module.get_search_space()
    if not isinstance(space, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in space.items()):
        raise SweepError(f'{path}: get_search_space() must return a dict of KEY -> SPEC '
                         "strings, e.g. {'optimizer.lr': 'loguniform(1e-4, 1e-2)'}; got "
                         f'{space!r}')
    return dict(space)


def merged_space(file_space: Mapping[str, str] | None, items: Sequence[str]) -> dict[str, str]:
    """{key: spec}: the experiment file's get_search_space(), then --space items over it."""
    space = dict(file_space or {})
    for item in items:
        if '=' not in item:
            parse_space_item(item)  # raises the clear error
        key, spec = (part.strip() for part in item.split('=', 1))
        space[key] = spec
    return space


def parse_space(space: Mapping[str, str]) -> dict:
    """{key: Optuna distribution}; raises SweepError naming the first malformed item."""
    if not space:
        raise SweepError('the search space is empty: give --space KEY=SPEC (e.g. '
                         "--space 'optimizer.lr=loguniform(1e-4,1e-2)') or define "
                         'get_search_space() in the experiment file')
    return dict(parse_space_item(f'{key}={spec}') for key, spec in space.items())


def check_space(config: ml_collections.ConfigDict, distributions: Mapping, fixed: Sequence[str],
                source: str) -> None:
    """Raises SweepError unless every key is a config key that takes every value its
    distribution can give (bounds and choices applied as overrides, then validated)."""
    fixed_keys = {item.split('=', 1)[0] for item in fixed}
    for key, dist in distributions.items():
        if key in fixed_keys:
            raise SweepError(f'config key {key!r} is both searched (--space) and fixed '
                             f'(--config.{key}=...): drop one')
        for value in _representative_values(dist):
            trial_config = copy.deepcopy(config)
            try:
                config_lib.apply_override(trial_config, override_text(key, value))
                config_lib.validate(trial_config, source=source)
            except config_lib.ConfigError as e:
                raise SweepError(f'search space item {key!r} (value {value!r}): {e}') from None


def _representative_values(dist) -> list:
    if isinstance(dist, d.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def suggest(trial, key: str, dist):
    """The trial's value for `key` from `dist`, through Optuna's public suggest API."""
    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def grid_of(distributions: Mapping) -> dict[str, list]:
    """GridSampler's search space: every item must be a choice(...)."""
    grid = {}
    for key, dist in distributions.items():
        if not isinstance(dist, d.CategoricalDistribution):
            raise SweepError(f'--sampler grid: search space item {key!r} is not a choice(...); '
                             'a grid needs every item to list its values')
        grid[key] = list(dist.choices)
    return grid


def baseline_params(config: ml_collections.ConfigDict, distributions: Mapping) -> dict:
    """The config's own value of every searched key, checked to lie in its distribution."""
    params = {}
    for key, dist in distributions.items():
        node = config
        for part in key.split('.'):
            node = node[part] if part in node else None
        value = _categorical_value(node) if isinstance(dist, d.CategoricalDistribution) else node
        inside = (value in dist.choices if isinstance(dist, d.CategoricalDistribution)
                  else isinstance(value, int | float) and not isinstance(value, bool)
                  and dist.low <= value <= dist.high)
        if not inside:
            raise SweepError(f'--baseline: config.{key}={node!r} is not in the search space item '
                             f'{key!r} ({dist}); widen the item or drop --baseline')
        params[key] = value
    return params
