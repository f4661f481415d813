"""Run by tests/test_multihost.py as one of two processes: starts the distributed runtime with
segjax's defaults and prints the TCP addresses this process listens on (hex, /proc/net)."""

import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from segjax import sharding


def listening_addresses() -> list[str]:
    """'local_address:port' (as /proc/net/tcp{,6} writes them) of this process's listeners."""
    inodes = set()
    for fd in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            continue
        if target.startswith('socket:['):
            inodes.add(target[len('socket:['):-1])
    addresses = []
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        for line in open(table).readlines()[1:]:
            fields = line.split()
            if fields[3] == '0A' and fields[9] in inodes:  # 0A: LISTEN
                addresses.append(fields[1])
    return addresses


if __name__ == '__main__':
    sharding.initialize_multihost(sys.argv[1], 2, int(sys.argv[2]))
    multihost_utils.process_allgather(jnp.ones(2))  # collectives set up, as in training
    print('LISTENING', *listening_addresses(), flush=True)
    multihost_utils.sync_global_devices('listeners printed')
    jax.distributed.shutdown()
