"""What segjax's command lines print: their own lines and real warnings, not library chatter.

By default every CLI (train, evaluate, predict, the prepare commands) hides
  - TensorFlow's C++ INFO and WARNING lines (oneDNN, cpu_feature_guard, tf.data cache notes):
    TF_CPP_MIN_LOG_LEVEL=2 (unless already set), and what TensorFlow writes to stderr while it
    loads (its oneDNN line ignores a level set from Python). Both must be in place before
    TensorFlow loads, which the CLI modules do on import, so they are set up when this module is
    imported (the CLIs import it before TensorFlow), from SEGJAX_VERBOSE and a `--verbose` on the
    command line;
  - TFDS's progress bars and its 'Downloading and preparing' banners (segjax prints one line
    when it prepares a data set);
  - INFO and WARNING records that orbax and TFDS log through absl, e.g. orbax's "Given directory
    is read only" for the read-only checkpoint manager evaluate and predict use.
Errors, Python warnings and segjax's own warnings are kept. `--verbose` or SEGJAX_VERBOSE=1
shows everything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import logging
import os
import sys
from collections.abc import Iterator

ENV_VAR = 'SEGJAX_VERBOSE'
# Packages whose absl/logging records below ERROR are hidden unless verbose.
CHATTY_PACKAGES = ('orbax', 'tensorflow_datasets')

_state = {'quiet': False, 'verbose': False}


def verbose_from_environment(argv: list[str] | None = None) -> bool:
    """SEGJAX_VERBOSE set to anything but '', '0' or 'false', or `--verbose` among the args."""
    argv = sys.argv[1:] if argv is None else argv
    flag = os.environ.get(ENV_VAR, '').strip().lower() not in ('', '0', 'false', 'no')
    return flag or '--verbose' in argv


@contextlib.contextmanager
def _stderr_file_descriptor_hidden() -> Iterator[None]:
    """Points fd 2 (where C++ code writes) at /dev/null, and back."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Loads the `tensorflow` package (once, whoever imports it) with its stderr hidden."""

    def find_spec(self, name, path, target=None):
        if name != 'tensorflow':
            return None
        # Asked by an import or by a mere importlib.util.find_spec: this stays until it loads.
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_quietly(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                with _stderr_file_descriptor_hidden():
                    exec_module(module)

            spec.loader.exec_module = exec_quietly
        return spec


def _quiet_native_logs() -> None:
    if verbose_from_environment():
        return
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if 'tensorflow' not in sys.modules and not any(
            isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


_quiet_native_logs()


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--verbose', action='store_true',
                        help=f'also show library logs and progress bars (or set {ENV_VAR}=1)')


class _HideChattyPackages(logging.Filter):
    """Drops records below ERROR logged from inside CHATTY_PACKAGES."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        path = record.pathname.replace(os.sep, '/')
        return not any(f'/{package}/' in path for package in CHATTY_PACKAGES)


_FILTER = _HideChattyPackages()


def quiet(verbose: bool = False) -> bool:
    """Called by every CLI once its flags are parsed; returns whether the run is verbose."""
    verbose = verbose or verbose_from_environment([])
    _state.update(quiet=not verbose, verbose=verbose)
    import tensorflow_datasets as tfds  # imports no TensorFlow by itself

    tfds.display_progress_bar(verbose)
    logger = logging.getLogger('absl')  # orbax and TFDS log through absl.logging, to this logger
    if verbose:
        logger.removeFilter(_FILTER)
    elif _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return verbose


def is_quiet() -> bool:
    """True after quiet(False): library output is being hidden."""
    return _state['quiet']


def is_verbose() -> bool:
    return _state['verbose']


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f'{hours}h{minutes:02d}m'
    return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'
