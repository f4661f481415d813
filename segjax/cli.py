"""The flags every command line shares, and starting one: quiet logs, the XLA runtime and
compilation cache, the distributed runtime when asked, then the experiment's config."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from segjax import config as config_lib
from segjax import logs, sharding

# Compiled programs are kept here so that re-running an experiment skips compilation.
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'segjax', 'xla')


def argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags every entry point shares; `--config.a.b=value` overrides are split off first."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog='Any config field can be overridden: --config.optimizer.lr=0.05')
    parser.add_argument('--config', required=True, help='experiment file, e.g. experiments/x.py')
    parser.add_argument('--workdir', required=True, help='checkpoints, logs and metrics go here')
    parser.add_argument('--multihost', action='store_true',
                        help='call jax.distributed.initialize (auto-detects TPU/Slurm/MPI)')
    parser.add_argument('--coordinator', default=None, help='host:port of process 0')
    parser.add_argument('--coordinator_bind_address', default=None,
                        help='host:port process 0 listens on (default: the --coordinator '
                        "address itself; '[::]:PORT' for every interface)")
    parser.add_argument('--num_processes', type=int, default=None)
    parser.add_argument('--process_id', type=int, default=None)
    parser.add_argument('--compilation_cache', default=DEFAULT_COMPILATION_CACHE,
                        help="persistent XLA compilation cache ('' turns it off)")
    logs.add_verbose_flag(parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """(args, config): parses flags, starts the distributed runtime if asked, loads the config."""
    overrides, rest = config_lib.split_argv(argv)
    args = parser.parse_args(rest)
    logs.quiet(args.verbose)

    sharding.configure_runtime(args.compilation_cache)
    if args.multihost or args.coordinator:
        sharding.initialize_multihost(args.coordinator, args.num_processes, args.process_id,
                                      args.coordinator_bind_address)
    try:
        config = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    return args, config
