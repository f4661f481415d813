"""Run by tests/test_scale_out.py as one of several processes: a few train steps of a fixed
global batch, each process feeding its own rows; process 0 saves the final parameters."""

import functools
import sys

import jax
import numpy as np

from segjax import losses, optim, sharding, step
from segjax.models import unet


def fixed_batches(num_steps: int, batch_size: int) -> list[dict]:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(num_steps):
        label = rng.integers(0, 4, size=(batch_size, 16, 16)).astype(np.int32)
        label[:, :2] = 255
        batches.append({'image': rng.normal(size=(batch_size, 16, 16, 3)).astype(np.float32),
                        'label': label})
    return batches


def run(mesh, batches, process_index: int = 0, process_count: int = 1):
    """Params after training on `batches`; each process passes its contiguous share of rows."""
    model = unet.UNet(num_classes=4, base_width=4, depth=2)
    tx = optim.sgd(0.1, momentum=0.9, weight_decay=1e-4)
    state = jax.jit(functools.partial(step.create_state, model, tx, image_shape=(1, 16, 16, 3)),
                    out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx,
                                           loss_fn=losses.cross_entropy), donate_argnums=0)
    for batch in batches:
        rows = len(batch['image']) // process_count
        local = {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}
        state, _ = train_step(state, sharding.to_global(local, mesh), jax.random.key(1))
    return state


if __name__ == '__main__':
    coordinator, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sharding.initialize_multihost(coordinator, 2, process_id)
    state = run(sharding.make_mesh(), fixed_batches(3, 8), process_id, 2)
    leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    if process_id == 0:
        np.savez(out, *leaves)
