"""Instance data (segjax.data.instances), its transforms and COCO AP (segjax.instance.coco_eval)."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import instance_transforms as it
from segjax.data import instances, synthetic

mask_utils = pytest.importorskip('pycocotools.mask')
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from segjax.instance import coco_eval  # noqa: E402

TINY = synthetic.SyntheticShapesConfig(name='tiny', image_size=24, num_train=3, num_validation=6,
                                       min_objects=0, max_objects=4, min_object_size=8,
                                       max_object_size=18, seed=5)
# Big shapes, many of them, on a small image: some shapes end up fully hidden.
CROWDED = synthetic.SyntheticShapesConfig(name='crowded', image_size=16, min_objects=6,
                                          max_objects=8, min_object_size=12, max_object_size=20)
NUM_CLASSES = len(synthetic.CLASS_NAMES)


def _drawn_count(config, split_id: int, index: int) -> int:
    """How many shapes the generator draws for an example (replays its first rng draws)."""
    rng = np.random.default_rng([config.seed, split_id, index])
    synthetic._texture(rng, config.image_size, config.texture_strength)
    return int(rng.integers(config.min_objects, config.max_objects + 1))


# ----------------------------------------------------------------------------------------------
# Generator and builder.


@pytest.mark.parametrize('config', [TINY, CROWDED])
def test_instances_are_the_visible_parts_of_the_semantic_shapes(config):
    dropped = 0
    for index in range(12):
        example = instances.generate_instances(config, 0, index)
        image, label = synthetic.generate_example(config, 0, index)
        np.testing.assert_array_equal(example['image'], image)
        inst = example['instances']
        masks = inst['mask'].astype(bool)
        # Visible masks are disjoint, non-empty, and painting them gives the semantic labels.
        assert (masks.sum(0) <= 1).all()
        assert masks.any(axis=(1, 2)).all()
        painted = (masks * inst['label'][:, None, None]).sum(0)
        np.testing.assert_array_equal(painted, label)
        # Boxes: the masks' tight boxes, as pycocotools computes them (x, y, w, h -> x2, y2).
        for mask, box in zip(masks, inst['bbox'], strict=True):
            x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask, np.uint8)))
            np.testing.assert_array_equal(box, [x, y, x + w, y + h])
        assert inst['label'].dtype == np.int64 and inst['bbox'].dtype == np.float32
        assert not inst['is_crowd'].any()
        dropped += _drawn_count(config, 0, index) - len(masks)
    if config is CROWDED:
        assert dropped > 0  # the fully hidden shapes were dropped, not kept with zero area


def test_builder_round_trip_with_empty_images(tmp_path):
    builder = instances.SyntheticInstances(config=TINY, data_dir=str(tmp_path))
    builder.download_and_prepare()
    examples = sorted(tfds.as_numpy(builder.as_dataset(split='validation')),
                      key=lambda ex: ex['image/filename'])
    assert len(examples) == TINY.num_validation
    counts = []
    for index, example in enumerate(examples):
        expected = instances.generate_instances(TINY, 1, index)
        np.testing.assert_array_equal(example['image'], expected['image'])
        for key, value in expected['instances'].items():
            assert example['instances'][key].dtype == value.dtype, key
            np.testing.assert_array_equal(example['instances'][key], value, err_msg=key)
        counts.append(len(example['instances']['label']))
    assert 0 in counts and max(counts) > 1, counts  # TINY's seed has negative examples
    assert examples[counts.index(0)]['instances']['mask'].shape == (0, 24, 24)


# ----------------------------------------------------------------------------------------------
# Transforms.


def _example(boxes, labels, masks, crowd=None) -> dict:
    """A flat instance example (tf tensors) on a 20x30 image."""
    n = len(labels)
    return {'image': tf.constant(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)),
            'boxes': tf.constant(np.array(boxes, np.float32).reshape(n, 4)),
            'labels': tf.constant(labels, tf.int32),
            'masks': tf.constant(np.array(masks, np.uint8).reshape(n, 20, 30)),
            'is_crowd': tf.constant(np.zeros(n, bool) if crowd is None else crowd)}


def _rect_mask(x1, y1, x2, y2, shape=(20, 30)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def test_resize_keeps_aspect_and_scales_boxes_and_masks():
    # scale = min(40 / 20, 50 / 30) = 5/3 -> floor(20 * 5/3, 30 * 5/3) = (33, 50)
    example = _example([[3, 6, 9, 12]], [2], [_rect_mask(3, 6, 9, 12)])
    out = it.resize_min_max(example, min_size=40, max_size=50)
    assert out['image'].shape == (33, 50, 3) and out['masks'].shape == (1, 33, 50)
    assert out['masks'].dtype == tf.uint8
    np.testing.assert_allclose(out['boxes'].numpy(), [[3 * 50 / 30, 6 * 33 / 20, 9 * 50 / 30,
                                                       12 * 33 / 20]], rtol=1e-6)
    # Nearest-neighbour mask: its tight box is the scaled box to within a pixel.
    mask = out['masks'].numpy()[0].astype(bool)
    np.testing.assert_allclose(instances.mask_to_box(mask), out['boxes'].numpy()[0], atol=1.0)
    # Short side limited: scale = min(10 / 20, 100 / 30) = 0.5
    assert it.resize_min_max(example, min_size=10, max_size=100)['image'].shape == (10, 15, 3)


def test_flip_moves_boxes_with_masks():
    masks = [_rect_mask(0, 0, 4, 5), _rect_mask(10, 3, 29, 20)]
    example = _example([instances.mask_to_box(m.astype(bool)) for m in masks], [1, 3], masks)
    out = it.flip_left_right(example)
    np.testing.assert_array_equal(out['image'].numpy(), example['image'].numpy()[:, ::-1])
    for mask, box in zip(out['masks'].numpy(), out['boxes'].numpy(), strict=True):
        np.testing.assert_array_equal(box, instances.mask_to_box(mask.astype(bool)))
    np.testing.assert_array_equal(out['boxes'].numpy()[0], [26, 0, 30, 5])
    # The random flip either flips or not, deterministically per seed, and both happen.
    flipped = [bool((it.random_flip(example, tf.constant([s, 0]))['boxes'].numpy()
                     != example['boxes'].numpy()).any()) for s in range(12)]
    assert any(flipped) and not all(flipped)
    again = [bool((it.random_flip(example, tf.constant([s, 0]))['boxes'].numpy()
                   != example['boxes'].numpy()).any()) for s in range(12)]
    assert flipped == again


def test_degenerate_boxes_and_crowd_are_dropped():
    boxes = [[1, 1, 5, 5], [4, 2, 4, 9], [2, 7, 8, 7], [3, 3, 2, 6], [0, 0, 30, 20]]
    masks = [_rect_mask(1, 1, 5, 5)] + [np.zeros((20, 30))] * 3 + [np.ones((20, 30))]
    example = _example(boxes, [1, 2, 3, 4, 5], masks, crowd=[False] * 4 + [True])
    out = it.drop_degenerate_boxes(example)
    np.testing.assert_array_equal(out['labels'].numpy(), [1, 5])
    np.testing.assert_array_equal(out['masks'].numpy()[0], masks[0])
    np.testing.assert_array_equal(it.drop_crowd(out)['labels'].numpy(), [1])


def test_label_check_names_the_value():
    example = _example([[1, 1, 5, 5], [2, 2, 6, 6]], [3, 9], [_rect_mask(1, 1, 5, 5)] * 2)
    it.check_instance_labels(example, num_classes=10)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r'1\.\.7.*\n?.*9'):
        it.check_instance_labels(example, num_classes=8)
    background = _example([[1, 1, 5, 5]], [0], [_rect_mask(1, 1, 5, 5)])
    with pytest.raises(tf.errors.InvalidArgumentError, match='background'):
        it.check_instance_labels(background, num_classes=8)


def test_pad_to_fixed_shapes_and_errors():
    example = _example([[1, 1, 5, 5], [2, 2, 6, 6]], [3, 4], [_rect_mask(1, 1, 5, 5)] * 2)
    out = it.pad_to_fixed(example, height=32, width=32, max_instances=5)
    assert out['image'].shape == (32, 32, 3) and out['masks'].shape == (5, 32, 32)
    np.testing.assert_array_equal(out['valid'].numpy(), [True, True, False, False, False])
    np.testing.assert_array_equal(out['labels'].numpy(), [3, 4, 0, 0, 0])
    np.testing.assert_array_equal(out['image_size'].numpy(), [20, 30])
    assert out['masks'].numpy()[:, 20:].sum() == 0 and out['boxes'].numpy()[2:].sum() == 0
    with pytest.raises(tf.errors.InvalidArgumentError, match='max_instances=1'):
        it.pad_to_fixed(example, height=32, width=32, max_instances=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match='pad size'):
        it.pad_to_fixed(example, height=16, width=32, max_instances=5)


def test_train_transform_in_tf_data_including_empty_images():
    examples = [instances.generate_instances(TINY, 1, i) for i in range(TINY.num_validation)]
    assert any(len(ex['instances']['label']) == 0 for ex in examples)
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={'image': tf.TensorSpec([24, 24, 3], tf.uint8), 'instances': {
            'bbox': tf.TensorSpec([None, 4], tf.float32), 'label': tf.TensorSpec([None], tf.int64),
            'mask': tf.TensorSpec([None, 24, 24], tf.uint8),
            'is_crowd': tf.TensorSpec([None], tf.bool)}})
    dataset = dataset.map(lambda ex: it.instance_train_transform(
        ex, tf.constant([0, 1]), num_classes=NUM_CLASSES, min_size=32, max_size=40, height=32,
        width=32, max_instances=4)).batch(3)
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 2
    for batch in batches:
        assert batch['masks'].shape == (3, 4, 32, 32) and batch['image'].shape == (3, 32, 32, 3)
    valid = np.concatenate([b['valid'] for b in batches])
    np.testing.assert_array_equal(valid.sum(1), [len(ex['instances']['label']) for ex in examples])
    labels = np.concatenate([b['labels'] for b in batches])
    assert ((labels >= 1) == valid).all()


# ----------------------------------------------------------------------------------------------
# COCO evaluation.


def _gt_instances(masks, labels, crowd=None) -> dict:
    masks = np.array(masks, np.uint8)
    return {'bbox': np.array([instances.mask_to_box(m.astype(bool)) for m in masks],
                             np.float32).reshape(-1, 4),
            'label': np.array(labels, np.int64), 'mask': masks,
            'is_crowd': np.zeros(len(labels), bool) if crowd is None else np.array(crowd)}


def _two_object_image():
    a = _rect_mask(2, 2, 12, 10, (32, 32))
    b = _rect_mask(15, 14, 30, 30, (32, 32))
    return _gt_instances([a, b], [1, 2])


def _evaluate(gt, detections: dict, num_classes: int = 3) -> dict:
    evaluator = coco_eval.CocoEvaluator(num_classes=num_classes)
    evaluator.add_ground_truth(1, gt, (32, 32))
    evaluator.add_detections(1, **detections)
    return evaluator.summarize()


def test_perfect_detections_give_ap_one():
    gt = _two_object_image()
    metrics = _evaluate(gt, {'boxes': gt['bbox'], 'scores': np.array([0.9, 0.8]),
                             'labels': gt['label'], 'masks': gt['mask'] * 0.9})
    for key in ('bbox/AP', 'bbox/AP50', 'bbox/AP75', 'segm/AP', 'segm/AP50', 'segm/AP75'):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics['bbox/APl'] == -1.0  # no large (> 96^2 px) ground truth: COCO's -1


def test_wrong_class_detection_hand_computed_ap():
    # Class 1: a wrong-class detection (the class-2 object, called 1) outranks the true one:
    # precision 0.5 at every recall -> AP 0.5. Class 2: never detected -> 0. Mean 0.25.
    gt = _two_object_image()
    boxes = gt['bbox'][::-1]
    masks = gt['mask'][::-1].astype(np.float32)
    metrics = _evaluate(gt, {'boxes': boxes, 'scores': np.array([0.9, 0.8]),
                             'labels': np.array([1, 1]), 'masks': masks})
    assert metrics['bbox/AP'] == pytest.approx(0.25)
    assert metrics['segm/AP50'] == pytest.approx(0.25)
    # Padding rows (valid False) are ignored: only the true detection is left -> AP 0.5.
    metrics = _evaluate(gt, {'boxes': boxes, 'scores': np.array([0.9, 0.8]),
                             'labels': np.array([1, 1]), 'masks': masks,
                             'valid': np.array([False, True])})
    assert metrics['bbox/AP'] == pytest.approx(0.5) and metrics['segm/AP'] == pytest.approx(0.5)


def test_empty_detections_give_zero():
    metrics = _evaluate(_two_object_image(), {'boxes': np.zeros((0, 4)), 'scores': np.zeros(0),
                                              'labels': np.zeros(0, int),
                                              'masks': np.zeros((0, 32, 32))})
    assert all(v in (0.0, -1.0) for v in metrics.values()) and metrics['bbox/AP'] == 0.0


def test_crowd_ground_truth_is_ignored_not_missed():
    a, b = _rect_mask(2, 2, 12, 10, (32, 32)), _rect_mask(15, 14, 30, 30, (32, 32))
    gt = _gt_instances([a, b], [1, 1], crowd=[False, True])
    # Detecting only the non-crowd object: recall 1 (the crowd one is not a miss).
    metrics = _evaluate(gt, {'boxes': gt['bbox'][:1], 'scores': np.array([0.9]),
                             'labels': np.array([1]), 'masks': gt['mask'][:1]})
    assert metrics['bbox/AP'] == pytest.approx(1.0) and metrics['segm/AP'] == pytest.approx(1.0)


def _direct_pycocotools(gt_per_image, dets_per_image, tmp_path, iou_type):
    """The same evaluation written straight against pycocotools (JSON files, its own loaders)."""
    images, annotations, results = [], [], []
    for image_id, gt in enumerate(gt_per_image, start=1):
        images.append({'id': image_id, 'height': 32, 'width': 32})
        for mask, label, crowd in zip(gt['mask'], gt['label'], gt['is_crowd'], strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle['counts'] = rle['counts'].decode()
            annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                                'category_id': int(label), 'segmentation': rle,
                                'area': float(mask.sum()), 'iscrowd': int(crowd),
                                'bbox': mask_utils.toBbox(rle).tolist()})
    for image_id, det in enumerate(dets_per_image, start=1):
        for box, score, label, mask in zip(det['boxes'], det['scores'], det['labels'],
                                           det['masks'], strict=True):
            entry = {'image_id': image_id, 'category_id': int(label), 'score': float(score)}
            if iou_type == 'bbox':
                x1, y1, x2, y2 = map(float, box)
                entry['bbox'] = [x1, y1, x2 - x1, y2 - y1]
            else:
                rle = mask_utils.encode(np.asfortranarray((mask > 0.5).astype(np.uint8)))
                entry['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode()}
            results.append(entry)
    gt_file, res_file = tmp_path / 'gt.json', tmp_path / f'{iou_type}.json'
    gt_file.write_text(json.dumps({'images': images, 'annotations': annotations,
                                   'categories': [{'id': c} for c in range(1, NUM_CLASSES)]}))
    res_file.write_text(json.dumps(results))
    coco = COCO(str(gt_file))
    evaluator = COCOeval(coco, coco.loadRes(str(res_file)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[:6]


def test_segjax_ap_equals_pycocotools_directly(tmp_path):
    rng = np.random.default_rng(0)
    config = synthetic.SyntheticShapesConfig(name='eval', image_size=32, min_objects=0,
                                             max_objects=4, min_object_size=8,
                                             max_object_size=24)
    gts, dets = [], []
    evaluator = coco_eval.CocoEvaluator(num_classes=NUM_CLASSES)
    for index in range(10):
        gt = instances.generate_instances(config, 0, index)['instances']
        if index == 3:
            gt['is_crowd'][:1] = True
        n = len(gt['label'])
        # Noisy detections: jittered boxes and masks, some wrong classes, plus false positives.
        boxes = np.concatenate([gt['bbox'] + rng.normal(0, 1.5, (n, 4)),
                                rng.uniform(0, 16, (2, 4)) + [0, 0, 16, 16]]).astype(np.float32)
        masks = np.concatenate([gt['mask'] * rng.uniform(0.3, 1, (n, 32, 32)),
                                rng.uniform(0, 1, (2, 32, 32))]).astype(np.float32)
        labels = np.concatenate([np.where(rng.uniform(size=n) < 0.2, 1, gt['label']),
                                 rng.integers(1, NUM_CLASSES, 2)])
        det = {'boxes': boxes, 'scores': rng.uniform(size=n + 2), 'labels': labels,
               'masks': masks}
        evaluator.add_ground_truth(index + 1, gt, (32, 32))
        evaluator.add_detections(index + 1, **det)
        gts.append(gt)
        dets.append(det)
    metrics = evaluator.summarize()
    for iou_type in ('bbox', 'segm'):
        direct = _direct_pycocotools(gts, dets, tmp_path, iou_type)
        ours = [metrics[f'{iou_type}/{name}'] for name in coco_eval.METRIC_NAMES]
        np.testing.assert_array_equal(ours, direct, err_msg=iou_type)
        assert 0.05 < ours[0] < 0.95, ours  # a case in between, not a trivial 0 or 1


def test_detections_at_original_size():
    outputs = {'boxes': np.array([[4.0, 8.0, 20.0, 24.0], [0, 0, 0, 0]], np.float32),
               'scores': np.array([0.9, 0.0]), 'labels': np.array([2, 0]),
               'valid': np.array([True, False]), 'mask_probs': np.ones((2, 28, 28), np.float32)}
    out = coco_eval.detections_at_original_size(outputs, (32, 32), (16, 24))
    np.testing.assert_allclose(out['boxes'][0], [3.0, 4.0, 15.0, 12.0])
    assert out['masks'].shape == (2, 16, 24)
    # A full mask lands on its box: thresholded, its tight box is the box (to a pixel).
    inside = out['masks'][0] > 0.5
    np.testing.assert_allclose(instances.mask_to_box(inside), out['boxes'][0], atol=1.0)
