"""COCO evaluation of an instance experiment over several processes
(segjax.instance.evaluation, coco_eval.CocoEvaluator.merged).

Each process evaluates its own slice of the split, numbering images as one process would; the
evaluators' exports, gathered and merged, hold exactly what one evaluator fed every image holds,
so the metrics are equal, not only close. (Slow) two processes x two CPU devices (gloo) give the
one-process metrics, and the same images, annotations and detections, of the same state.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import prepared_instances
from test_end_to_end import ROOT
from test_multihost import free_port

from segjax.data import synthetic
from segjax.instance import coco_eval, evaluation

DATA = synthetic.SyntheticShapesConfig(
    name='multihost_eval_tiny', image_size=32, num_train=4, num_validation=7, min_objects=0,
    min_object_size=8, max_object_size=18)


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
    return prepared_instances(DATA, tmp_path_factory.mktemp('tfds'))


def random_image(rng: np.random.Generator, size: int = 24) -> tuple[dict, dict]:
    """(instances, detections) of one image: 0-3 rectangles as ground truth; detections near
    them and one stray, scores from three values (ties across images: the order pycocotools
    sees matters), masks as full-size probabilities."""
    n = int(rng.integers(0, 4))
    corners = rng.integers(0, size // 2, (n, 2))
    boxes = np.concatenate([corners, corners + rng.integers(4, size // 2, (n, 2))], 1)
    masks = np.zeros((n, size, size), np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes, strict=True):
        mask[y1:y2, x1:x2] = 1
    gt = {'bbox': boxes.astype(np.float32), 'label': rng.integers(1, 4, n),
          'mask': masks, 'is_crowd': np.zeros(n, bool)}
    shifted = np.clip(np.concatenate([boxes + rng.integers(-2, 3, (n, 4)), [[1, 1, 9, 9]]]),
                      0, size)
    probabilities = np.zeros((n + 1, size, size), np.float32)
    for probability, (x1, y1, x2, y2) in zip(probabilities, shifted, strict=True):
        probability[y1:y2, x1:x2] = 0.9
    detections = {'boxes': shifted.astype(np.float32), 'scores': rng.choice([0.3, 0.6, 0.9], n + 1),
                  'labels': np.concatenate([gt['label'], [1]]), 'masks': probabilities}
    return gt, detections


def test_merged_exports_equal_one_evaluator_fed_every_image():
    rng = np.random.default_rng(0)
    images = [random_image(rng) for _ in range(12)]
    one = coco_eval.CocoEvaluator(num_classes=4)
    for image_id, (gt, detections) in enumerate(images, start=1):
        one.add_ground_truth(image_id, gt, (24, 24))
        one.add_detections(image_id, **detections)
    # Three "processes", each with an equal share of two parts (as tfds splits 'a+b'), so no
    # process holds one contiguous run of ids; each export through JSON, as gathered.
    shares = [[1, 2, 7, 8], [3, 4, 9, 10], [5, 6, 11, 12]]
    exports = []
    for share in shares:
        evaluator = coco_eval.CocoEvaluator(num_classes=4)
        for image_id in share:
            gt, detections = images[image_id - 1]
            evaluator.add_ground_truth(image_id, gt, (24, 24))
            evaluator.add_detections(image_id, **detections)
        exports.append(json.loads(json.dumps(evaluator.export())))
    merged = coco_eval.CocoEvaluator.merged(4, exports[::-1])  # any order of exports
    assert merged.export() == json.loads(json.dumps(one.export()))
    expected = one.summarize()
    assert 0.05 < expected['bbox/AP'] < 0.999 and 0.05 < expected['segm/AP'] < 0.999
    assert merged.summarize() == expected  # exactly


def test_merging_an_image_twice_is_an_error():
    rng = np.random.default_rng(1)
    gt, detections = random_image(rng)
    evaluator = coco_eval.CocoEvaluator(num_classes=4)
    evaluator.add_ground_truth(3, gt, (24, 24))
    with pytest.raises(ValueError, match=r'image ids \[3\] are in more than one export'):
        coco_eval.CocoEvaluator.merged(4, [evaluator.export(), evaluator.export()])


@pytest.mark.parametrize('split', ['validation', 'validation[:2]', 'train[:3]+validation[2:6]'])
@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_process_slices_are_what_each_process_reads(builder, split, process_count):
    def images(split_or_slice):
        return [e['image'].tobytes() for e in tfds.as_numpy(builder.as_dataset(
            split=split_or_slice, shuffle_files=False))]

    everything = images(split)
    slices = evaluation.process_slices(builder, split, process_count)
    assert sorted(np.concatenate(slices).tolist()) == list(range(len(everything)))
    for process, positions in enumerate(slices):
        host_split = tfds.split_for_jax_process(split, process_index=process,
                                                process_count=process_count)
        read = images(host_split) if len(positions) else []  # tfds cannot read an empty slice
        assert read == [everything[i] for i in positions], (process, positions)


def test_padded_batches_run_as_many_batches_as_asked():
    examples = [{'image': np.full((64, 64, 3), i + 1, np.float32),
                 'image_size': np.int32([40 + i, 64])} for i in range(3)]
    batches = list(evaluation.padded_batches(iter(examples), 2, 3, (64, 64)))
    assert [len(chunk) for _, chunk in batches] == [2, 1, 0]
    valid = np.stack([batch['valid'] for batch, _ in batches])
    np.testing.assert_array_equal(valid, [[True, True], [True, False], [False, False]])
    np.testing.assert_array_equal(batches[1][0]['image'][0], examples[2]['image'])
    np.testing.assert_array_equal(batches[2][0]['image'], 0)
    np.testing.assert_array_equal(batches[0][0]['image_size'], [[40, 64], [41, 64]])
    np.testing.assert_array_equal(batches[2][0]['image_size'], [[64, 64]] * 2)
    with pytest.raises(ValueError, match='more eval examples than 1 batches of 2'):
        list(evaluation.padded_batches(iter(examples), 2, 1, (64, 64)))


def test_allgather_json_in_one_process_returns_the_value():
    value = {'counts': 'PX1`0', 'bbox': [0.1, 1e-30, 12.5], 'é': [None, True]}
    assert evaluation.allgather_json(value) == [value]


@pytest.mark.slow  # several processes, each compiling a tiny Mask R-CNN: ~1.5 minutes
def test_two_processes_evaluate_coco_exactly_as_one(tmp_path):
    data_dir = tmp_path / 'tfds'
    prepared_instances('smoke', data_dir)
    script = os.path.join(ROOT, 'tests', 'multiprocess_coco_eval.py')

    def start(out, devices: int, *multihost):
        env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
               'JAX_PLATFORMS': 'cpu'}
        return subprocess.Popen([sys.executable, script, str(data_dir), str(out), *multihost],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    port = free_port()
    two = [start(tmp_path / 'two.json', 2, f'127.0.0.1:{port}', str(i), '2') for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in two]
    for p, out in zip(two, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    one = start(tmp_path / 'one.json', 4)  # the same 4 devices, 1 image each, in one process
    output = one.communicate(timeout=900)[0]
    assert one.returncode == 0, output[-4000:]

    expected = json.loads((tmp_path / 'one.json.0').read_text())
    assert list(expected) == ['validation[:9]', 'train[:3]+validation[:6]']
    for split, result in expected.items():
        assert [image['id'] for image in result['evaluator']['images']] == list(range(1, 10))
        assert result['evaluator']['bbox_results'] and result['evaluator']['segm_results']
        assert result['metrics']['bbox/AP'] > 0, (split, result['metrics'])
    for process in range(2):
        got = json.loads((tmp_path / f'two.json.{process}').read_text())
        for split in expected:
            # Every image, annotation and detection pycocotools saw, then the metrics: equal.
            assert got[split]['evaluator'] == expected[split]['evaluator'], (process, split)
            assert got[split]['metrics'] == expected[split]['metrics'], (process, split)
