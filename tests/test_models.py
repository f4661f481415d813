"""The model zoo: reference parameter counts, the model contract for every family at tiny width,
building blocks, every experiment module's model, and a few training steps per family."""

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import config as config_lib
from segjax import experiment, optim, step
from segjax.instance.maskrcnn import MaskRCNN
from segjax.models import deeplab, fcn, layers, pspnet, resnet, segnet


def _num_params(model, shape=(1, 64, 64, 3)) -> int:
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                 train=False))
    return sum(leaf.size for leaf in jax.tree.leaves(abstract['params']))


# Counted on torchvision 0.29.1 models with sum(p.numel() for p in model.parameters());
# resnet18/50/101 are also in torchvision's docs (11.7M, 25.6M, 44.5M). Segmentation models are
# weights=None, weights_backbone=None, num_classes=21, aux_loss False (and True where noted).
@pytest.mark.parametrize('model, expected', [
    (resnet.ResNetClassifier(depth=18), 11_689_512),
    (resnet.ResNetClassifier(depth=50), 25_557_032),
    (resnet.ResNetClassifier(depth=101), 44_549_160),
    (fcn.FCNResNet50(num_classes=21), 32_957_013),
    (fcn.FCNResNet50(num_classes=21, aux_head=True), 35_322_218),
    (fcn.FCNResNet101(num_classes=21), 51_949_141),
    (deeplab.DeepLabV3ResNet50(num_classes=21), 39_638_869),
    (deeplab.DeepLabV3ResNet50(num_classes=21, aux_head=True), 42_004_074),
    (deeplab.DeepLabV3ResNet101(num_classes=21), 58_630_997),
], ids=['resnet18', 'resnet50', 'resnet101', 'fcn_resnet50', 'fcn_resnet50_aux',
        'fcn_resnet101', 'deeplabv3_resnet50', 'deeplabv3_resnet50_aux', 'deeplabv3_resnet101'])
def test_parameter_counts_match_torchvision(model, expected):
    assert _num_params(model) == expected


def test_v1c_deep_stem_parameter_count():
    # Three 3x3 convs 3->32->32->64 with BN replace the 7x7 3->64 conv (mmseg ResNetV1c).
    stem_v1c = 9 * (3 * 32 + 32 * 32 + 32 * 64) + 2 * (32 + 32 + 64)
    stem_v1 = 49 * 3 * 64 + 2 * 64
    plain = _num_params(resnet.ResNet50())
    assert _num_params(resnet.ResNet50V1c()) == plain - stem_v1 + stem_v1c


# Tiny widths: the contract, not the capacity, is under test.
TINY = {
    'fcn_resnet18_aux': functools.partial(fcn.FCNResNet, depth=18, base_width=4, aux_head=True),
    'fcn8s_resnet18': functools.partial(fcn.FCNResNet, depth=18, output_stride=32, skip=8,
                                        base_width=4, channels=8),
    'pspnet_v1c_aux': functools.partial(pspnet.PSPNet, depth=50, base_width=4, channels=8,
                                        deep_stem=True, aux_head=True),
    'deeplabv3_os16_multigrid': functools.partial(
        deeplab.DeepLabV3, depth=18, base_width=4, channels=8, output_stride=16,
        multi_grid=(1, 2)),
    'deeplabv3plus_separable_aux': functools.partial(
        deeplab.DeepLabV3Plus, depth=18, base_width=4, channels=8, low_level_channels=4,
        separable=True, aux_head=True),
    'segnet': functools.partial(segnet.SegNet, base_width=4),
}


def _random_variables(model, shape) -> dict:
    """Variables drawn in numpy (BatchNorm variances 1): compiling `init` would take longer
    than all the rest of these tests."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                 train=False))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == 'var':
            return np.ones(leaf.shape, np.float32)
        return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _fast_jit(fn, *args):
    """fn compiled for args without XLA's backend optimisations: these models are tiny, and
    unoptimised code compiles 3-4x faster."""
    return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


@pytest.mark.parametrize('name', sorted(TINY))
def test_contract_any_size_float32_and_bfloat16(name):
    images = jnp.ones((2, 37, 50, 3))  # a multiple of no stride
    variables = _random_variables(TINY[name](num_classes=5), images.shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        # The same float32 variables serve both compute dtypes.
        model = TINY[name](num_classes=5, dtype=dtype)
        apply = functools.partial(model.apply, train=False)
        outputs = _fast_jit(apply, variables, images)(variables, images)
        arrays = outputs if isinstance(outputs, dict) else {'logits': outputs}
        assert sorted(arrays) == (['aux', 'logits'] if 'aux' in name else ['logits'])
        for value in arrays.values():
            assert value.shape == (2, 37, 50, 5) and value.dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(value)))
    # Training mode (bfloat16): dropout and batch statistics; the statistics stay float32.
    train = functools.partial(model.apply, train=True, mutable=['batch_stats'])
    rngs = {'dropout': jax.random.key(1)}
    outputs, updates = _fast_jit(lambda v, x: train(v, x, rngs=rngs), variables, images)(
        variables, images)
    assert step.main_logits(outputs).shape == (2, 37, 50, 5)
    assert {p.dtype for p in jax.tree.leaves(updates)} == {jnp.dtype('float32')}


@pytest.mark.parametrize('output_stride, strides', [
    (32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_resnet_features_by_stride(output_stride, strides):
    model = resnet.ResNet(depth=18, base_width=4, output_stride=output_stride)
    features = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, 64, 96, 3)), train=False)[0])
    assert sorted(features) == ['layer1', 'layer2', 'layer3', 'layer4']
    for (name, value), stride, width in zip(sorted(features.items()), strides, (4, 8, 16, 32),
                                            strict=True):
        assert value.shape == (1, 64 // stride, 96 // stride, width), name


def test_stage_dilations_follow_torchvision_and_multi_grid():
    blocks = resnet.STAGE_BLOCKS[50]
    # torchvision replace_stride_with_dilation=[False, True, True]: the first block of a
    # dilated stage keeps the previous dilation.
    assert resnet.stage_dilations(8, blocks) == [
        (1, [1, 1, 1]), (2, [1, 1, 1, 1]), (1, [1, 2, 2, 2, 2, 2]), (1, [2, 4, 4])]
    assert resnet.stage_dilations(16, blocks, multi_grid=(1, 2, 4))[3] == (1, [2, 4, 8])
    assert resnet.stage_dilations(32, blocks)[3] == (2, [1, 1, 1])
    assert deeplab.atrous_rates(16, None) == (6, 12, 18)
    assert deeplab.atrous_rates(8, None) == (12, 24, 36)
    with pytest.raises(ValueError, match='output_stride'):
        resnet.stage_dilations(4, blocks)


def test_max_unpool_puts_values_back_where_the_maxima_were():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 6, 3)), jnp.float32)
    pooled, indices = segnet.max_pool_with_indices(x)
    np.testing.assert_array_equal(pooled, jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID'))
    unpooled = segnet.max_unpool(pooled, indices)
    assert unpooled.shape == x.shape
    # Exactly one non-zero per 2x2 window per channel, equal to the input there.
    kept = unpooled != 0
    np.testing.assert_array_equal(jnp.where(kept, x, 0), unpooled)
    np.testing.assert_array_equal(kept.reshape(2, 2, 2, 3, 2, 3).sum(axis=(2, 4)), 1)


def test_adaptive_avg_pool_matches_pytorch_bins():
    x = np.random.default_rng(0).normal(size=(1, 7, 5, 2)).astype(np.float32)
    pooled = np.asarray(layers.adaptive_avg_pool(jnp.asarray(x), 3))
    # PyTorch's bins for 7 -> 3: [0,3), [2,5), [4,7); for 5 -> 3: [0,2), [1,4), [3,5).
    rows, cols = [(0, 3), (2, 5), (4, 7)], [(0, 2), (1, 4), (3, 5)]
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            np.testing.assert_allclose(pooled[0, i, j], x[0, r0:r1, c0:c1].mean((0, 1)),
                                       rtol=1e-6)
    torch = pytest.importorskip('torch')
    reference = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), 3).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(pooled, reference, rtol=1e-6)


# ------------------------------------------------------------------------------ experiments

EXPERIMENTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                            '*.py')))


@pytest.mark.parametrize('path', EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_builds_its_model(path):
    config = config_lib.load(path)
    model = experiment.make_model(config)
    if isinstance(model, MaskRCNN):  # detections, not logits: its trainer builds the state
        state = jax.eval_shape(experiment.make_trainer(config, model, optim.make(config)[0]).init,
                               jax.random.key(0))
        assert jax.tree.leaves(state.params)
        return
    height, width = config.data.crop_size
    images = jnp.zeros((1, height, width, 3))
    outputs, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), images, train=False))
    logits = step.main_logits(outputs)
    assert logits.shape == (1, height, width, config.data.num_classes)
    assert jax.tree.leaves(variables['params'])


# Synthetic experiments with the model narrowed (ResNet-10, one conv per SegNet stage): each
# family trains end to end through the experiment's own model, loss (main + auxiliary head where
# it has one), optimizer and segjax.step.train_step.
TRAIN = {
    'segnet_synthetic': ['model.stage_convs=(1, 1, 1, 1, 1)'],
    'fcn_resnet_synthetic': ['model.depth=10'],
    'pspnet_synthetic': ['model.depth=10', 'model.channels=8'],
    'deeplabv3_synthetic': ['model.depth=10', 'model.channels=8'],
    'deeplabv3plus_synthetic': ['model.depth=10', 'model.channels=8',
                                'model.low_level_channels=4'],
}
FAST_COMPILE = {'xla_backend_optimization_level': 0}  # see _fast_jit


@pytest.mark.parametrize('name', sorted(TRAIN))
def test_tiny_families_train(name):
    root = os.path.join(os.path.dirname(__file__), '..', 'experiments')
    config = config_lib.load(os.path.join(root, f'{name}.py'), TRAIN[name] + [
        'model.base_width=4', 'num_steps=8', 'schedule.warmup_steps=0', 'optimizer.lr=0.01'])
    model, loss_fn = experiment.make_model(config), experiment.make_loss(config)
    tx, _ = optim.make(config)
    rng = jax.random.key(0, impl='rbg')  # compiles far faster than threefry at init
    init = jax.jit(functools.partial(step.create_state, model, tx, image_shape=(1, 32, 32, 3)))
    state = init.lower(rng).compile(FAST_COMPILE)(rng)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    labels = (images[..., 0] > 0).astype(np.int32) * 2 + (images[..., 1] > 0)  # 4 classes
    batch = {'image': images, 'label': labels}
    train_step = jax.jit(functools.partial(step.train_step, model=model, tx=tx, loss_fn=loss_fn),
                         donate_argnums=0).lower(state, batch, rng).compile(FAST_COMPILE)
    losses = []
    for _ in range(5):
        state, stats = train_step(state, batch, rng)
        losses.append(float(stats['loss']))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
    if config.model.get('aux_head'):
        assert {'loss/main', 'loss/aux'} <= set(stats)
