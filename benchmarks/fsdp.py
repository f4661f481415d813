"""FSDP (config.sharding='fsdp') against replicated training on 8 forced CPU devices: the bytes
of parameters + optimizer state each device holds, and the train step's time.

    python benchmarks/fsdp.py                       # DeepLabV3+-R50 bytes, tiny U-Net step time
    python benchmarks/fsdp.py --repeats 5 --json /tmp/fsdp.json

Bytes: DeepLabV3+-R50 (8 classes) with AdamW (two moments per weight), its train state
created as `segjax.train` creates it (`experiment.initial_state`: init jitted straight onto the
shardings), then `sharding.bytes_per_device` of (params, opt_state) measured on the arrays'
shards. The replicated state is not allocated (8 copies of 462 MiB); every device would hold the
whole of it, which is what the table reports for it (its arrays' nbytes).

Step time: the tiny U-Net (base width 16, depth 3, 64x64, global batch 16), the train step
jitted as segjax.train jits it (state donated, explicit in/out shardings), median of
`--repeats` calls after a warm-up. On CPU all 8 "devices" share the same cores and memory, so
this measures the cost of the extra collectives, not a speed-up; on accelerators FSDP trades
all-gathers for memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from segjax import sharding  # noqa: E402  (XLA_FLAGS first)

sharding.configure_runtime()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import initial_train_state  # noqa: E402

from segjax import config as config_lib  # noqa: E402
from segjax import experiment  # noqa: E402
from segjax.models import deeplab, unet  # noqa: E402

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'experiments', 'unet_synthetic.py')


def make_config(model_fn, mode: str, crop: int, batch: int, **model_options):
    """The U-Net experiment's config (AdamW, its 8 classes) with `model_fn` and
    config.sharding=`mode`."""
    config = config_lib.load(EXPERIMENT, [f'sharding={mode}', f'batch_size={batch}',
                                          f'data.crop_size=({crop},{crop})'])
    config.model = {'fn': model_fn, **model_options}
    config_lib.validate(config)
    return config


def trainer_and_state(config, allocate: bool = True):
    mesh = sharding.make_mesh()
    trainer, init, abstract = initial_train_state(config, mesh)
    return mesh, trainer, abstract, init(jax.random.key(0)) if allocate else None


def weight_bytes(model_fn, mode: str, **options) -> dict:
    config = make_config(model_fn, mode, crop=64, batch=8, **options)
    _, _, abstract, state = trainer_and_state(config, allocate=mode == 'fsdp')
    whole = sum(x.size * x.dtype.itemsize
                for x in jax.tree.leaves((abstract.params, abstract.opt_state)))
    per_device = (whole if state is None
                  else sharding.bytes_per_device((state.params, state.opt_state)))
    leaves = jax.tree.leaves(abstract.params)
    split = sum(x.sharding.spec != jax.sharding.PartitionSpec() for x in leaves)
    return {'mode': mode, 'parameters': sum(x.size for x in leaves),
            'whole_MiB': whole / 2**20, 'per_device_MiB': per_device / 2**20,
            'ratio': per_device / whole, 'param_leaves_split': f'{split}/{len(leaves)}'}


def step_seconds(mode: str, repeats: int) -> dict:
    config = make_config(unet.UNet, mode, crop=64, batch=16, base_width=16, depth=3)
    mesh, trainer, _, state = trainer_and_state(config)
    shardings = experiment.state_shardings(mesh, state, config)
    step_fn = jax.jit(trainer.step, in_shardings=(
        shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = sharding.to_global({
        'image': rng.normal(size=(16, 64, 64, 3)).astype(np.float32),
        'label': rng.integers(0, 8, (16, 64, 64)).astype(np.int32)}, mesh)
    start = time.perf_counter()
    state, stats = step_fn(state, batch, jax.random.key(1))
    jax.block_until_ready(stats)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, stats = step_fn(state, batch, jax.random.key(1))
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - start)
    return {'mode': mode, 'compile_and_first_step_s': first,
            'median_step_s': statistics.median(times), 'min_step_s': min(times),
            'repeats': repeats, 'loss': float(stats['loss']),
            'MiB_per_device': sharding.bytes_per_device((state.params, state.opt_state)) / 2**20}


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--json', default=None, help='also write the results here')
    args = parser.parse_args(argv)
    print(f'{jax.device_count()} devices; load average {os.getloadavg()[0]:.1f} on '
          f'{os.cpu_count()} cores', flush=True)
    memory = [weight_bytes(deeplab.DeepLabV3PlusResNet50, mode)
              for mode in ('replicated', 'fsdp')]
    print('\n| DeepLabV3+-R50, AdamW | parameters | params + optimizer state, all | per device '
          '| per device / all | parameter leaves split |\n|---|---|---|---|---|---|')
    for row in memory:
        print(f'| {row["mode"]} | {row["parameters"]:,} | {row["whole_MiB"]:.1f} MiB | '
              f'{row["per_device_MiB"]:.1f} MiB | {row["ratio"]:.4f} | '
              f'{row["param_leaves_split"]} |', flush=True)
    steps = [step_seconds(mode, args.repeats) for mode in ('replicated', 'fsdp')]
    print('\n| tiny U-Net step (64x64, batch 16) | compile + first step s | median step s | '
          'min step s | loss after | MiB per device |\n|---|---|---|---|---|---|')
    for row in steps:
        print(f'| {row["mode"]} | {row["compile_and_first_step_s"]:.1f} | '
              f'{row["median_step_s"]:.3f} | {row["min_step_s"]:.3f} | {row["loss"]:.5f} | '
              f'{row["MiB_per_device"]:.3f} |', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'memory': memory, 'step': steps}, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
