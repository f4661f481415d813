"""Tests for semi-supervised data: `pipeline.labelled_split` and the labelled/unlabelled train
streams of `pipeline.train_batches(examples=..., with_labels=...)`."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from segjax.data import pipeline, synthetic

NUM_TRAIN = 24
NUM_CLASSES = len(synthetic.CLASS_NAMES)
SPLIT_SEED = 7
LABELLED, UNLABELLED = pipeline.labelled_split(NUM_TRAIN, 0.25, SPLIT_SEED)
# Model inputs equal to the uint8 pixels, so that stream images compare exactly with stored ones.
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
# No augmentation: an epoch is exactly the stream's examples (in a shuffled order).
PLAIN = dict(crop_size=(32, 32), scale_range=(1.0, 1.0), flip=False, rotation=0.0,
             photometric=False, **RAW)
# The geometric augmentations (those that move labels too); tests add photometric where it matters.
AUGMENTED = dict(crop_size=(24, 24), scale_range=(0.75, 1.5), rotation=10.0)


@dataclasses.dataclass
class PoisonedConfig(synthetic.SyntheticShapesConfig):
    """`poison` the stored labels of train examples `poisoned`: 'values' adds 100 to every label
    value (out of range for every class), 'bytes' stores bytes that are no image at all."""

    poisoned: tuple[int, ...] = ()
    poison: str = 'values'


class PoisonedShapes(synthetic.SyntheticShapes):
    """SyntheticShapes stored in generation order (position i = example i), some labels poisoned."""

    BUILDER_CONFIGS = []

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
                'label': tfds.features.Image(shape=(size, size, 1), encoding_format='png'),
                'image/filename': tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    def _generate_examples(self, split: str, num_examples: int):
        config = self.builder_config
        for key, example in super()._generate_examples(split, num_examples):
            if split == 'train' and key in config.poisoned:
                label = np.asarray(example['label'])
                example['label'] = (label[..., None] + 100 if config.poison == 'values'
                                    else b'no image at all')
            yield key, example


def _config(name: str, **fields) -> PoisonedConfig:
    return PoisonedConfig(name=name, image_size=32, num_train=NUM_TRAIN, num_validation=2,
                          min_object_size=8, max_object_size=18, seed=3, **fields)


def _prepared(builder):
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope='module')
def shuffled(tmp_path_factory) -> synthetic.SyntheticShapes:
    """Stored in TFDS's hashed order, so a position in the split is not the generation index."""
    config = synthetic.SyntheticShapesConfig(
        name='semisup', image_size=32, num_train=NUM_TRAIN, num_validation=2,
        min_object_size=8, max_object_size=18, seed=3)
    return _prepared(synthetic.SyntheticShapes(
        config=config, data_dir=str(tmp_path_factory.mktemp('tfds'))))


@pytest.fixture(scope='module')
def clean(tmp_path_factory) -> PoisonedShapes:
    return _prepared(PoisonedShapes(config=_config('clean'),
                                    data_dir=str(tmp_path_factory.mktemp('tfds'))))


@pytest.fixture(scope='module', params=['values', 'bytes'])
def poisoned(request, tmp_path_factory) -> PoisonedShapes:
    config = _config(request.param, poisoned=tuple(UNLABELLED.tolist()), poison=request.param)
    return _prepared(PoisonedShapes(config=config, data_dir=str(tmp_path_factory.mktemp('tfds'))))


def _stored_images(builder) -> np.ndarray:
    """The train images in the split's fixed read order (the order `examples` indexes)."""
    ds = builder.as_dataset(split='train', shuffle_files=False,
                            decoders={'label': tfds.decode.SkipDecoding()})
    return np.stack([ex['image'] for ex in tfds.as_numpy(ds)])


RECIPE_FIELDS = {field.name for field in dataclasses.fields(pipeline.TrainRecipe)}


def _train(builder, **overrides):
    """A stream of AUGMENTED; overrides of TrainRecipe's fields change the recipe, the others
    train_batches' arguments."""
    recipe = {k: v for k, v in overrides.items() if k in RECIPE_FIELDS}
    stream = {k: v for k, v in overrides.items() if k not in RECIPE_FIELDS}
    return pipeline.train_batches(builder, pipeline.TrainRecipe(**{**AUGMENTED, **recipe}),
                                  **{**dict(split='train', local_batch_size=3, seed=0), **stream})


def _take(iterator, n: int) -> list[dict]:
    return list(itertools.islice(iterator, n))


def _images(batches: list[dict]) -> np.ndarray:
    return np.concatenate([b['image'] for b in batches])


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def _positions(images: np.ndarray, stored: np.ndarray) -> list[int]:
    """The stored example each (unaugmented, raw-valued) stream image is."""
    rows = {image.tobytes(): i for i, image in enumerate(stored.astype(np.float32))}
    assert len(rows) == len(stored)  # stored images are distinct, so a match names one example
    positions = [rows.get(image.tobytes(), -1) for image in images]
    assert -1 not in positions, 'a stream image is no stored image'
    return positions


# ----------------------------------------------------------------------------------------------
# labelled_split.


@pytest.mark.parametrize('num_examples, fraction, num_labelled', [
    (40, 1 / 8, 5), (40, 1 / 4, 10), (40, 1 / 2, 20), (40, 1.0, 40),
    (100, 1 / 8, 13),  # 12.5 rounds half up
    (10582, 1 / 8, 1323),  # VOC aug: 1322.75
    (3, 0.2, 1),  # 0.6 -> the one labelled example
])
def test_labelled_split_disjoint_covering_stated_fraction(num_examples, fraction, num_labelled):
    labelled, unlabelled = pipeline.labelled_split(num_examples, fraction, seed=0)
    assert len(labelled) == num_labelled and len(unlabelled) == num_examples - num_labelled
    assert labelled.dtype.kind == unlabelled.dtype.kind == 'i'
    assert (np.diff(labelled) > 0).all() and (np.diff(unlabelled) > 0).all()
    assert not set(labelled.tolist()) & set(unlabelled.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([labelled, unlabelled])),
                                  np.arange(num_examples))


def test_labelled_split_is_the_seeded_permutation_and_deterministic():
    labelled, unlabelled = pipeline.labelled_split(8, 0.5, seed=3)
    order = np.random.default_rng(3).permutation(8)
    np.testing.assert_array_equal(labelled, np.sort(order[:4]))
    np.testing.assert_array_equal(unlabelled, np.sort(order[4:]))
    again = pipeline.labelled_split(8, 0.5, seed=3)
    np.testing.assert_array_equal(again[0], labelled)
    np.testing.assert_array_equal(again[1], unlabelled)
    others = {tuple(pipeline.labelled_split(40, 1 / 8, seed)[0]) for seed in range(5)}
    assert len(others) == 5


@pytest.mark.parametrize('fraction', [0.0, -0.1, 1.5, math.nan, math.inf])
def test_labelled_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match=rf'config\.data\.labelled_fraction .*{fraction!r}'):
        pipeline.labelled_split(40, fraction, seed=0)


def test_labelled_split_rejects_a_fraction_labelling_nothing():
    with pytest.raises(ValueError, match=r'labelled_fraction=0\.01 labels none of the 40'):
        pipeline.labelled_split(40, 0.01, seed=0)  # 0.4 examples rounds to 0


# ----------------------------------------------------------------------------------------------
# Streams of a subset.


def test_stream_of_examples_yields_exactly_those_examples(shuffled):
    # One epoch without augmentation is the subset, each example once; positions are in the
    # split's stored order (not generation order: this builder's order is hashed).
    stored = _stored_images(shuffled)
    subset = UNLABELLED[::2]  # 9 examples: 3 batches of 3
    epoch = _images(_take(_train(shuffled, examples=subset, **PLAIN), 3))
    assert sorted(_positions(epoch, stored)) == subset.tolist()
    # A second epoch: the same examples in a new order.
    two = _images(_take(_train(shuffled, examples=subset, **PLAIN), 6))
    second = _positions(two[9:], stored)
    assert sorted(second) == subset.tolist() and second != _positions(epoch, stored)


def test_stream_of_all_examples_is_todays_stream(shuffled):
    # The subset path reproduces the whole-split path bit for bit, per process too.
    for process_index, process_count in ((0, 1), (1, 2)):
        hosts = dict(process_index=process_index, process_count=process_count)
        whole = _take(_train(shuffled, **hosts), 5)
        subset = _take(_train(shuffled, examples=range(NUM_TRAIN), **hosts), 5)
        _assert_batches_equal(subset, whole)


def test_process_shares_are_disjoint_equal_and_cover_the_subset(shuffled):
    stored = _stored_images(shuffled)
    subset = np.concatenate([LABELLED, UNLABELLED[:7]])  # 13 examples: 6 per process, 1 dropped
    shares = []
    for process_index in range(2):
        batches = _take(_train(shuffled, examples=subset, local_batch_size=2,
                               process_index=process_index, process_count=2, **PLAIN), 3)
        shares.append(sorted(_positions(_images(batches), stored)))
    assert len(shares[0]) == len(shares[1]) == 6 and len(set(shares[0])) == 6
    assert not set(shares[0]) & set(shares[1])
    # Contiguous shares of the sorted subset, the last index dropped (as for a whole split).
    assert shares[0] + shares[1] == sorted(subset.tolist())[:12]
    # The order of `examples` does not matter.
    _assert_batches_equal(_take(_train(shuffled, examples=subset[::-1], **PLAIN), 2),
                          _take(_train(shuffled, examples=subset, **PLAIN), 2))


@pytest.mark.parametrize('with_labels', [True, False])
def test_streams_resume_exactly(shuffled, with_labels):
    # 18 unlabelled examples / 3 per batch: 8 batches cross an epoch boundary.
    stream = dict(examples=UNLABELLED, with_labels=with_labels, photometric=True)
    reference = _take(_train(shuffled, **stream), 8)
    _assert_batches_equal(_take(_train(shuffled, start_step=5, **stream), 3), reference[5:])
    assert not np.array_equal(_take(_train(shuffled, seed=1, **stream), 1)[0]['image'],
                              reference[0]['image'])


def test_empty_streams_are_clear_errors(shuffled):
    _, unlabelled = pipeline.labelled_split(NUM_TRAIN, 1.0, seed=0)
    assert unlabelled.size == 0
    with pytest.raises(ValueError, match=r"the unlabelled stream is empty: 0 examples of split "
                                         r"'train' .* labelled fraction of 1"):
        _train(shuffled, examples=unlabelled, with_labels=False)
    with pytest.raises(ValueError, match=r'the labelled stream is empty: 3 examples .* 4 process'):
        _train(shuffled, examples=LABELLED[:3], process_index=3, process_count=4)


@pytest.mark.parametrize('examples, message', [
    ([0, NUM_TRAIN], r'indices in 0\.\.23 .* got values 0\.\.24'),
    ([-1, 3], r'got values -1\.\.3'),
    ([2, 5, 2], r'repeat an index .*\[2\]'),
    ([0.5, 1.0], r'integer indices'),
])
def test_bad_examples_are_clear_errors(shuffled, examples, message):
    with pytest.raises(ValueError, match=message):
        _train(shuffled, examples=examples)


# ----------------------------------------------------------------------------------------------
# The unlabelled stream never reads labels.


@pytest.mark.parametrize('base_size', [None, (40, 40)])  # step by step; fused scale-and-crop
def test_unlabelled_stream_holds_the_labelled_streams_images(clean, base_size):
    stream = dict(examples=UNLABELLED, photometric=True, base_size=base_size)
    with_labels = _take(_train(clean, **stream), 7)
    without = _take(_train(clean, with_labels=False, **stream), 7)
    assert all(set(batch) == {'image'} for batch in without)
    assert without[0]['image'].shape == (3, 24, 24, 3) and without[0]['image'].dtype == np.float32
    np.testing.assert_array_equal(_images(without), _images(with_labels))


def test_poisoned_labels_change_nothing_in_the_unlabelled_stream(clean, poisoned):
    assert _stored_images(poisoned).tobytes() == _stored_images(clean).tobytes()
    # label_map, num_classes and cat_max_ratio would read labels: the unlabelled stream ignores
    # them (the poisoned 'values' would fail the check and steer the crop windows).
    unlabelled = dict(examples=UNLABELLED, with_labels=False, num_classes=NUM_CLASSES,
                      label_map=list(range(256)), cat_max_ratio=0.75)
    _assert_batches_equal(_take(_train(poisoned, **unlabelled), 7),
                          _take(_train(clean, **unlabelled), 7))
    # The labelled examples are intact, so the labelled stream is as on clean data.
    labelled = dict(examples=LABELLED, num_classes=NUM_CLASSES)
    _assert_batches_equal(_take(_train(poisoned, **labelled), 3),
                          _take(_train(clean, **labelled), 3))
    # Read with their labels, the poisoned examples do stop the pipeline.
    with pytest.raises(tf.errors.InvalidArgumentError):
        _take(_train(poisoned, examples=UNLABELLED, num_classes=NUM_CLASSES), 7)


def test_poisoned_labels_are_what_the_builder_says(clean, poisoned):
    # The poison is real: stored at exactly the unlabelled positions, out of range or no image.
    ds = poisoned.as_dataset(split='train', shuffle_files=False,
                             decoders={'label': tfds.decode.SkipDecoding()})
    stored = list(tfds.as_numpy(ds))
    assert [ex['image/filename'] for ex in stored] == [
        f'train_{i:05d}.png'.encode() for i in range(NUM_TRAIN)]
    feature = poisoned.info.features['label']
    for index in UNLABELLED[:2]:
        if poisoned.builder_config.poison == 'values':
            assert feature.decode_example(stored[index]['label']).numpy().min() >= 100
        else:
            assert stored[index]['label'] == b'no image at all'
