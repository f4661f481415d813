"""Cityscapes: the label table, and the builder + pipeline on tiny fake zips in the official
layout (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip; real labelIds, 64x32 images)."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import CITYSCAPES_ZIPS, png, write_cityscapes_zips

from segjax.data import cityscapes, pipeline
from segjax.data import prepare as prepare_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES_ZIP, LABELS_ZIP = CITYSCAPES_ZIPS

# The official table (cityscapesscripts/helpers/labels.py), written out independently:
# labelId -> trainId for the 19 evaluated classes; every other labelId trains as 255.
OFFICIAL_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                      24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
OFFICIAL_NAMES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
                  'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car',
                  'truck', 'bus', 'train', 'motorcycle', 'bicycle')

SPLITS = {  # official split directory -> {city: frame ids}
    'train': {'aachen': ('000000_000019', '000001_000019'), 'bochum': ('000000_001097',)},
    'val': {'frankfurt': ('000000_000294', '000000_000576')},
    'test': {'berlin': ('000000_000019',)},
}
HEIGHT, WIDTH = 32, 64
UNKNOWN_IMAGE = 'bochum_000000_001097'  # its label also holds values that are no labelId


def label_ids(image_id: str) -> np.ndarray:
    """A labelIds image holding every id 0..33 (and, for UNKNOWN_IMAGE, 40 and 250)."""
    rng = np.random.default_rng(sum(map(ord, image_id)))
    label = rng.permutation(np.resize(np.arange(34), HEIGHT * WIDTH)).reshape(HEIGHT, WIDTH)
    label[8:16, 8:40] = rng.integers(0, 34)  # a larger region, as real labels have
    if image_id == UNKNOWN_IMAGE:
        label[0, :3] = 40
        label[1, :2] = 250
    return label.astype(np.uint8)


def image(image_id: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, image_id)) + 1)
    return rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def all_ids() -> list[tuple[str, str, str]]:
    return [(split, city, f'{city}_{frame}') for split, cities in SPLITS.items()
            for city, frames in cities.items() for frame in frames]


def colors(ids: np.ndarray) -> np.ndarray:
    """A *_gtFine_color.png: each labelId in its official colour."""
    palette = np.zeros((256, 3), np.uint8)
    for label in cityscapes.LABELS:
        palette[label.id % 256] = label.color
    return palette[ids]


def gt_fine(split: str, image_id: str) -> dict[str, bytes]:
    """labelIds, instanceIds (labelId * 1000), their colours and an empty polygons json; the
    test split's are all 0, as the official placeholders."""
    ids = label_ids(image_id) if split != 'test' else np.zeros((HEIGHT, WIDTH), np.uint8)
    return {'labelIds.png': png(ids), 'instanceIds.png': png(ids.astype(np.uint16) * 1000),
            'color.png': png(colors(ids)),
            'polygons.json': json.dumps({'imgHeight': HEIGHT, 'imgWidth': WIDTH,
                                         'objects': []}).encode()}


def write_zips(directory, image_replace=None, label_replace=None) -> None:
    write_cityscapes_zips(directory, all_ids(), image, gt_fine, image_replace, label_replace)


def prepare(tmp_path, **replace):
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_zips(manual, **replace)
    data_dir = str(tmp_path / 'tfds')
    cityscapes.Cityscapes(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return cityscapes.Cityscapes(data_dir=data_dir)


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp('cityscapes'))


def stored(builder, split: str) -> dict[str, dict]:
    return {ex['image/filename'].decode().replace('_leftImg8bit.png', ''): ex
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


# ----------------------------------------------------------------------------------------------
# The label table.


def test_label_id_to_train_id_for_every_value():
    table = cityscapes.LABEL_ID_TO_TRAIN_ID
    assert len(table) == 256
    for label_id in range(256):
        assert table[label_id] == OFFICIAL_TRAIN_IDS.get(label_id, 255), label_id
    assert cityscapes.CLASS_NAMES == OFFICIAL_NAMES and cityscapes.NUM_CLASSES == 19
    assert cityscapes.LABEL_IDS == tuple(range(34))
    assert cityscapes.PALETTE.shape == (19, 3)
    assert tuple(cityscapes.PALETTE[0]) == (128, 64, 128)  # road
    assert tuple(cityscapes.PALETTE[18]) == (119, 11, 32)  # bicycle


# ----------------------------------------------------------------------------------------------
# Builder.


def test_splits_images_and_raw_label_ids(builder):
    sizes = {split: sum(len(f) for f in cities.values()) for split, cities in SPLITS.items()}
    splits = builder.info.splits
    assert splits['train'].num_examples == sizes['train'] == 3
    assert splits['validation'].num_examples == sizes['val'] == 2
    assert splits['test'].num_examples == sizes['test'] == 1
    for split, name in (('train', 'train'), ('val', 'validation')):
        found = stored(builder, name)
        expected_ids = {i for s, _, i in all_ids() if s == split}
        assert set(found) == expected_ids
        for image_id, ex in found.items():
            np.testing.assert_array_equal(ex['image'], image(image_id))
            expected = label_ids(image_id)
            expected[expected > 33] = 255  # not a labelId: stored as ignore
            np.testing.assert_array_equal(ex['label'][..., 0], expected)


def test_unknown_label_values_are_counted(builder):
    report = builder.info.metadata['unknown_label_values']
    assert report['train']['pixels'] == 5 and report['train']['values'] == [40, 250]
    assert report['train']['first_files'] == [
        f'gtFine_trainvaltest.zip:gtFine/train/bochum/{UNKNOWN_IMAGE}_gtFine_labelIds.png']
    assert report['validation']['pixels'] == 0 and report['test']['pixels'] == 0


def test_missing_zips_error_names_files_directory_and_url(tmp_path):
    manual = tmp_path / 'manual'
    manual.mkdir()
    (manual / 'leftImg8bit_trainvaltest.zip').write_bytes(b'')
    builder = cityscapes.Cityscapes(data_dir=str(tmp_path / 'tfds'))
    with pytest.raises(FileNotFoundError) as error:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    message = str(error.value)
    for needed in ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip', str(manual),
                   'https://www.cityscapes-dataset.com/downloads/', 'missing: gtFine_trainvaltest'):
        assert needed in message


def test_corrupt_image_names_the_zip_member(tmp_path):
    member = 'leftImg8bit/val/frankfurt/frankfurt_000000_000576_leftImg8bit.png'
    with pytest.raises(cityscapes.CorruptFileError,
                       match=f'leftImg8bit_trainvaltest.zip:{member}'):
        prepare(tmp_path, image_replace={member: png(image('x'))[:200]})


def test_size_mismatch_names_the_example(tmp_path):
    member = 'gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png'
    with pytest.raises(ValueError, match='train example aachen_000001_000019: image .* is 32x64 '
                                         'but label .* is 32x60'):
        prepare(tmp_path, label_replace={member: png(label_ids('aachen_000001_000019')[:, :60])})


# ----------------------------------------------------------------------------------------------
# Pipeline: labelIds -> trainIds in the graph.


def test_eval_pipeline_maps_every_label_id_to_its_train_id(builder):
    recipe = pipeline.EvalRecipe(pad_size=(HEIGHT, WIDTH),
                                 label_map=cityscapes.LABEL_ID_TO_TRAIN_ID, num_classes=19)
    batches = list(pipeline.eval_batches(builder, recipe, split='train', local_batch_size=4))
    order = list(tfds.as_numpy(builder.as_dataset(split='train', shuffle_files=False)))
    assert len(batches) == 1 and batches[0]['valid'].tolist() == [True] * 3 + [False]
    seen = set()
    for label, ex in zip(batches[0]['label'], order, strict=False):
        ids = ex['label'][..., 0]
        expected = np.array([OFFICIAL_TRAIN_IDS.get(int(i), 255) for i in ids.ravel()])
        np.testing.assert_array_equal(label, expected.reshape(ids.shape))
        seen |= set(ids.ravel().tolist())
    assert set(range(34)) <= seen


def test_unmapped_label_ids_are_an_error_not_classes(builder):
    with pytest.raises(tf.errors.InvalidArgumentError, match='label_map'):
        list(pipeline.eval_batches(builder, pipeline.EvalRecipe(pad_size=(HEIGHT, WIDTH),
                                                                num_classes=19),
                                   split='validation', local_batch_size=2))


def _recipe(builder, seed: int = 1):
    recipe = pipeline.TrainRecipe(
        crop_size=(16, 32), scale_range=(0.5, 2.0), base_size=(64, 32), cat_max_ratio=0.75,
        flip=True, photometric=True, label_map=cityscapes.LABEL_ID_TO_TRAIN_ID, num_classes=19)
    return pipeline.train_batches(builder, recipe, split='train', local_batch_size=3, seed=seed)


def test_train_recipe_batches_are_valid_and_deterministic(builder):
    batches, again = _recipe(builder), _recipe(builder)
    for _ in range(2):
        batch = next(batches)
        assert batch['image'].shape == (3, 16, 32, 3) and batch['label'].shape == (3, 16, 32)
        assert set(np.unique(batch['label'])) <= set(range(19)) | {255}
        repeated = next(again)
        for key in batch:
            np.testing.assert_array_equal(batch[key], repeated[key])
    assert not np.array_equal(next(_recipe(builder, seed=2))['image'], batch['image'])


# ----------------------------------------------------------------------------------------------
# Damaged zips and the prepare command's output.


def prepared(tmp_path):
    return prepare_lib.prepared(
        lambda: cityscapes.Cityscapes(data_dir=str(tmp_path / 'tfds')),
        tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))


def damaged_zip(tmp_path, name: str, damage) -> str:
    """The fake zips in tmp_path/manual with `name` passed through `damage`; its path."""
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_zips(manual)
    (manual / name).write_bytes(damage((manual / name).read_bytes()))
    return str(manual / name)


def corrupt_member_data(data: bytes) -> bytes:
    """Flips bytes inside the first stored PNG's data: the zip's CRC-32 no longer matches."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith('.png'))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40
    data = bytearray(data)
    data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    return bytes(data)


@pytest.mark.parametrize('name, damage, problem', [
    (IMAGES_ZIP, lambda b: b[:len(b) // 2], 'File is not a zip file'),  # no central directory
    (LABELS_ZIP, corrupt_member_data, "Bad CRC-32 for file 'gtFine/test/berlin/"),
])
def test_damaged_zip_is_one_line_naming_it_and_leaves_nothing_half_extracted(
        tmp_path, name, damage, problem):
    path = damaged_zip(tmp_path, name, damage)
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepared(tmp_path)
    size = os.path.getsize(path)
    official = 'about 11 GB' if name == IMAGES_ZIP else 'about 241 MB'
    message = str(error.value)
    assert message.startswith(f'{path} is truncated or corrupt (extracting it failed: {problem}')
    assert message.endswith(f'it is {size:,} bytes (the official file: {official}) - download '
                            f'it again from {cityscapes.DOWNLOAD_URL} and run again')
    assert '\n' not in message
    assert sorted(p.name for p in tmp_path.rglob('incomplete*')) == []


def run_prepare(data_dir, manual_dir, *flags):
    return subprocess.run(
        [sys.executable, '-m', 'segjax.data.cityscapes', '--data_dir', str(data_dir),
         '--manual_dir', str(manual_dir), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_prepare_command_prints_its_own_lines_unless_verbose(tmp_path):
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_zips(manual)
    result = run_prepare(tmp_path / 'tfds', manual)
    assert result.returncode == 0, result.stderr
    # No TensorFlow C++ lines, progress bars or library warnings; segjax's own warning stays.
    assert result.stderr.splitlines() == [
        'WARNING:absl:cityscapes_segmentation train: 5 pixels in 1 label files had values '
        '[40, 250] outside the known set; they are stored as 255 (ignore). First files: '
        f"['{LABELS_ZIP}:gtFine/train/bochum/{UNKNOWN_IMAGE}_gtFine_labelIds.png']"]
    lines = result.stdout.splitlines()
    assert lines[0] == (f'preparing cityscapes_segmentation/semantic_segmentation/1.0.0 in '
                        f'{tmp_path}/tfds (once; later runs reuse it)')
    assert lines[1].startswith('prepared cityscapes_segmentation/semantic_segmentation/1.0.0 in ')
    assert lines[2:5] == ['train: 3 examples', 'validation: 2 examples', 'test: 1 examples']
    assert len(lines) == 7  # + the unknown label counts, + where it is
    # Prepared: a second run only reports.
    assert run_prepare(tmp_path / 'tfds', manual).stdout.splitlines() == lines[2:]
    # --verbose brings TFDS's own lines back (preparing again, in a fresh data_dir).
    verbose = run_prepare(tmp_path / 'tfds2', manual, '--verbose')
    assert verbose.returncode == 0, verbose.stderr
    assert 'Downloading and preparing dataset' in verbose.stdout
    assert 'Extraction completed' in verbose.stderr  # TFDS's progress bar
