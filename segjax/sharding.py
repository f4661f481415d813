"""Device mesh, shardings, host batches -> global arrays, and multi-host initialisation.

One mesh axis, 'data', spans every device of every process: the batch is split along it, and
the train state is either replicated on every device or (FSDP, `state_shardings(mode='fsdp')`)
split along it too, so the same code runs on one CPU, 8 GPUs or a multi-host cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from segjax.config import SHARDING_MODES, ConfigError

DATA_AXIS = 'data'


# XLA:CPU (ignored by GPU and TPU backends): convolutions through oneDNN, and YNN fusion for
# reductions only. YNN convolutions cost ~18% more CPU per U-Net step; with YNN fusion off
# (segjax <= 2026-11) reductions ran in XLA's own loops, which lose ~1000x in float32 accuracy
# (jnp.sum of 49,152 values: relative error 2e-4 vs 3e-8), in losses, statistics and logs.
# YNN's reductions cost nothing measurable (benchmarks/xla_cpu_flags.py).
CPU_XLA_FLAGS = ('--xla_cpu_use_onednn=true', '--xla_cpu_experimental_ynn_fusion_type=reduce')


def with_cpu_xla_flags(xla_flags: str) -> str:
    """`xla_flags` plus each of CPU_XLA_FLAGS whose name it does not set already."""
    for flag in CPU_XLA_FLAGS:
        if flag.split('=')[0] not in xla_flags:
            xla_flags += ' ' + flag
    return xla_flags.strip()


def configure_runtime(compilation_cache: str | None = None) -> None:
    """Sets fast XLA:CPU flags (unless the user set them), the 'rbg' PRNG and, when given, the
    persistent compilation cache directory.

    Call before the first JAX computation. 'rbg' keys compile far faster than threefry at init
    (5 s vs 17-29 s for a U-Net on 2 cores); parameters are initialised replicated, so every
    device and process still draws the same values. The cache makes a re-run skip compilation
    (U-Net init + forward: 29 s cold, 2.6 s warm on 2 cores).
    """
    os.environ['XLA_FLAGS'] = with_cpu_xla_flags(os.environ.get('XLA_FLAGS', ''))
    jax.config.update('jax_default_prng_impl', 'rbg')
    if compilation_cache:
        jax.config.update('jax_compilation_cache_dir', compilation_cache)
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def initialize_multihost(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, bind_address: str | None = None) -> None:
    """Starts JAX's distributed runtime; with no arguments it auto-detects TPU/Slurm/MPI.

    Process 0's coordinator service listens on `bind_address` (host:port); by default on the
    coordinator address's own host, not on every interface as JAX's default '[::]:port' does.
    """
    # CPU processes talk over gloo (loopback or LAN); it only affects the CPU backend.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if bind_address is None and coordinator:
        bind_address = coordinator
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, coordinator_bind_address=bind_address)


def make_mesh() -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes (Auto axes, per the guide)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


# FSDP leaves of at most this many bytes stay replicated: gathering them costs a collective's
# latency for almost no memory. big_vision's 4 MiB would keep 42% of DeepLabV3+-R50's bytes
# replicated (ResNet's 3x3x256x256 kernels are 2.25 MiB); at 64 KiB it is 0.5% (BatchNorm
# scales and biases, the stem), and 135 of its 188 parameter leaves.
FSDP_MIN_BYTES = 2**16


def fsdp_spec(shape: tuple[int, ...], num_shards: int, nbytes: int, *,
              min_bytes: int = FSDP_MIN_BYTES) -> PartitionSpec:
    """big_vision's FSDP rule: split the largest dimension divisible by `num_shards` over
    'data'; replicate a leaf of at most `min_bytes` bytes or with no divisible dimension.

    Ties go to the later dimension: a (3, 3, C, C) kernel splits its output channels, as in
    big_vision, whose unstable np.argsort does so for such shapes but not for all.
    """
    if nbytes <= min_bytes or num_shards == 1:
        return PartitionSpec()
    # Stable sort, then reversed: among equal sizes the later dimension comes first.
    for dim in np.argsort(shape, kind='stable')[::-1]:
        if shape[dim] % num_shards == 0:
            return PartitionSpec(*[DATA_AXIS if d == dim else None for d in range(len(shape))])
    return PartitionSpec()


def fsdp_sharding(mesh: Mesh, leaf, *, min_bytes: int = FSDP_MIN_BYTES) -> NamedSharding:
    """`leaf` (an array or ShapeDtypeStruct) split by `fsdp_spec` over the mesh's 'data' axis."""
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), mesh.shape[DATA_AXIS], nbytes,
                                         min_bytes=min_bytes))


def _under_batch_stats(path) -> bool:
    return any(getattr(key, 'key', getattr(key, 'name', None)) == 'batch_stats' for key in path)


def state_shardings(mesh: Mesh, state, mode: str, *, min_bytes: int = FSDP_MIN_BYTES):
    """Shardings for every leaf of a train state (arrays or ShapeDtypeStructs).

    'replicated': every leaf on every device. 'fsdp': parameters, optimizer state, EMA weights
    (and a discriminator's) by `fsdp_sharding`; an optimizer moment has its parameter's shape,
    so it gets its parameter's sharding and the update stays local. BatchNorm statistics (any
    leaf under a 'batch_stats' key) stay replicated: they are small and each step replaces
    them with the global batch's. XLA all-gathers the weights inside the jitted step.
    """
    if mode == 'replicated':
        return jax.tree.map(lambda _: replicated(mesh), state)
    if mode != 'fsdp':
        raise ConfigError(f'config.sharding={mode!r}: expected one of {list(SHARDING_MODES)}')
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: replicated(mesh) if _under_batch_stats(path)
        else fsdp_sharding(mesh, leaf, min_bytes=min_bytes), state)


def bytes_per_device(tree) -> int:
    """The most bytes any one of this process's devices holds of `tree`'s arrays (their
    addressable shards: a replicated leaf counts whole on every device)."""
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


def local_batch_size(global_batch_size: int, name: str = 'batch_size',
                     micro_batches: int = 1) -> int:
    """This process's share of the global batch; each of its `micro_batches` (gradient
    accumulation) must split evenly over all devices."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size % (devices * micro_batches):
        unit = devices * micro_batches
        raise ConfigError(
            f'config.{name}={global_batch_size} must be a multiple of the device count '
            f'({devices} devices over {processes} processes)'
            + (f' times grad_accum_steps={micro_batches}' if micro_batches > 1 else '')
            + f', e.g. {max(unit, global_batch_size // unit * unit)}')
    return global_batch_size // processes


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array sharded on 'data'."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def to_local(array: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (the inverse of `to_global`)."""
    local = multihost_utils.global_array_to_host_local_array(array, mesh, PartitionSpec(DATA_AXIS))
    return np.asarray(local)
