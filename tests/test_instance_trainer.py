"""segjax.trainers.instance: Mask R-CNN through the one train loop.

Slow (they compile the Mask R-CNN train step): `pytest tests/test_instance_trainer.py -m slow`.

The step learns (loss falls on a repeated batch), gives the same update on 1 and 8 devices,
resumes exactly (batches from start_step + the checkpointed state), freezes what torchvision
freezes; the streamed COCO evaluation equals pycocotools run directly on the same detections;
(slow) a whole `segjax.train` + `segjax.evaluate` run on the smoke instances data.
"""

import json

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from helpers import TINY_MASKRCNN, prepared_instances
from jax.sharding import AxisType
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segjax import checkpoint, sharding, step
from segjax import config as config_lib
from segjax.data import synthetic
from segjax.instance import evaluation, fpn, maskrcnn, postprocess
from segjax.trainers import instance

DATA = synthetic.SyntheticShapesConfig(
    name='trainer_tiny', image_size=32, num_train=8, num_validation=5, min_objects=0,
    min_object_size=8, max_object_size=18)
CANVAS = 64  # the 32 px images resized x2, so the shapes meet FPN's 32 px anchors
NUM_CLASSES = len(synthetic.CLASS_NAMES)
TINY_MODEL = dict(TINY_MASKRCNN, num_classes=NUM_CLASSES, rpn_pre_nms_top_n_train=200,
                  rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n=100, rpn_post_nms_top_n=20,
                  box_batch_size_per_image=32, detections_per_image=10)
BATCH = 8


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
    return prepared_instances(DATA, tmp_path_factory.mktemp('tfds'))


def make_trainer(tx=None, **options):
    return instance.trainer(
        model=maskrcnn.MaskRCNN(**TINY_MODEL), tx=tx or optax.adam(1e-3), loss_fn=None,
        num_classes=NUM_CLASSES, ignore_index=255, image_shape=(1, CANVAS, CANVAS, 3),
        min_size=CANVAS, max_size=CANVAS, max_instances=4, **options)


def batches(builder, start_step=0, local_batch_size=BATCH):
    return instance.instance_train_batches(
        builder, split='train', local_batch_size=local_batch_size, seed=0,
        start_step=start_step, num_classes=NUM_CLASSES, min_size=CANVAS, max_size=CANVAS,
        height=CANVAS, width=CANVAS, max_instances=4, mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375))


def mesh_of(devices):
    return jax.make_mesh((len(devices),), (sharding.DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def jitted_step(trainer, mesh):
    """The step as train.py jits it (replicated state, data-sharded batch)."""
    return jax.jit(trainer.step,
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh),
                                 sharding.replicated(mesh)),
                   out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))


@pytest.fixture(scope='module')
def setup(builder):
    """A trainer, its initial state and its step jitted on 8 devices (compiled once)."""
    trainer = make_trainer()
    mesh = mesh_of(jax.devices())
    state = jax.jit(trainer.init)(jax.random.key(0))
    return trainer, mesh, state, jitted_step(trainer, mesh)


def test_batches_hold_the_targets_train_losses_takes(builder):
    batch = next(batches(builder))
    assert batch['image'].shape == (BATCH, CANVAS, CANVAS, 3)
    assert batch['image'].dtype == np.float32 and abs(batch['image'].mean()) < 3  # normalised
    assert batch['masks'].shape == (BATCH, 4, CANVAS, CANVAS)
    assert batch['boxes'].shape == (BATCH, 4, 4) and batch['valid'].shape == (BATCH, 4)
    np.testing.assert_array_equal(batch['image_size'], [[CANVAS, CANVAS]] * BATCH)
    labels = batch['labels'][batch['valid']]
    assert labels.size and labels.min() >= 1 and labels.max() < NUM_CLASSES
    # Every valid box is the tight box of its (resized, maybe flipped) mask, to a pixel.
    for image in range(BATCH):
        for row in np.flatnonzero(batch['valid'][image]):
            ys, xs = np.nonzero(batch['masks'][image, row])
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            np.testing.assert_allclose(batch['boxes'][image, row], tight, atol=1.01)


def test_resumed_batches_continue_the_stream(builder):
    stream = batches(builder, local_batch_size=3)
    [next(stream) for _ in range(4)]  # past an epoch of 8 examples: reshuffled order
    expected = next(stream)
    resumed = next(batches(builder, start_step=4, local_batch_size=3))
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


@pytest.mark.slow  # compiles the Mask R-CNN step: minutes on a loaded CPU
def test_loss_decreases_and_frozen_weights_stay(setup, builder):
    trainer, mesh, state, step_fn = setup
    batch = sharding.to_global(next(batches(builder)), mesh)
    rng = jax.random.key(1)
    initial = jax.device_get(state.params)
    losses = []
    for _ in range(8):
        state, stats = step_fn(state, batch, rng)
        losses.append(float(stats['loss']))
    assert all(np.isfinite(losses)) and int(state.skipped_steps) == 0
    assert set(stats) >= {'loss/objectness', 'loss/rpn_box_reg', 'loss/classifier',
                          'loss/box_reg', 'loss/mask', 'grad_norm'}
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    # Only what torchvision trains (3 stages: layer2..4, FPN, heads) moves; never BatchNorm.
    trained = fpn.trainable_mask(initial, 3)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), initial,
                         jax.device_get(state.params))
    assert jax.tree.leaves(moved) and moved == trained


@pytest.mark.slow  # compiles the Mask R-CNN step: minutes on a loaded CPU
def test_same_update_on_1_and_8_devices(setup, builder):
    # Plain SGD: an update linear in the gradient, so this compares gradients (Adam's first
    # step, lr * g / |g|, would magnify rounding where g ~ 0).
    trainer = make_trainer(tx=optax.sgd(0.01))
    state = jax.jit(trainer.init)(jax.random.key(0))
    host_batch = next(batches(builder))
    rng = jax.random.key(2)
    mesh8 = mesh_of(jax.devices())
    state8, stats8 = jitted_step(trainer, mesh8)(state, sharding.to_global(host_batch, mesh8),
                                                 rng)
    mesh1 = mesh_of(jax.devices()[:1])
    state1 = jax.device_put(jax.device_get(state), sharding.replicated(mesh1))
    state1, stats1 = jitted_step(trainer, mesh1)(
        state1, sharding.to_global(host_batch, mesh1), rng)
    for key in stats8:
        np.testing.assert_allclose(stats1[key], stats8[key], rtol=2e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state1.params), jax.device_get(state8.params))


@pytest.mark.slow  # compiles the Mask R-CNN step: minutes on a loaded CPU
def test_resume_from_a_checkpoint_is_exact(setup, builder, tmp_path):
    trainer, mesh, state, step_fn = setup
    rng = jax.random.key(3)
    stream = batches(builder)
    uninterrupted = state
    for _ in range(2):
        uninterrupted, _ = step_fn(uninterrupted, sharding.to_global(next(stream), mesh), rng)

    first, _ = step_fn(state, sharding.to_global(next(batches(builder)), mesh), rng)
    mngr = checkpoint.manager(str(tmp_path / 'checkpoints'))
    checkpoint.save(mngr, 1, first)
    mngr.wait_until_finished()
    abstract = checkpoint.abstract_with_shardings(
        jax.eval_shape(trainer.init, jax.random.key(0)),
        jax.tree.map(lambda _: sharding.replicated(mesh), first))
    restored = checkpoint.restore(mngr, abstract)
    mngr.close()
    assert int(restored.step) == 1
    resumed, _ = step_fn(restored, sharding.to_global(
        next(batches(builder, start_step=int(restored.step))), mesh), rng)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed),
                 jax.device_get(uninterrupted))


@pytest.mark.slow  # compiles the Mask R-CNN step twice: minutes on a loaded CPU
def test_fsdp_step_equals_the_replicated_step_with_ema(builder):
    # --config.sharding=fsdp and --config.ema_decay through this trainer: every leaf split
    # (min_bytes=0) gives the replicated update, to float rounding (reduce-scatter order).
    trainer = make_trainer(tx=optax.sgd(0.01, momentum=0.9), ema_decay=0.9)
    mesh = mesh_of(jax.devices())
    host_batch = next(batches(builder))
    rng = jax.random.key(4)
    results = {}
    for mode in ('replicated', 'fsdp'):
        state = jax.jit(trainer.init)(jax.random.key(0))
        shardings = sharding.state_shardings(mesh, state, mode, min_bytes=0)
        state = jax.device_put(state, shardings)
        step_fn = jax.jit(trainer.step, in_shardings=(shardings, sharding.batch_sharding(mesh),
                                                      sharding.replicated(mesh)),
                          out_shardings=(shardings, sharding.replicated(mesh)))
        for _ in range(2):
            state, stats = step_fn(state, sharding.to_global(host_batch, mesh), rng)
        results[mode] = state, stats
    sharded = results['fsdp'][0]
    kernels = [x for x in jax.tree.leaves(sharded.params) if x.ndim == 4 and x.shape[-1] % 8 == 0]
    assert kernels and all(x.sharding.spec != jax.sharding.PartitionSpec() for x in kernels)
    for key in results['replicated'][1]:
        np.testing.assert_allclose(results['fsdp'][1][key], results['replicated'][1][key],
                                   rtol=2e-4, atol=1e-6, err_msg=key)
    replicated, sharded = jax.device_get(results['replicated'][0]), jax.device_get(sharded)
    assert jax.tree.leaves(replicated.ema)  # EMA is on: its weights are compared too
    for tree in ('params', 'opt_state', 'ema'):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     getattr(replicated, tree), getattr(sharded, tree))


def test_trainer_rejects_unusable_settings():
    with pytest.raises(config_lib.ConfigError, match='leave config.loss.fn None'):
        instance.trainer(
            model=maskrcnn.MaskRCNN(**TINY_MODEL), tx=optax.adam(1e-3), loss_fn=lambda *a: 0,
            num_classes=NUM_CLASSES, ignore_index=255, image_shape=(1, 64, 64, 3))
    with pytest.raises(config_lib.ConfigError, match='multiples of 32'):
        instance.trainer(model=maskrcnn.MaskRCNN(**TINY_MODEL), tx=optax.adam(1e-3),
                         loss_fn=None, num_classes=NUM_CLASSES, ignore_index=255,
                         image_shape=(1, 48, 64, 3))
    with pytest.raises(config_lib.ConfigError, match='trainable_backbone_layers=7'):
        make_trainer(trainable_backbone_layers=7)


# COCO evaluation: the streamed path == pycocotools used directly on the same detections.

def fake_detections(builder, scale: float, seed: int = 0) -> list[dict]:
    """Per validation image, detections in the RESIZED frame (x `scale`): its ground-truth
    boxes jittered, some with a wrong class, plus two false positives; 28x28 mask
    probabilities: the true mask on the box's grid (a blob for the false positives)."""
    rng = np.random.default_rng(seed)
    out = []
    d = TINY_MODEL['detections_per_image']
    yy, xx = np.mgrid[:28, :28]
    blob = np.clip(1.2 - np.hypot(yy - 13.5, xx - 13.5) / 12, 0, 1).astype(np.float32)
    for example in tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False)):
        gt = example['instances']
        n = len(gt['label'])
        boxes = np.concatenate([gt['bbox'] + rng.normal(0, 1.0, (n, 4)),
                                rng.uniform(0, 24, (2, 2)).repeat(2, 1) + [0, 0, 8, 8]])
        labels = np.concatenate([np.where(rng.random(n) < 0.2, 1 + (gt['label'] % 7),
                                          gt['label']), [3, 5]])
        scores = rng.uniform(0.1, 1.0, n + 2)
        rows = np.zeros(d, bool)
        rows[:n + 2] = True
        pad = d - n - 2
        probs = np.broadcast_to(blob, (d, 28, 28)).copy()
        for k in range(n):  # the true mask sampled on the jittered box's 28x28 grid
            x1, y1, x2, y2 = boxes[k]
            ys = np.clip((y1 + (np.arange(28) + 0.5) * (y2 - y1) / 28).astype(int), 0, 31)
            xs = np.clip((x1 + (np.arange(28) + 0.5) * (x2 - x1) / 28).astype(int), 0, 31)
            probs[k] = 0.9 * gt['mask'][k][np.ix_(ys, xs)] + 0.05
        out.append({'boxes': np.pad(boxes * scale, [(0, pad), (0, 0)]).astype(np.float32),
                    'scores': np.pad(scores, (0, pad)).astype(np.float32),
                    'labels': np.pad(labels, (0, pad)).astype(np.int32), 'valid': rows,
                    'mask_probs': probs})
    return out


def test_streamed_coco_ap_equals_pycocotools(builder, tmp_path):
    detections = fake_detections(builder, scale=CANVAS / DATA.image_size)
    calls = iter(range(0, len(detections), 8))

    def detect_fn(variables, images, image_sizes):
        """The next 8 images' prepared detections (the split has 5: one padded batch)."""
        start = next(calls)
        rows = detections[start:start + 8]
        rows += [jax.tree.map(np.zeros_like, rows[0])] * (8 - len(rows))
        np.testing.assert_array_equal(np.asarray(image_sizes)[:len(detections)],
                                      [[CANVAS, CANVAS]] * len(detections))
        return jax.tree.map(lambda *x: np.stack(x), *rows)

    config = config_lib.defaults()
    config.data.num_classes, config.data.crop_size = NUM_CLASSES, (CANVAS, CANVAS)
    config.eval_batch_size = 8
    state = step.TrainState(step=0, params={}, batch_stats={}, opt_state=(), ema={},
                                     nonfinite_run=0, skipped_steps=0)
    ours = evaluation.coco_metrics_over_split(state, builder, config, mesh_of(jax.devices()),
                                              detect_fn=detect_fn, min_size=CANVAS,
                                              max_size=CANVAS)

    # Reference: files written independently and read by pycocotools' own loaders.
    images, annotations, results = [], [], []
    examples = tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False))
    size = DATA.image_size
    for image_id, (example, det) in enumerate(zip(examples, detections, strict=True), 1):
        images.append({'id': image_id, 'height': size, 'width': size})
        for box, label, mask, crowd in zip(*(example['instances'][k] for k in (
                'bbox', 'label', 'mask', 'is_crowd')), strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({
                'id': len(annotations) + 1, 'image_id': image_id, 'category_id': int(label),
                'bbox': [float(box[0]), float(box[1]), float(box[2] - box[0]),
                         float(box[3] - box[1])],
                'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()},
                'area': float(mask.sum()), 'iscrowd': int(crowd)})
        boxes = det['boxes'] / (CANVAS / size)
        masks = np.asarray(postprocess.paste_masks_in_image(
            det['mask_probs'], boxes, np.array([size, size]), (size, size))) > 0.5
        for k in np.flatnonzero(det['valid']):
            x1, y1, x2, y2 = map(float, boxes[k])
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            results.append({'image_id': image_id, 'category_id': int(det['labels'][k]),
                            'score': float(det['scores'][k]), 'bbox': [x1, y1, x2 - x1, y2 - y1],
                            'segmentation': {'size': rle['size'],
                                             'counts': rle['counts'].decode()}})
    gt_file, dt_file = tmp_path / 'gt.json', tmp_path / 'dt.json'
    gt_file.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': [
        {'id': c} for c in range(1, NUM_CLASSES)]}))
    dt_file.write_text(json.dumps(results))
    coco = COCO(str(gt_file))
    for iou_type in ('bbox', 'segm'):
        ev = COCOeval(coco, coco.loadRes(str(dt_file)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        expected = dict(zip(('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'), ev.stats[:6],
                            strict=True))
        for name, value in expected.items():
            assert ours[f'{iou_type}/{name}'] == pytest.approx(value, abs=1e-12), (iou_type, name)
        assert 0.05 < expected['AP'] < 0.999  # a real ranking, neither trivial nor perfect


# The whole loop and the evaluate CLI, on the registered smoke instances data.

SMOKE_OVERRIDES = [
    '--config.data.builder_config=smoke', '--config.data.crop_size=(64, 64)',
    '--config.trainer.min_size=64', '--config.trainer.max_size=64', '--config.batch_size=8',
    '--config.eval_batch_size=8', '--config.log_every=2', '--config.eval_every=0',
    '--config.checkpoint_every=2', '--config.model.fpn_channels=16',
    '--config.model.representation_size=32', '--config.model.mask_layers=(16,)',
    '--config.model.mask_dim_reduced=16', '--config.model.rpn_post_nms_top_n_train=50',
    '--config.model.rpn_post_nms_top_n=20', '--config.model.box_batch_size_per_image=32',
    '--config.model.detections_per_image=10']
EXPERIMENT = 'experiments/maskrcnn_r50_fpn_synthetic.py'


@pytest.mark.slow  # whole CLI runs / int8 conversions: minutes; by hand with -m long
@pytest.mark.long
def test_train_resume_and_evaluate_cli(tmp_path, e2e_data):
    from helpers import restored_state
    from test_end_to_end import run_cli

    overrides = [*SMOKE_OVERRIDES, f'--config.data.data_dir={e2e_data}']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    run = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', straight,
                  *overrides, '--config.num_steps=4')
    assert 'loss/mask' not in run.stdout and '| mask ' in run.stdout, run.stdout
    assert 'segm/AP50' in run.stdout and ' acc ' not in run.stdout
    metrics = json.loads((straight / 'metrics.json').read_text())
    assert metrics['step'] == 4 and {'bbox/AP', 'segm/AP50'} <= set(metrics)

    run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', resumed, *overrides,
            '--config.num_steps=2')
    run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', resumed, *overrides,
            '--config.num_steps=4')
    a = restored_state(EXPERIMENT, straight, [*overrides, '--config.num_steps=4'])
    b = restored_state(EXPERIMENT, resumed, [*overrides, '--config.num_steps=4'])
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)

    run = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', straight, *overrides,
                  '--config.num_steps=4')
    written = json.loads((straight / 'eval' / 'metrics.json').read_text())
    assert written['step'] == 4 and 'segm' in run.stdout and 'AP50' in run.stdout
    for key in ('bbox/AP', 'bbox/AP50', 'segm/AP', 'segm/AP50'):
        assert written[key] == pytest.approx(metrics[key], abs=1e-9), key


def test_experiments_load_and_name_what_they_train():
    config = config_lib.load(EXPERIMENT)
    assert config.trainer.fn is instance.trainer and config.loss.fn is None
    assert config.model.fn is maskrcnn.MaskRCNN
