"""Tests for segjax.data: the synthetic TFDS builder, transforms and tf.data pipelines."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import pipeline, synthetic, transforms

TINY = synthetic.SyntheticShapesConfig(
    name='tiny',
    image_size=32,
    num_train=40,
    num_validation=12,
    min_object_size=8,
    max_object_size=18,
    seed=3,
)
NUM_CLASSES = len(synthetic.CLASS_NAMES)


def _build(data_dir) -> synthetic.SyntheticShapes:
    builder = synthetic.SyntheticShapes(config=TINY, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def _examples(builder, split: str) -> list[dict]:
    """All examples of a split, sorted by filename so that file order does not matter."""
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    return sorted(examples, key=lambda ex: ex['image/filename'])


@pytest.fixture(scope='module')
def builder(tmp_path_factory) -> synthetic.SyntheticShapes:
    return _build(tmp_path_factory.mktemp('tfds'))


# ----------------------------------------------------------------------------------------------
# Builder.


def test_split_sizes_and_features(builder):
    assert builder.info.splits['train'].num_examples == 40
    assert builder.info.splits['validation'].num_examples == 12
    example = _examples(builder, 'validation')[0]
    assert example['image'].shape == (32, 32, 3) and example['image'].dtype == np.uint8
    assert example['label'].shape == (32, 32, 1) and example['label'].dtype == np.uint8
    assert synthetic.PALETTE.shape == (NUM_CLASSES, 3)
    assert len({tuple(c) for c in synthetic.PALETTE}) == NUM_CLASSES


def test_build_is_deterministic(builder, tmp_path):
    other = _build(tmp_path)
    for split in ('train', 'validation'):
        for a, b in zip(_examples(builder, split), _examples(other, split), strict=True):
            assert a['image/filename'] == b['image/filename']
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['label'], b['label'])


def test_each_example_reproducible_on_its_own(builder):
    stored = _examples(builder, 'train')[7]
    assert stored['image/filename'] == b'train_00007.png'
    image, label = synthetic.generate_example(TINY, split_id=0, index=7)
    np.testing.assert_array_equal(stored['image'], image)
    np.testing.assert_array_equal(stored['label'][..., 0], label)


def test_labels_in_range_and_every_class_appears(builder):
    labels = np.stack([ex['label'] for ex in _examples(builder, 'train')])
    assert labels.max() < NUM_CLASSES
    assert set(np.unique(labels)) == set(range(NUM_CLASSES))


def test_train_and_validation_differ(builder):
    train, validation = _examples(builder, 'train'), _examples(builder, 'validation')
    for a, b in zip(train, validation, strict=False):
        assert not np.array_equal(a['image'], b['image'])


# ----------------------------------------------------------------------------------------------
# Transforms.


def _example(height: int = 20, width: int = 30, seed: int = 0) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 2, 5], np.uint8), (height, width))
    return {'image': tf.constant(image), 'label': tf.constant(label)}


def _seed(i: int) -> tf.Tensor:
    return tf.constant([i, 0], tf.int32)


def _assert_examples_equal(a: dict, b: dict) -> None:
    for key in ('image', 'label'):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_random_scale_keeps_label_values_and_is_seeded():
    example = _example()
    for i in range(4):
        out = transforms.random_scale(example, _seed(i), min_ratio=0.5, max_ratio=2.0)
        height, width = out['label'].shape
        assert 10 <= height <= 40 and out['image'].shape == (height, width, 3)
        assert out['image'].dtype == tf.uint8
        assert set(np.unique(out['label'].numpy())) <= {0, 2, 5}
        again = transforms.random_scale(example, _seed(i), min_ratio=0.5, max_ratio=2.0)
        _assert_examples_equal(out, again)


def test_random_crop_or_pad_shapes_ignore_and_window():
    example = _example(height=20, width=30)
    out = transforms.random_crop_or_pad(example, _seed(1), height=32, width=24, ignore_index=255)
    image, label = out['image'].numpy(), out['label'].numpy()
    assert image.shape == (32, 24, 3) and label.shape == (32, 24)
    # Height is padded (bottom), width is cropped at some offset of the original.
    assert (label[20:] == 255).all() and (image[20:] == 0).all()
    original = example['label'].numpy()
    assert any(np.array_equal(label[:20], original[:, x : x + 24]) for x in range(7))
    again = transforms.random_crop_or_pad(example, _seed(1), height=32, width=24)
    _assert_examples_equal(out, again)


def test_random_flip_moves_image_and_label_together():
    example = _example()
    image, label = example['image'].numpy(), example['label'].numpy()
    flipped = []
    for i in range(8):
        out = transforms.random_flip(example, _seed(i))
        is_flipped = np.array_equal(out['image'].numpy(), image[:, ::-1])
        expected_label = label[:, ::-1] if is_flipped else label
        np.testing.assert_array_equal(out['label'].numpy(), expected_label)
        if not is_flipped:
            np.testing.assert_array_equal(out['image'].numpy(), image)
        _assert_examples_equal(out, transforms.random_flip(example, _seed(i)))
        flipped.append(is_flipped)
    assert any(flipped) and not all(flipped)


def test_pad_to_size_pads_bottom_right():
    example = _example(height=20, width=30)
    out = transforms.pad_to_size(example, height=25, width=33, ignore_index=255)
    np.testing.assert_array_equal(out['label'].numpy()[:20, :30], example['label'].numpy())
    np.testing.assert_array_equal(out['image'].numpy()[:20, :30], example['image'].numpy())
    assert (out['label'].numpy()[20:] == 255).all() and (out['label'].numpy()[:, 30:] == 255).all()
    assert (out['image'].numpy()[20:] == 0).all() and (out['image'].numpy()[:, 30:] == 0).all()


def test_normalize():
    image = tf.constant([[[124, 173, 8]]], tf.uint8)
    out = transforms.normalize(image, mean=(124, 116, 0), std=(1, 2, 4))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [[[0.0, 28.5, 2.0]]])
    default = transforms.normalize(tf.zeros([1, 1, 3], tf.uint8)).numpy()
    expected = -np.array(transforms.IMAGENET_MEAN) / np.array(transforms.IMAGENET_STD)
    np.testing.assert_allclose(default[0, 0], expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Pipelines.

RECIPE = pipeline.TrainRecipe(crop_size=(24, 24), scale_range=(0.75, 1.5))
# No augmentation: an epoch is exactly the split.
PLAIN = pipeline.TrainRecipe(crop_size=(32, 32), flip=False)
WHOLE = pipeline.EvalRecipe()  # each image whole, at the data set's fixed size


def _train(builder, recipe: pipeline.TrainRecipe = RECIPE, **overrides):
    stream = dict(split='train', local_batch_size=8, seed=0)
    return pipeline.train_batches(builder, recipe, **{**stream, **overrides})


def _take(iterator, n: int) -> list[dict]:
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _rows(images: np.ndarray) -> list[bytes]:
    return [image.tobytes() for image in images]


def test_train_batches_shapes_and_dtypes(builder):
    batch = next(_train(builder))
    assert batch['image'].shape == (8, 24, 24, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (8, 24, 24) and batch['label'].dtype == np.int32
    assert set(np.unique(batch['label'])) <= set(range(NUM_CLASSES)) | {255}


def test_train_batches_deterministic_and_resumable(builder):
    # 40 examples / 8 per batch: 7 batches cross an epoch boundary.
    reference = _take(_train(builder), 7)
    _assert_batches_equal(_take(_train(builder), 7), reference)
    _assert_batches_equal(_take(_train(builder, start_step=3), 4), reference[3:])
    assert not np.array_equal(_take(_train(builder, seed=1), 1)[0]['image'], reference[0]['image'])


def test_train_batches_reshuffle_each_epoch(builder):
    # Without augmentation an epoch is exactly the split, in a new order each time.
    plain = _train(builder, PLAIN)
    epochs = [np.concatenate([b['image'] for b in _take(plain, 5)]) for _ in range(2)]
    assert sorted(_rows(epochs[0])) == sorted(_rows(epochs[1]))
    assert len(set(_rows(epochs[0]))) == 40
    assert _rows(epochs[0]) != _rows(epochs[1])


def test_train_batches_process_slices_are_disjoint(builder):
    rows = []
    for index in range(2):
        batches = _take(
            _train(builder, PLAIN, local_batch_size=4, process_index=index, process_count=2),
            5,
        )
        rows.append(set(_rows(np.concatenate([b['image'] for b in batches]))))
    assert len(rows[0]) == len(rows[1]) == 20
    assert not rows[0] & rows[1]


def _eval(builder, recipe: pipeline.EvalRecipe = WHOLE, **kwargs) -> list[dict]:
    batches = pipeline.eval_batches(builder, recipe, split='validation[:11]', local_batch_size=3,
                                    **kwargs)
    return list(batches)


def test_eval_batches_equal_counts_padding_and_coverage(builder):
    whole = _eval(builder)
    assert all(b['valid'].all() for b in whole[:-1]) and whole[-1]['valid'].sum() == 2
    expected = sorted(_rows(np.concatenate([b['image'] for b in whole])[:11]))

    num_batches = pipeline.num_eval_batches(builder, 'validation[:11]', 3, process_count=3)
    assert num_batches == 2  # host slices of 4, 4 and 3 examples
    valid_rows = []
    for index in range(3):
        batches = _eval(builder, process_index=index, process_count=3)
        assert len(batches) == num_batches
        for batch in batches:
            assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
            assert batch['valid'].dtype == bool
            padding = ~batch['valid']
            assert (batch['label'][padding] == 255).all() and (batch['image'][padding] == 0).all()
            valid_rows += _rows(batch['image'][batch['valid']])
    assert sorted(valid_rows) == expected


def test_eval_batches_pad_size(builder):
    batch = _eval(builder, pipeline.EvalRecipe(pad_size=(40, 36)))[0]
    assert batch['image'].shape == (3, 40, 36, 3) and batch['label'].shape == (3, 40, 36)
    assert (batch['label'][:, 32:] == 255).all() and (batch['label'][:, :, 32:] == 255).all()
    assert (batch['label'][:, :32, :32] < NUM_CLASSES).all()
