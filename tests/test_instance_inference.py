"""Mask R-CNN inference on images of any size (segjax.instance.inference), the instance overlay
(segjax.instance.visualize) and `segjax.predict` for an instance experiment; torchvision is the
oracle where installed (its resize, its whole eval forward)."""

import json
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    numpy_state_dict,
    spread_scores,
    torch_maskrcnn_resnet18,
    variables_from_torch,
)
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.instance import inference
from segjax.instance.boxes import box_iou, large_enough
from segjax.instance.maskrcnn import MaskRCNN
from segjax.instance.visualize import draw_instances, instance_colors, mask_outline

SIZES = [(1, 1), (3, 500), (480, 640), (640, 480), (600, 800), (800, 600), (333, 1000),
         (1080, 1920), (427, 640), (612, 612), (37, 53), (800, 1333), (1333, 800), (799, 1201)]


# --------------------------------------------------------------------------------------------
# Resize, normalise, pad.

def test_resized_size_matches_torchvision_and_the_training_transform(tv):
    """Equal to torchvision's size, and so is the training transform's tf twin (float64 as
    torchvision: in float32 it floored 63.99999 for 64 at 427 x 640, 64 / 96)."""
    torch, _ = tv
    from torchvision.models.detection.transform import _resize_image_and_masks

    from segjax.data.instance_transforms import resized_size as tf_resized_size
    for (min_size, max_size) in ((800, 1333), (64, 96), (128, 128)):
        for h, w in SIZES:
            ours = inference.resized_size(h, w, min_size=min_size, max_size=max_size)
            # torchvision computes the size from the shape alone; a 1-channel image is enough.
            try:
                resized, _ = _resize_image_and_masks(torch.zeros(1, h, w), min_size, max_size)
            except RuntimeError:  # a side floors to 0: torchvision fails, we keep 1 pixel
                assert min(ours) == 1 and min(h, w) * max_size < max(h, w), (h, w, ours)
            else:
                assert ours == tuple(resized.shape[-2:]), (h, w, min_size, max_size)
            training = tuple(int(s) for s in tf_resized_size([h, w], min_size=min_size,
                                                             max_size=max_size).numpy())
            assert ours == training, (h, w, min_size, max_size, ours, training)


@pytest.mark.parametrize('size', [(37, 53), (120, 90), (64, 96), (5, 3)])
def test_resize_bilinear_matches_torch_interpolate(tv, size):
    torch, _ = tv
    image = np.random.default_rng(0).normal(size=(64, 96, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image.transpose(2, 0, 1))[None], size=size, mode='bilinear',
        align_corners=False)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(inference.resize_bilinear(image, size), expected, atol=1e-5)


def test_prepare_images_resizes_normalises_and_pads():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 30, 3), np.uint8),
              rng.integers(0, 256, (20, 50, 3), np.uint8)]
    prepared = inference.prepare_images(images, min_size=64, max_size=80, mean=(10, 20, 30),
                                        std=(2, 4, 8))
    # 40x30 -> scale min(64/30, 80/40) = 2 -> 80x60; 20x50 -> min(64/20, 80/50) = 1.6 -> 32x80.
    np.testing.assert_array_equal(prepared.image_sizes, [[80, 60], [32, 80]])
    np.testing.assert_array_equal(prepared.original_sizes, [[40, 30], [20, 50]])
    assert prepared.images.shape == (2, 96, 96, 3)  # ceil32 of (80, 80)
    assert not prepared.images[0, 80:].any() and not prepared.images[0, :, 60:].any()
    assert not prepared.images[1, 32:].any()
    # A constant image stays that constant, normalised.
    flat = inference.prepare_images([np.full((7, 9, 3), 50, np.uint8)], min_size=14,
                                    max_size=100, mean=(10, 20, 30), std=(2, 4, 8))
    h, w = flat.image_sizes[0]
    assert (h, w) == (14, 18)
    np.testing.assert_allclose(flat.images[0, :h, :w], np.broadcast_to([20, 7.5, 2.5],
                                                                       (h, w, 3)), rtol=1e-6)
    fixed = inference.prepare_images(images, min_size=64, max_size=80, canvas=(96, 128))
    assert fixed.images.shape == (2, 96, 128, 3)
    with pytest.raises(ValueError, match=r'larger than the canvas \(64, 64\)'):
        inference.prepare_images(images, min_size=64, max_size=80, canvas=(64, 64))
    with pytest.raises(ValueError, match='multiples of 32'):
        inference.prepare_images(images, min_size=64, max_size=80, canvas=(100, 96))


@pytest.mark.parametrize('shape', [(40, 30), (20, 50), (64, 64), (427, 640), (7, 9)])
def test_evaluation_sees_the_input_predict_sees(shape):
    """segjax.evaluate's tf input (evaluation.model_inputs) equals segjax.predict's numpy one
    (prepare_images, torchvision's resize): no uint8 rounding between resize and normalise."""
    from segjax.instance import evaluation

    image = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), np.uint8)
    options = {'min_size': 64, 'max_size': 96, 'mean': (10, 20, 30), 'std': (2, 4, 8)}
    prepared = inference.prepare_images([image], canvas=(96, 96), **options)
    evaluated = evaluation.model_inputs(image, height=96, width=96, **options)
    np.testing.assert_array_equal(evaluated['image_size'].numpy(), prepared.image_sizes[0])
    np.testing.assert_allclose(evaluated['image'].numpy(), prepared.images[0], atol=2e-4)


# --------------------------------------------------------------------------------------------
# Bad input.

def _png(path, width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> str:
    """A PNG file written by hand (Pillow cannot write 16-bit RGB or empty images)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
    header = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                     + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
    return str(path)


def test_bad_images_are_clear_errors_naming_the_file(tmp_path):
    rgba = tmp_path / 'rgba.png'
    Image.fromarray(np.zeros((4, 5, 4), np.uint8)).save(rgba)
    gray16 = tmp_path / 'gray16.png'
    Image.fromarray(np.zeros((4, 5), np.uint16)).save(gray16)
    rgb16 = _png(tmp_path / 'rgb16.png', 2, 2, 16, 2, (b'\0' + bytes(12)) * 2)
    empty = _png(tmp_path / 'empty.png', 0, 0, 8, 2, b'')
    for path, message in ((rgba, '4 channels'), (gray16, '16-bit'), (rgb16, '16-bit'),
                          (empty, 'cannot read')):
        with pytest.raises(ValueError, match=message) as error:
            inference.read_image(str(path))
        assert str(path) in str(error.value)
    good = tmp_path / 'gray.png'
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(good)
    np.testing.assert_array_equal(inference.read_image(str(good)), np.full((4, 5, 3), 7))
    for array, message in ((np.zeros((4, 5, 4), np.uint8), 'RGB image'),
                           (np.zeros((4, 5, 3), np.uint16), '8-bit'),
                           (np.zeros((0, 5, 3), np.uint8), 'empty')):
        with pytest.raises(ValueError, match=message):
            inference.prepare_images([np.zeros((4, 4, 3), np.uint8), array], min_size=8,
                                     max_size=8)
        with pytest.raises(ValueError, match='image 1'):
            inference.prepare_images([np.zeros((4, 4, 3), np.uint8), array], min_size=8,
                                     max_size=8)


# --------------------------------------------------------------------------------------------
# Overlay and JSON record.

def test_overlay_gives_each_instance_its_own_colour():
    colors = instance_colors(300)
    assert len({tuple(c) for c in colors}) == 300
    image = np.full((40, 60, 3), 100, np.uint8)
    masks = np.zeros((3, 40, 60), np.float32)
    masks[0, 20:30, 5:15] = 0.9
    masks[1, 20:30, 25:35] = 0.8
    masks[2, 20:30, 45:55] = 0.6
    masks[2, 0:2, 0:2] = 0.4  # below the threshold: not drawn
    boxes = np.array([[5, 20, 15, 30], [25, 20, 35, 30], [45, 20, 55, 30]], np.float32)
    out = draw_instances(image, boxes, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7]), masks,
                         ['background', 'circle', 'square'])
    assert out.shape == image.shape and out.dtype == np.uint8
    centres = [tuple(out[25, x]) for x in (10, 30, 50)]
    assert len(set(centres)) == 3
    expected = np.rint(0.5 * 100 + 0.5 * colors[:3].astype(np.float64))
    np.testing.assert_array_equal(np.asarray(centres), expected)
    # Outlines and boxes in the instance's own colour; untouched background stays.
    np.testing.assert_array_equal(out[25, 5], colors[0])
    np.testing.assert_array_equal(out[25, 54], colors[2])
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])
    # Captions are drawn above the boxes (rows 20 - text height .. 19).
    assert (out[5:20, 5:60] != 100).any()
    plain = draw_instances(image, boxes, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7]), masks,
                           [], captions=False)
    assert (plain[5:19] == 100).all()
    outline = mask_outline(masks[0] > 0.5)
    assert outline.sum() == 36 and not outline[21:29, 6:14].any()


def test_detections_record_is_json_with_rle_masks():
    masks = np.zeros((2, 8, 10), np.float32)
    masks[0, 1:4, 2:6] = 0.7
    masks[1, 5:8, 0:3] = 0.2
    masks[1, 6, 1] = 0.9
    detections = {'boxes': np.array([[2, 1, 6, 4], [0, 5, 3, 8]], np.float32),
                  'scores': np.array([0.9, 0.4], np.float32),
                  'labels': np.array([3, 1]), 'masks': masks}
    record = json.loads(json.dumps(inference.detections_record(
        detections, ['bg', 'one', 'two', 'three'], (8, 10), image='x.png')))
    assert (record['image'], record['height'], record['width']) == ('x.png', 8, 10)
    first, second = record['detections']
    assert first['class_name'] == 'three' and second['class_name'] == 'one'
    assert first['box'] == [2.0, 1.0, 6.0, 4.0] and first['score'] == pytest.approx(0.9)
    for row, mask in zip(record['detections'], masks, strict=True):
        decoded = mask_utils.decode({'size': row['mask']['size'],
                                     'counts': row['mask']['counts'].encode()})
        np.testing.assert_array_equal(decoded, mask > 0.5)


# --------------------------------------------------------------------------------------------
# Against torchvision's whole eval forward.

def _compare_detections(ours: dict, theirs: dict, image_size) -> dict:
    """Asserts the same detections (labels, scores to 1e-4, boxes IoU > 0.99) and returns the
    mask pixel agreement."""
    count = len(theirs['scores'])
    assert len(ours['scores']) == count and count >= 3
    np.testing.assert_array_equal(ours['labels'], theirs['labels'].numpy())
    np.testing.assert_allclose(ours['scores'], theirs['scores'].numpy(), atol=1e-4)
    expected_boxes = theirs['boxes'].numpy()
    iou = np.diag(np.asarray(box_iou(jnp.asarray(ours['boxes']), jnp.asarray(expected_boxes))))
    sized = np.asarray(large_enough(jnp.asarray(expected_boxes), 1.0))
    assert sized.sum() >= 2 and iou[sized].min() > 0.99, iou
    np.testing.assert_allclose(ours['boxes'], expected_boxes, atol=2e-2)
    assert ours['masks'].shape == (count, *image_size)
    ours_masks, torch_masks = ours['masks'] > 0.5, theirs['masks'][:, 0].numpy() > 0.5
    agreement = float((ours_masks == torch_masks).mean())
    assert torch_masks.any() and agreement > 0.999
    return {'detections': count, 'min_iou': float(iou[sized].min()),
            'mask_agreement': agreement,
            'max_prob_diff': float(np.abs(ours['masks'] - theirs['masks'][:, 0].numpy()).max())}


def _parity(torch, torch_model, ours: MaskRCNN, images, min_size, max_size):
    torch_model.transform.min_size, torch_model.transform.max_size = (min_size,), max_size
    prepared = inference.prepare_images(images, min_size=min_size, max_size=max_size)
    variables = variables_from_torch(ours, jnp.asarray(prepared.images),
                                     numpy_state_dict(torch_model))
    with torch.no_grad():
        expected = torch_model([torch.from_numpy(i.transpose(2, 0, 1) / np.float32(255))
                                for i in images])
        batch, _ = torch_model.transform([torch.from_numpy(i.transpose(2, 0, 1) / np.float32(255))
                                          for i in images])
    # The same resized sizes and the same padded batch as torchvision's transform.
    assert [tuple(s) for s in prepared.image_sizes.tolist()] == batch.image_sizes
    assert prepared.images.shape[1:3] == tuple(batch.tensors.shape[-2:])
    np.testing.assert_allclose(prepared.images, batch.tensors.numpy().transpose(0, 2, 3, 1),
                               atol=1e-4)
    results = inference.detect_images(ours, variables, images, min_size=min_size,
                                      max_size=max_size)
    for b, (result, reference, image) in enumerate(zip(results, expected, images, strict=True)):
        print(f'image {b} {image.shape[:2]}:',
              _compare_detections(result, reference, image.shape[:2]))


@pytest.mark.slow
def test_inference_on_two_sizes_matches_torchvision_resnet18(tv):
    """A small torchvision MaskRCNN (ResNet-18-FPN, 5 classes): two images of different sizes
    and aspect ratios, both resized (one up, one down) and padded together."""
    torch, _ = tv
    torch.manual_seed(0)
    torch_model = torch_maskrcnn_resnet18(min_size=64, max_size=96, rpn_post_nms_top_n_test=200,
                                          box_detections_per_img=30).eval()
    spread_scores(torch, torch_model)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (50, 70, 3), np.uint8),
              rng.integers(0, 256, (120, 90, 3), np.uint8)]
    ours = MaskRCNN(num_classes=5, depth=18, rpn_post_nms_top_n=200, detections_per_image=30)
    _parity(torch, torch_model, ours, images, 64, 96)


@pytest.mark.slow
@pytest.mark.long
def test_inference_on_two_sizes_matches_torchvision_resnet50(tv):
    """torchvision's maskrcnn_resnet50_fpn (random init, scaled heads) on a 100 x 150 and a
    180 x 120 image, resized by min_size 128 / max_size 160."""
    torch, torchvision = tv
    torch.manual_seed(0)
    torch_model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).eval()
    spread_scores(torch, torch_model, feature_scale=0.003)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (100, 150, 3), np.uint8),
              rng.integers(0, 256, (180, 120, 3), np.uint8)]
    _parity(torch, torch_model, MaskRCNN(), images, 128, 160)


# --------------------------------------------------------------------------------------------
# segjax.predict on an instance experiment.

EXPERIMENT = 'experiments/maskrcnn_r50_fpn_synthetic.py'
TINY = ['--config.model.fpn_channels=16', '--config.model.representation_size=32',
        '--config.model.mask_layers=(16,)', '--config.model.mask_dim_reduced=16',
        '--config.data.crop_size=(64,64)', '--config.trainer.min_size=64',
        '--config.trainer.max_size=64', '--config.model.rpn_post_nms_top_n=50',
        '--config.model.detections_per_image=10']


def _tiny_checkpoint(workdir) -> None:
    """A random-init MaskRCNN state of the synthetic experiment (TINY overrides), written as
    segjax.train would; class 1's logit raised so the random network detects."""
    from segjax import checkpoint, config, experiment, optim, sharding
    cfg = config.load(EXPERIMENT, [item.removeprefix('--config.') for item in TINY])
    model = experiment.make_model(cfg)
    tx, _ = optim.make(cfg)
    init, _ = experiment.initial_state(experiment.make_trainer(cfg, model, tx),
                                       sharding.make_mesh(), cfg)
    state = init(jax.random.key(0))
    params = jax.tree.map(lambda x: x, state.params)  # a new nested dict, same arrays
    bias = params['box_predictor']['cls_score']['bias']
    params['box_predictor']['cls_score']['bias'] = bias.at[1].add(6.0)
    mngr = checkpoint.manager(experiment.checkpoint_dir(str(workdir)))
    checkpoint.save(mngr, 0, state.replace(params=params))
    mngr.wait_until_finished()


@pytest.mark.slow  # whole CLI runs / int8 conversions: minutes; by hand with -m long
@pytest.mark.long
def test_predict_writes_instance_png_and_json(tmp_path, capsys):
    from segjax import predict
    from segjax.data import synthetic
    _tiny_checkpoint(tmp_path / 'run')
    inputs = tmp_path / 'images'
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {'wide': (48, 80), 'square': (64, 64)}
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(inputs / f'{name}.png')
    out = tmp_path / 'out'
    args = ['--config', EXPERIMENT, '--workdir', str(tmp_path / 'run'), '--input', str(inputs),
            '--output', str(out), *TINY]
    assert sorted(predict.main(args)) == ['square', 'wide']
    for name, (height, width) in sizes.items():
        overlay = np.asarray(Image.open(out / f'{name}_instances.png'))
        assert overlay.shape == (height, width, 3)
        record = json.loads((out / f'{name}_detections.json').read_text())
        assert (record['image'], record['height'], record['width']) == (f'{name}.png', height,
                                                                         width)
        rows = record['detections']
        assert 1 <= len(rows) <= 10
        for row in rows:
            assert row['class_name'] == synthetic.CLASS_NAMES[row['label']]
            x1, y1, x2, y2 = row['box']
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
            assert 0.05 < row['score'] <= 1
            mask = mask_utils.decode({'size': row['mask']['size'],
                                      'counts': row['mask']['counts'].encode()})
            assert mask.shape == (height, width)
        scores = [row['score'] for row in rows]
        assert scores == sorted(scores, reverse=True)
        original = np.asarray(Image.open(inputs / f'{name}.png'))
        assert (overlay != original).any()  # something was drawn

    # A 4-channel image: a clear error naming the file, before any output.
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(inputs / 'alpha.png')
    with pytest.raises(SystemExit):
        predict.main(args)
    assert 'alpha.png: 4 channels' in capsys.readouterr().err
