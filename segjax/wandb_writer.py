"""Weights & Biases as one more summary writer: the run's config, every scalar and image the
train loop writes, online or (without an API key or network) offline for a later `wandb sync`.

`import wandb` happens only when a WandbWriter is built, i.e. when config.wandb.project is set.
Resuming a workdir resumes its W&B run: the run id is kept in <workdir>/wandb_run_id.
"""

from __future__ import annotations

import functools
import os
import secrets
import string
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from segjax import logs
from segjax.config import ConfigError

# The version segjax is tested with (requirements-test.txt, setup.cfg's `wandb` extra).
WANDB_PIN = 'wandb==0.31.0'
RUN_ID_FILE = 'wandb_run_id'
# How long the 'auto' mode waits for the W&B server before choosing offline.
SERVER_TIMEOUT_S = 5.0


def import_wandb():
    """The wandb module, or a ConfigError that says how to install it."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f'config.wandb.project is set but wandb cannot be imported ({e}); '
                          f'install it with `pip install {WANDB_PIN}`, or leave '
                          'config.wandb.project unset (None) to train without W&B') from None
    return wandb


def plain_config(config: ml_collections.ConfigDict) -> dict:
    """The config as JSON-able Python: callables by their import path, arrays as lists."""
    return _plain(config.to_dict())


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, str | int | float | bool | type(None)):
        return value
    if isinstance(value, functools.partial):  # a model variant: the class and its options
        args = [repr(_plain(a)) for a in value.args]
        args += [f'{k}={_plain(v)!r}' for k, v in value.keywords.items()]
        return f'{_plain(value.func)}({", ".join(args)})'
    if callable(value):
        module = getattr(value, '__module__', None)
        name = getattr(value, '__qualname__', None) or getattr(value, '__name__', None)
        if module and name:
            return f'{module}.{name}'
    return repr(value)


def server_error(base_url: str, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    """None when the server at `base_url` answers (any HTTP status), else why it did not."""
    try:
        with urllib.request.urlopen(base_url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered, even if not 2xx: the server is there
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, 'reason', e))


def choose_mode(requested: str, *, default_mode: str, base_url: str,
                has_credentials: Callable[[], bool],
                server_error: Callable[[], str | None]) -> tuple[str, str]:
    """(mode for wandb.init, why): config.wandb.mode, or for 'auto' W&B's own setting, then
    offline when no API key is configured or the server does not answer. The probes are
    callables so that only the checks needed run (the server one waits up to a few seconds)."""
    if requested in ('online', 'offline'):
        return requested, f'config.wandb.mode={requested!r}'
    auto = "config.wandb.mode='auto'"
    if default_mode in ('offline', 'dryrun', 'disabled'):
        mode = 'offline' if default_mode == 'dryrun' else default_mode
        return mode, (f"{auto} and W&B's own setting is mode={default_mode!r} (WANDB_MODE or "
                      '`wandb offline`)')
    if not has_credentials():
        return 'offline', (f'{auto} and no W&B API key is configured (set WANDB_API_KEY or run '
                           '`wandb login`)')
    error = server_error()
    if error is not None:
        return 'offline', f'{auto} and the W&B server {base_url} cannot be reached ({error})'
    return 'online', f'{auto}, an API key is configured and {base_url} answers'


def mode_for(requested: str, wandb) -> tuple[str, str]:
    """choose_mode with W&B's own settings (WANDB_* variables, settings files), its stored
    credentials and a request to its server."""
    settings = wandb.setup().settings
    return choose_mode(
        requested, default_mode=settings.mode, base_url=settings.base_url,
        has_credentials=lambda: wandb.login(prompt=False, verify=False),
        server_error=lambda: server_error(settings.base_url))


def new_run_id() -> str:
    """8 random lowercase letters and digits, the shape of W&B's own run ids."""
    return ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_id(workdir: str) -> str:
    """The workdir's W&B run id: the stored one when resuming, else a new one, stored."""
    path = os.path.join(workdir, RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            stored = f.read().strip()
        if stored:
            return stored
    value = new_run_id()
    os.makedirs(workdir, exist_ok=True)
    with open(path, 'w') as f:
        f.write(value + '\n')
    return value


class WandbWriter:
    """Logs the config, scalars and images of a run to W&B on process 0, nothing elsewhere.

    `config.wandb` (segjax.config.defaults) names the project, entity, run name (default: the
    workdir's name), group, tags, mode ('auto' | 'online' | 'offline') and the directory the
    local run files go to (default: the workdir; W&B adds a `wandb/` folder in it).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self._run = None
        if jax.process_index() != 0:
            return
        wandb = import_wandb()
        self._wandb = wandb
        options = config.wandb
        mode, reason = mode_for(options.mode, wandb)
        directory = options.dir or workdir
        os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(
            project=options.project, entity=options.entity,
            name=options.name or os.path.basename(os.path.abspath(workdir)),
            group=options.group, tags=list(options.tags) or None,
            config=plain_config(config), dir=directory, mode=mode,
            id=run_id(workdir), resume='allow',
            reinit='create_new',  # this writer owns its run; a sweep's trials never share one
            settings=wandb.Settings(quiet=not logs.is_verbose()))
        if mode == 'offline':
            where = f'upload it with `wandb sync {os.path.dirname(self._run.dir)}`'
        else:
            where = self._run.url if mode == 'online' else 'nothing is recorded'
        print(f'W&B: {mode} run {self._run.id} of project {options.project!r} ({reason}); '
              f'{where}', flush=True)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.log({name: float(value) for name, value in values.items()}, step=step)

    def images(self, step: int, name: str, images: np.ndarray) -> None:
        """`images` uint8 [N,H,W,3]: one W&B image list under `name`."""
        if self._run is not None:
            self._run.log({name: [self._wandb.Image(image) for image in images]}, step=step)

    def flush(self) -> None:
        """Nothing to do: W&B writes in its own process, and a step's values are committed when
        a later step is logged or the run finishes (committing early would split the step)."""

    def close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            # Called from train's `finally`: an exception in flight marks the run failed.
            run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
