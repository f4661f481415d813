"""Cityscapes instances: the builder on tiny fake zips in the official layout, with 16-bit
*_gtFine_instanceIds.png (labelId * 1000 + instance, bare labelIds for stuff and groups)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import png, write_cityscapes_zips

from segjax.data import cityscapes_instances, instance_transforms
from segjax.data.voc import CorruptFileError, MissingMemberError

HEIGHT, WIDTH = 32, 64
IMAGES = {  # official split directory -> (city, image id)
    'train': (('aachen', 'aachen_000000_000019'), ('aachen', 'aachen_000001_000019')),
    'val': (('frankfurt', 'frankfurt_000000_000294'),),
    'test': (('berlin', 'berlin_000000_000019'),),
}
RICH = 'aachen_000000_000019'  # every kind of value; the others hold one car or nothing


def instance_ids(image_id: str, split: str) -> np.ndarray:
    ids = np.full((HEIGHT, WIDTH), 7, np.uint16)  # road (stuff)
    if split == 'test':
        return np.zeros((HEIGHT, WIDTH), np.uint16)  # the official test PNGs are placeholders
    ids[:6] = 23  # sky
    if image_id == RICH:
        ids[10:20, 2:10] = 24  # a persongroup: a crowd region
        ids[8:30, 12:18] = 25001  # rider 1
        ids[20:28, 20:40] = 26001  # car 1
        ids[22:26, 42:60] = 26002  # car 2
        ids[0:4, 50:60] = 29001  # a caravan: not evaluated, no instance
        ids[30:32, 0:3] = 7001  # no class with instances: counted
    elif image_id != 'aachen_000001_000019':
        ids[12:16, 30:34] = 26001
    return ids


def image(image_id: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, image_id)))
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def gt_fine(split: str, image_id: str) -> dict[str, bytes]:
    """instanceIds, and the labelIds and (grey) colours they imply."""
    ids = instance_ids(image_id, split)
    label_ids = np.where(ids >= 1000, ids // 1000, ids).astype(np.uint8)
    return {'instanceIds.png': png(ids), 'labelIds.png': png(label_ids),
            'color.png': png(np.stack([label_ids] * 3, -1))}


def write_zips(directory, label_replace=None) -> None:
    """`label_replace`: {gtFine member: its bytes, or None to leave it out}."""
    frames = [(split, city, image_id) for split, entries in IMAGES.items()
              for city, image_id in entries]
    write_cityscapes_zips(directory, frames, image, gt_fine, label_replace=label_replace)


def prepare(tmp_path, **replace):
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_zips(manual, **replace)
    data_dir = str(tmp_path / 'tfds')
    cityscapes_instances.CityscapesInstances(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return cityscapes_instances.CityscapesInstances(data_dir=data_dir)


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp('cityscapes_instances'))


def stored(builder, split: str) -> dict[str, dict]:
    return {ex['image/filename'].decode().replace('_leftImg8bit.png', ''): ex
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


def test_classes_are_the_eight_evaluated_things():
    assert cityscapes_instances.CLASS_NAMES == ('person', 'rider', 'car', 'truck', 'bus',
                                                'train', 'motorcycle', 'bicycle')
    assert cityscapes_instances.NUM_CLASSES == 9
    assert cityscapes_instances.LABEL_ID_TO_LABEL == {24: 1, 25: 2, 26: 3, 27: 4, 28: 5, 31: 6,
                                                      32: 7, 33: 8}


def test_instances_written_out(builder):
    assert builder.info.splits['train'].num_examples == 2
    assert builder.info.splits['validation'].num_examples == 1
    assert builder.info.splits['test'].num_examples == 1
    found = stored(builder, 'train')
    ex = found[RICH]
    np.testing.assert_array_equal(ex['image'], image(RICH))
    instances = ex['instances']
    # Values 24 (group), 25001, 26001, 26002 in increasing order; 29001 and 7001 are none.
    np.testing.assert_array_equal(instances['label'], [1, 2, 3, 3])
    np.testing.assert_array_equal(instances['is_crowd'], [True, False, False, False])
    np.testing.assert_array_equal(instances['bbox'], [[2, 10, 10, 20], [12, 8, 18, 30],
                                                      [20, 20, 40, 28], [42, 22, 60, 26]])
    ids = instance_ids(RICH, 'train')
    for mask, value in zip(instances['mask'], (24, 25001, 26001, 26002), strict=True):
        np.testing.assert_array_equal(mask, ids == value)
    assert instances['mask'].dtype == np.uint8
    empty = found['aachen_000001_000019']['instances']  # stuff only: a negative example
    assert empty['mask'].shape == (0, HEIGHT, WIDTH) and empty['label'].shape == (0,)
    (val,) = stored(builder, 'validation').values()
    np.testing.assert_array_equal(val['instances']['bbox'], [[30, 12, 34, 16]])
    (test,) = stored(builder, 'test').values()
    assert test['instances']['label'].shape == (0,)


def test_unknown_instance_values_are_counted(builder):
    report = builder.info.metadata['unknown_instance_values']
    assert report['train'] == {'values': [7001], 'first_files': [
        f'gtFine_trainvaltest.zip:gtFine/train/aachen/{RICH}_gtFine_instanceIds.png']}
    assert report['validation']['values'] == []


def test_instance_transforms_take_it(builder):
    ds = builder.as_dataset(split='train', shuffle_files=False).map(
        lambda ex: instance_transforms.instance_train_transform(
            ex, tf.constant([1, 2]), num_classes=cityscapes_instances.NUM_CLASSES, min_size=32,
            max_size=64, height=32, width=64, max_instances=4))
    (batch,) = list(tfds.as_numpy(ds.batch(2)))
    assert batch['masks'].shape == (2, 4, 32, 64)
    assert sorted(batch['valid'].sum(axis=1).tolist()) == [0, 3]  # the crowd is dropped


def _member(name: str) -> str:
    return f'gtFine/train/aachen/{RICH}_gtFine_{name}.png'


def test_missing_instance_ids_png_is_named(tmp_path):
    with pytest.raises(MissingMemberError, match='archive member gtFine_trainvaltest.zip:'
                                                 f'{_member("instanceIds")} is missing'):
        prepare(tmp_path, label_replace={_member('instanceIds'): None})


def test_rgb_instance_ids_png_is_refused(tmp_path):
    rgb = png(np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    with pytest.raises(CorruptFileError, match=f'{_member("instanceIds")} is not a readable '
                                               "instanceIds PNG: .* this one is 'RGB'"):
        prepare(tmp_path, label_replace={_member('instanceIds'): rgb})


def test_size_mismatch_names_the_example(tmp_path):
    small = png(instance_ids(RICH, 'train')[:, :60])
    with pytest.raises(ValueError, match=f'train example {RICH}: image .* is 32x64 but '
                                         '.*instanceIds.png is 32x60'):
        prepare(tmp_path, label_replace={_member('instanceIds'): small})
