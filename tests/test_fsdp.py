"""FSDP (config.sharding='fsdp'): big_vision's rule, the same update as replicated training on
the 8 forced CPU devices, ~1/8 of the weight bytes per device, and checkpoints that move
between device counts (8 -> 4 -> 1) and sharding modes."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import multiprocess_steps
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from test_end_to_end import EXPERIMENT, ROOT, tiny_overrides

from segjax import config as config_lib
from segjax import experiment, optim, sharding
from segjax.models import deeplab, unet

try:  # added alongside FSDP; tested here too where it exists
    from segjax.models import segformer
except ImportError:
    segformer = None
try:
    from segjax.models import segmenter, vit
except ImportError:
    segmenter = vit = None


def big_vision_fsdp(shape, itemsize, axis_size, min_bytes):
    """big_vision/sharding.py's `fsdp` rule (the oracle): the first dimension of
    np.argsort(shape)[::-1] that the axis size divides, or None (replicated). Its argsort is
    numpy's default, not stable: ties go to the later dimension for (3, 3, C, C) kernels and
    square matrices, but (48, 48, 8, 8) sorts as [3, 2, 1, 0] (numpy 2.4). segjax sorts stably
    so that ties always go to the later dimension; so does the oracle here."""
    if np.prod(shape) * itemsize <= min_bytes:
        return None
    for i in np.argsort(shape, kind='stable')[::-1]:
        if shape[i] % axis_size == 0:
            return int(i)
    return None


def sharded_dim(spec: PartitionSpec):
    dims = [i for i, axis in enumerate(spec) if axis == sharding.DATA_AXIS]
    assert len(dims) <= 1 and all(a in (None, sharding.DATA_AXIS) for a in spec)
    return dims[0] if dims else None


@pytest.mark.parametrize('shape, nbytes, expected', [
    ((3, 3, 64, 128), 4 * 73728, PartitionSpec(None, None, None, 'data')),
    ((3, 3, 64, 64), 4 * 36864, PartitionSpec(None, None, None, 'data')),  # tie: the later dim
    ((1000, 12), 4 * 12000, PartitionSpec('data', None)),  # 12 is not divisible by 8
    ((12, 1000), 4 * 12000, PartitionSpec(None, 'data')),
    ((9, 12, 20), 4 * 2160, PartitionSpec()),  # no dimension divisible by 8
    ((4,), 16, PartitionSpec()),
    ((), 4, PartitionSpec()),
])
def test_fsdp_spec_on_hand_made_shapes(shape, nbytes, expected):
    assert sharding.fsdp_spec(shape, 8, nbytes, min_bytes=0) == expected


def test_fsdp_spec_keeps_small_leaves_replicated():
    # 128 x 128 float32 is 64 KiB exactly: at most min_bytes stays replicated, as big_vision's.
    assert sharding.fsdp_spec((128, 128), 8, 2**16, min_bytes=2**16) == PartitionSpec()
    assert sharding.fsdp_spec((128, 129), 8, 4 * 128 * 129, min_bytes=2**16) == PartitionSpec(
        'data', None)
    assert sharding.fsdp_spec((64, 64), 1, 4 * 4096, min_bytes=0) == PartitionSpec()  # 1 device


def test_fsdp_spec_equals_big_vision_on_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        shape = tuple(int(d) for d in rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64],
                                                 size=rng.integers(0, 5)))
        axis_size, itemsize = int(rng.choice([2, 4, 8])), int(rng.choice([2, 4]))
        min_bytes = int(rng.choice([0, 64, 1024]))
        nbytes = int(np.prod(shape)) * itemsize
        spec = sharding.fsdp_spec(shape, axis_size, nbytes, min_bytes=min_bytes)
        assert sharded_dim(spec) == big_vision_fsdp(shape, itemsize, axis_size, min_bytes), shape


def tiny_config(model_fn, sharding_mode: str, **model_options):
    """The U-Net experiment's config (weighted cross-entropy) with another model, SGD with
    momentum and EMA; every leaf is FSDP-sharded (fsdp_min_bytes=0) so that tiny models
    exercise the rule.

    SGD, not the experiment's AdamW: Adam divides each gradient by its own magnitude, so a
    weight whose true gradient is ~0 (e.g. a bias before a normalisation) moves by up to the
    learning rate in a direction set by float rounding, whatever the layout (measured: 8e-6
    between the two layouts after 3 AdamW steps on SegFormer). SGD shows the layout's own error.
    """
    config = config_lib.load(EXPERIMENT, [f'sharding={sharding_mode}', 'fsdp_min_bytes=0',
                                          'num_steps=10', 'schedule.warmup_steps=0',
                                          'ema_decay=0.9'])
    config.model = {'fn': model_fn, **model_options}
    config.optimizer = {'fn': optim.sgd, 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 1e-4}
    config_lib.validate(config)
    return config


# Tiny variants; dropout and drop-path off (their masks are not what is compared here).
MODELS = {
    'unet': (unet.UNet, {'base_width': 8, 'depth': 2}),
    'deeplabv3plus_resnet18': (deeplab.DeepLabV3Plus, {
        'depth': 18, 'base_width': 8, 'channels': 16, 'low_level_channels': 8,
        'output_stride': 8, 'dropout': 0.0}),
}
if segformer is not None:
    MODELS['segformer'] = (segformer.SegFormer, {
        'hidden_sizes': (8, 16, 24, 32), 'depths': (1, 1, 1, 1), 'num_heads': (1, 2, 2, 4),
        'decoder_channels': 16, 'drop_path_rate': 0.0, 'dropout': 0.0})
if segmenter is not None:
    # A ViT (8x8 patches, 16 wide, 2 blocks) with Segmenter's mask transformer.
    MODELS['vit_segmenter'] = (segmenter.Segmenter, {
        'backbone': functools.partial(vit.VisionTransformer, patch_size=8, hidden_size=16,
                                      depth=2, num_heads=2, image_size=32),
        'decoder_size': 16, 'decoder_depth': 1, 'drop_path_rate': 0.0})


def fixed_batches(num_steps, batch_size=8, size=32, num_classes=8):
    rng = np.random.default_rng(0)
    return [{'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
             'label': rng.integers(0, num_classes, (batch_size, size, size)).astype(np.int32)}
            for _ in range(num_steps)]


def train_steps(config, batches):
    """(initial state, final state, losses) of train.py's jitted step on `batches`."""
    mesh = sharding.make_mesh()
    model = experiment.make_model(config)
    tx, _ = optim.make(config)
    trainer = experiment.make_trainer(config, model, tx)
    init, abstract = experiment.initial_state(trainer, mesh, config)
    state = init(jax.random.key(0))
    initial = jax.device_get(state)
    shardings = experiment.state_shardings(mesh, state, config)
    step_fn = jax.jit(trainer.step, in_shardings=(shardings, sharding.batch_sharding(mesh),
                                                  sharding.replicated(mesh)),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    losses = []
    for batch in batches:
        state, stats = step_fn(state, sharding.to_global(batch, mesh), jax.random.key(1))
        losses.append(float(stats['loss']))
    return initial, state, losses


@pytest.mark.slow  # compiles each model's init and step twice: minutes on 2 busy cores
@pytest.mark.long
@pytest.mark.parametrize('name', sorted(MODELS))
def test_fsdp_step_equals_the_replicated_step(name):
    model_fn, options = MODELS[name]
    batches = fixed_batches(3)
    results = {mode: train_steps(tiny_config(model_fn, mode, **options), batches)
               for mode in ('replicated', 'fsdp')}
    sharded = results['fsdp'][1]
    kernels = [x for x in jax.tree.leaves(sharded.params) if x.ndim == 4]
    assert all(x.sharding.spec != PartitionSpec() for x in kernels)  # really split
    for x, y in zip(jax.tree.leaves(results['replicated'][0]),
                    jax.tree.leaves(results['fsdp'][0]), strict=True):
        np.testing.assert_array_equal(x, y)  # the same initialisation, laid out differently
    # Float tolerance: XLA adds the gradients' per-device parts in another order (a
    # reduce-scatter rather than an all-reduce), and may partition the convolutions otherwise.
    np.testing.assert_allclose(results['replicated'][2], results['fsdp'][2], rtol=1e-5)
    replicated = jax.device_get(results['replicated'][1])
    sharded = jax.device_get(sharded)
    for tree in ('params', 'opt_state', 'batch_stats', 'ema'):
        for x, y in zip(jax.tree.leaves(getattr(replicated, tree)),
                        jax.tree.leaves(getattr(sharded, tree)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=f'{name} {tree}')


def test_state_shardings_split_weights_and_moments_alike_and_replicate_batch_stats():
    config = tiny_config(unet.UNet, 'fsdp', base_width=8, depth=2)
    config.optimizer = {'fn': optim.adamw, 'lr': 1e-3, 'weight_decay': 1e-4}
    model = experiment.make_model(config)
    tx, _ = optim.make(config)
    _, abstract = experiment.initial_state(experiment.make_trainer(config, model, tx),
                                           sharding.make_mesh(), config)
    specs = jax.tree.map(lambda x: x.sharding.spec, abstract)
    params = jax.tree.leaves(specs.params)
    assert [sharded_dim(s) for s in params] == [
        big_vision_fsdp(x.shape, 4, 8, 0) for x in jax.tree.leaves(abstract.params)]
    [adam] = [s for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    # AdamW's moments lie like their parameters, so the update needs no communication.
    assert jax.tree.leaves(adam.mu) == params and jax.tree.leaves(adam.nu) == params
    assert jax.tree.leaves(specs.ema['params']) == params
    for tree in (specs.batch_stats, specs.ema['batch_stats'], specs.step):
        assert all(s == PartitionSpec() for s in jax.tree.leaves(tree))


def test_an_adversarial_state_shards_its_discriminator_too():
    trainer = multiprocess_steps.make_trainer('adversarial')
    abstract = jax.eval_shape(trainer.init, jax.random.key(0))
    specs = sharding.state_shardings(sharding.make_mesh(), abstract, 'fsdp', min_bytes=0)
    assert [sharded_dim(s.spec) for s in jax.tree.leaves(specs.discriminator['params'])] == [
        big_vision_fsdp(x.shape, 4, 8, 0) for x in jax.tree.leaves(
            abstract.discriminator['params'])]
    assert jax.tree.leaves(abstract.batch_stats)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(specs.batch_stats))


def test_bytes_per_device_is_an_eighth_plus_the_replicated_leaves():
    config = tiny_config(unet.UNet, 'fsdp', base_width=16, depth=2)
    config.fsdp_min_bytes = 1024  # leaves the biases and BatchNorm vectors replicated
    _, state, _ = train_steps(config, [])
    weights = jax.tree.leaves((state.params, state.opt_state))
    whole = sum(x.nbytes for x in weights)
    replicated = sum(x.nbytes for x in weights if x.sharding.spec == PartitionSpec())
    assert 0 < replicated < 0.05 * whole
    per_device = sharding.bytes_per_device((state.params, state.opt_state))
    # Every sharded leaf splits evenly (the rule only picks divisible dimensions).
    assert per_device == (whole - replicated) / 8 + replicated
    assert per_device / whole <= 1 / 8 + replicated / whole


def test_deeplabv3plus_r50_weights_fit_in_about_an_eighth_per_device():
    """The default threshold on the published size, from shapes alone (nothing allocated)."""
    model = deeplab.DeepLabV3PlusResNet50(num_classes=21)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                               train=False))['params']
    mesh = sharding.make_mesh()
    whole = sum(x.size * 4 for x in jax.tree.leaves(params))
    per_device = sum(int(np.prod(sharding.fsdp_sharding(mesh, x).shard_shape(x.shape))) * 4
                     for x in jax.tree.leaves(params))
    assert 1 / 8 < per_device / whole < 0.13


def test_unknown_sharding_mode_is_a_config_error():
    assert config_lib.defaults().fsdp_min_bytes == sharding.FSDP_MIN_BYTES
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.sharding='zero3': expected one of \['replicated', 'fsdp'\]"):
        config_lib.load(EXPERIMENT, ['sharding=zero3'])
    with pytest.raises(config_lib.ConfigError, match=r'config.fsdp_min_bytes=-1: expected'):
        config_lib.load(EXPERIMENT, ['fsdp_min_bytes=-1'])
    with pytest.raises(config_lib.ConfigError, match=r"config.sharding='zero3'"):
        sharding.state_shardings(sharding.make_mesh(), {}, 'zero3')


# --- checkpoints across device counts and modes (whole command lines: slow) ---

# The U-Net experiment with SGD (see tiny_config for why not AdamW) at a constant learning
# rate: a run to step 3 then resumed to 6 follows the schedule of a run to 6 (a schedule over
# num_steps would decay over 3 steps in the first half).
SGD_EXPERIMENT = f"""
from segjax import optim
from segjax.config import load


def get_config():
    config = load({os.path.join(ROOT, EXPERIMENT)!r})
    config.optimizer = {{'fn': optim.sgd, 'lr': 0.05, 'momentum': 0.9, 'weight_decay': 1e-4}}
    config.schedule = {{'fn': optim.constant}}
    return config
"""


def devices_env(count: int) -> dict:
    return {**os.environ, 'XLA_FLAGS': sharding.with_cpu_xla_flags(
        f'--xla_force_host_platform_device_count={count}')}


def train_cli(experiment_path, workdir, overrides, devices: int) -> str:
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.train', '--config', str(experiment_path), '--workdir',
         str(workdir), *overrides], cwd=ROOT, env=devices_env(devices), capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def printed_losses(stdout: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in
            re.findall(r'^step (\d+)/\d+ \| loss ([0-9.]+)', stdout, re.M)}


def restored(experiment_path, workdir, overrides):
    config = config_lib.load(str(experiment_path), [o[len('--config.'):] for o in overrides])
    return jax.device_get(experiment.restore_state(config, str(workdir), sharding.make_mesh())[1])


@pytest.mark.slow  # several whole runs in subprocesses: `pytest -m long`
@pytest.mark.long
def test_an_fsdp_checkpoint_from_8_devices_resumes_on_4_and_on_1_as_if_uninterrupted(
        tmp_path, e2e_data):
    experiment_path = tmp_path / 'unet_sgd.py'
    experiment_path.write_text(SGD_EXPERIMENT)

    def overrides(num_steps, mode='fsdp'):
        return tiny_overrides(e2e_data, num_steps=num_steps, log_every=1, checkpoint_every=3,
                              sharding=mode, fsdp_min_bytes=0)

    straight = tmp_path / 'straight'
    straight_out = train_cli(experiment_path, straight, overrides(6), devices=8)
    assert re.search(r'MiB params \+ optimizer state per device \(fsdp;', straight_out)
    half = tmp_path / 'half'
    train_cli(experiment_path, half, overrides(3), devices=8)
    expected = restored(experiment_path, straight, overrides(6))
    for devices, mode in ((4, 'fsdp'), (1, 'replicated')):
        workdir = tmp_path / f'resumed_on_{devices}'
        shutil.copytree(half, workdir)
        out = train_cli(experiment_path, workdir, overrides(6, mode), devices=devices)
        assert 'resuming at step 3/6' in out and f'| {devices} devices,' in out
        losses = printed_losses(out)
        assert sorted(losses) == [4, 5, 6]
        # Printed to 4 decimals: one rounding step (1e-4) plus float noise.
        np.testing.assert_allclose([losses[k] for k in (4, 5, 6)],
                                   [printed_losses(straight_out)[k] for k in (4, 5, 6)],
                                   rtol=0, atol=2e-4)
        # Read back on this process's 8 devices under FSDP, whatever wrote it.
        result = restored(experiment_path, workdir, overrides(6))
        assert int(result.step) == 6
        # Float tolerance: the same batches on 4 or 1 device(s) add per-device parts in another
        # order. Measured after the 3 resumed SGD steps (lr 0.05): at most 2.3e-6 in the
        # weights (~0.01-1), 1.8e-6 in the BatchNorm statistics, 2.2e-5 in the momentum (a
        # running sum of gradients, the noisiest); each bound below leaves a 4-10x margin.
        for tree, atol in (('params', 2e-5), ('batch_stats', 2e-5), ('opt_state', 1e-4)):
            for x, y in zip(jax.tree.leaves(getattr(expected, tree)),
                            jax.tree.leaves(getattr(result, tree)), strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol,
                                           err_msg=f'{devices} devices {tree}')

    # segjax.evaluate reads the FSDP checkpoint (here onto replicated weights) and counts what
    # the run's own end-of-training evaluation counted.
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.evaluate', '--config', str(experiment_path),
         '--workdir', str(straight), *overrides(6, 'replicated')], cwd=ROOT,
        env=devices_env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    trained = json.loads((straight / 'metrics.json').read_text())
    evaluated = json.loads((straight / 'eval' / 'metrics.json').read_text())
    assert evaluated['step'] == trained['step'] == 6
    np.testing.assert_array_equal(evaluated['confusion_matrix'], trained['confusion_matrix'])
