"""Run by tests/test_scale_out.py and tests/test_trainers.py as one of several processes: a few
train steps of a fixed global batch, each process feeding its own rows; process 0 saves the
final parameters (the segmentation network's, then the discriminator's if any).

    python tests/multiprocess_steps.py HOST:PORT PROCESS_ID OUT.npz [KIND,KIND...]

KIND: supervised, adversarial or semisupervised; with KINDs, each is saved to OUT.npz.KIND.npz.
"""

import sys

import flax.linen as nn
import jax
import numpy as np

from segjax import losses, optim, sharding, trainers
from segjax.models import unet
from segjax.trainers import adversarial, semisupervised


def fixed_batches(num_steps: int, batch_size: int, size: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(num_steps):
        label = rng.integers(0, 4, size=(batch_size, size, size)).astype(np.int32)
        label[:, :2] = 255
        batches.append({'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
                        'label': label})
    return batches


def with_unlabelled_images(batches: list[dict]) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{**b, 'unlabelled_image': rng.normal(size=b['image'].shape).astype(np.float32)}
            for b in batches]


class SmoothBatchNormNet(nn.Module):
    """Convolutions, BatchNorm over the (global) batch and tanh: no kink for float rounding to
    flip. (The tiny U-Net's ReLU + max-pool routes gradients by comparisons that rounding can
    flip: measured 1e-4 between 1 and 8 devices for one initialisation.)"""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), strides=2)(x)
        x = jax.nn.tanh(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Conv(self.num_classes, (3, 3))(x)
        return jax.image.resize(x, (x.shape[0], x.shape[1] * 2, x.shape[2] * 2, x.shape[3]),
                                'bilinear')


# The pixel discriminator's five stride-2 convolutions need 32x32 inputs at least.
SIZES = {'supervised': 16, 'adversarial': 16, 'semisupervised': 32}


def make_trainer(kind: str) -> trainers.Trainer:
    """A tiny U-Net trained the given way; the adversarial weights are large so that the
    discriminator's part of the update is not lost in float tolerance."""
    size = SIZES[kind]
    model = (unet.UNet(num_classes=4, base_width=4, depth=2) if kind == 'supervised'
             else SmoothBatchNormNet())
    common = {'model': model,
              'tx': optim.sgd(0.1, momentum=0.9, weight_decay=1e-4),
              'loss_fn': losses.cross_entropy, 'num_classes': 4, 'ignore_index': 255,
              'image_shape': (1, size, size, 3)}
    if kind == 'supervised':
        return trainers.supervised(**common)
    if kind == 'adversarial':
        return adversarial.trainer(**common, discriminator_features=4, discriminator_lr=1e-2,
                                   adversarial_weight=0.5)
    if kind == 'semisupervised':
        return semisupervised.trainer(
            **common, discriminator_features=4, discriminator_lr=1e-2, adversarial_weight=0.5,
            unlabelled_adversarial_weight=0.5, self_training_weight=1.0,
            confidence_threshold=0.3, self_training_start=1)
    raise ValueError(f'unknown kind {kind!r}')


def batches_for(kind: str, num_steps: int, batch_size: int) -> list[dict]:
    batches = fixed_batches(num_steps, batch_size, SIZES[kind])
    return with_unlabelled_images(batches) if kind == 'semisupervised' else batches


def run(mesh, batches, process_index: int = 0, process_count: int = 1,
        kind: str = 'supervised'):
    """The state after training on `batches`; each process passes its contiguous share of rows."""
    trainer = make_trainer(kind)
    state = jax.jit(trainer.init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    train_step = jax.jit(trainer.step, donate_argnums=0)
    for batch in batches:
        rows = len(batch['image']) // process_count
        local = {k: v[process_index * rows:(process_index + 1) * rows] for k, v in batch.items()}
        state, _ = train_step(state, sharding.to_global(local, mesh), jax.random.key(1))
    return state


def trained_leaves(state) -> list[np.ndarray]:
    trees = (state.params, state.discriminator.get('params', {}))
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trees))]


if __name__ == '__main__':
    coordinator, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kinds = sys.argv[4].split(',') if len(sys.argv) > 4 else ['supervised']
    sharding.initialize_multihost(coordinator, 2, process_id)
    for kind in kinds:
        state = run(sharding.make_mesh(), batches_for(kind, 3, 8), process_id, 2, kind)
        leaves = trained_leaves(state)
        if process_id == 0:
            np.savez(out if len(sys.argv) <= 4 else f'{out}.{kind}.npz', *leaves)
