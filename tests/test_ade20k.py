"""ADE20K: the builder on a tiny fake ADEChallengeData2016.zip in the official layout
(ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}, values
0..150), the 0 -> ignore / k -> k - 1 mapping pixel for pixel, hostile members, and the pipeline."""

import io
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import ade20k, pipeline
from segjax.data import prepare as prepare_lib
from segjax.data.voc import CorruptFileError, MissingMemberError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 'ADEChallengeData2016'
TRAIN = ('ADE_train_00000001', 'ADE_train_00000002', 'ADE_train_00000003')
VAL = ('ADE_val_00000001', 'ADE_val_00000002')
GREY_IMAGE = 'ADE_train_00000002'  # a greyscale JPEG, as a few real ones are
UNKNOWN_IMAGE = 'ADE_train_00000003'  # its annotation also holds 151 and 200 (no class)
PALETTE_LABEL = 'ADE_val_00000002'  # its annotation is a mode 'P' PNG


def size(example_id: str) -> tuple[int, int]:
    """(height, width): examples differ in size and orientation."""
    return (24, 32) if int(example_id[-1]) % 2 else (32, 20)


def image(example_id: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, example_id)))
    return rng.integers(0, 256, size(example_id) + (3,), dtype=np.uint8)


def annotation(example_id: str) -> np.ndarray:
    """Every value 0..150 (0 = "other") in a shuffled image, plus a larger region."""
    rng = np.random.default_rng(sum(map(ord, example_id)) + 1)
    height, width = size(example_id)
    raw = rng.permutation(np.resize(np.arange(151), height * width)).reshape(height, width)
    raw[2:8, 2:12] = rng.integers(1, 151)
    if example_id == UNKNOWN_IMAGE:
        raw[0, :2] = 151
        raw[1, :3] = 200
    return raw.astype(np.uint8)


def expected_label(example_id: str) -> np.ndarray:
    """Written out independently of the builder's table: 0 and > 150 -> 255, k -> k - 1."""
    raw = annotation(example_id).astype(np.int32)
    return np.where((raw == 0) | (raw > 150), 255, raw - 1).astype(np.uint8)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    picture = Image.fromarray(array)
    if mode == 'P':
        picture = Image.fromarray(array, mode='P')
        picture.putpalette(ade20k.PALETTE.tobytes() + bytes(3 * 106))
    buffer = io.BytesIO()
    picture.save(buffer, format='PNG')
    return buffer.getvalue()


def image_bytes(example_id: str) -> bytes:
    pixels = image(example_id)
    return jpeg(pixels[..., 0] if example_id == GREY_IMAGE else pixels)


def members(replace: dict | None = None) -> dict[str, bytes]:
    """The official zip's members (directories, the two text files, images, annotations);
    `replace` overrides members by name (None removes one)."""
    files = {f'{R}/': b'', f'{R}/objectInfo150.txt': b'Idx\tRatio\tTrain\tVal\tName\n',
             f'{R}/sceneCategories.txt': b'ADE_train_00000001 airport_terminal\n'}
    for directory, ids in (('training', TRAIN), ('validation', VAL)):
        files[f'{R}/images/{directory}/'] = b''
        files[f'{R}/annotations/{directory}/'] = b''
        for example_id in ids:
            files[f'{R}/images/{directory}/{example_id}.jpg'] = image_bytes(example_id)
            files[f'{R}/annotations/{directory}/{example_id}.png'] = png(
                annotation(example_id), 'P' if example_id == PALETTE_LABEL else None)
    for name, data in (replace or {}).items():
        if data is None:
            del files[name]
        else:
            files[name] = data
    return files


def write_zip(path, replace=None, extra: list[tuple[str, bytes]] = ()) -> None:
    """`extra` members are appended as they are (duplicates, hostile names)."""
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members(replace).items():
            archive.writestr(name, data)
        for name, data in extra:
            info = zipfile.ZipInfo(name)
            archive.writestr(info, data)


def prepare(tmp_path, replace=None, extra=()):
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_zip(manual / ade20k.ARCHIVE, replace, extra)
    data_dir = str(tmp_path / 'tfds')
    ade20k.Ade20k(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return ade20k.Ade20k(data_dir=data_dir)  # as a later run reads it


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp('ade20k'))


def stored(builder, split: str) -> dict[str, dict]:
    return {ex['image/filename'].decode()[:-4]: ex
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


# ----------------------------------------------------------------------------------------------
# Classes and the label mapping.


def test_class_names_palette_and_mapping_table():
    assert len(ade20k.CLASS_NAMES) == ade20k.NUM_CLASSES == 150
    assert len(set(ade20k.CLASS_NAMES)) == 150
    # objectInfo150.txt's order: a few anchors along it.
    assert ade20k.CLASS_NAMES[:5] == ('wall', 'building', 'sky', 'floor', 'tree')
    assert ade20k.CLASS_NAMES[12] == 'person' and ade20k.CLASS_NAMES[20] == 'car'
    assert ade20k.CLASS_NAMES[7] == 'bed'  # mmsegmentation's has a trailing space: 'bed '
    assert ade20k.CLASS_NAMES[-1] == 'flag'
    assert ade20k.PALETTE.shape == (150, 3) and ade20k.PALETTE.dtype == np.uint8
    assert tuple(ade20k.PALETTE[0]) == (120, 120, 120) and tuple(ade20k.PALETTE[-1]) == (92, 0,
                                                                                        255)
    table = ade20k.RAW_TO_CLASS
    assert table.shape == (256,) and table[0] == 255
    for value in range(1, 151):
        assert table[value] == value - 1
    assert (table[151:] == 255).all()


# ----------------------------------------------------------------------------------------------
# Builder.


def test_splits_images_and_mapped_labels_pixel_for_pixel(builder):
    assert builder.info.splits['train'].num_examples == len(TRAIN)
    assert builder.info.splits['validation'].num_examples == len(VAL)
    for split, ids in (('train', TRAIN), ('validation', VAL)):
        found = stored(builder, split)
        assert sorted(found) == sorted(ids)
        for example_id, ex in found.items():
            np.testing.assert_array_equal(ex['label'][..., 0], expected_label(example_id))
            # The original JPEG bytes, decoded as training decodes them; the greyscale one was
            # decoded (by PIL) and stored as RGB PNG pixels.
            if example_id == GREY_IMAGE:
                decoded = np.asarray(Image.open(io.BytesIO(image_bytes(example_id))).convert('RGB'))
            else:
                decoded = tf.io.decode_jpeg(image_bytes(example_id)).numpy()
            np.testing.assert_array_equal(ex['image'], decoded)
    assert set(np.unique(stored(builder, 'train')['ADE_train_00000001']['label'])) == (
        set(range(150)) | {255})


def test_unknown_values_are_ignored_and_counted(builder):
    report = builder.info.metadata['unknown_label_values']
    assert report['train']['pixels'] == 5 and report['train']['values'] == [151, 200]
    assert report['train']['first_files'] == [
        f'{ade20k.ARCHIVE}:{R}/annotations/training/{UNKNOWN_IMAGE}.png']
    assert report['validation']['pixels'] == 0


def test_missing_zip_names_file_directory_and_url(tmp_path):
    builder = ade20k.Ade20k(data_dir=str(tmp_path / 'tfds'))
    with pytest.raises(FileNotFoundError) as error:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(tmp_path / 'manual')))
    for needed in (ade20k.ARCHIVE, str(tmp_path / 'manual'), ade20k.URL):
        assert needed in str(error.value)


# ----------------------------------------------------------------------------------------------
# Hostile and damaged members: each an error naming the member.


@pytest.mark.parametrize('name', [
    f'{R}/images/training/../../../evil.jpg', '/etc/evil.png', '../ADE_train_00000009.jpg',
    f'{R}\\images\\training\\ADE_train_00000009.jpg', 'C:/evil.png',
])
def test_unsafe_member_names_are_refused(tmp_path, name):
    with pytest.raises(CorruptFileError, match='has an unsafe name') as error:
        prepare(tmp_path, extra=[(name, b'x')])
    assert repr(f'{ade20k.ARCHIVE}:{name}') in str(error.value)


def test_duplicate_member_is_refused(tmp_path):
    name = f'{R}/annotations/training/{TRAIN[0]}.png'
    with pytest.warns(UserWarning, match='Duplicate name'):  # zipfile's own warning
        with pytest.raises(CorruptFileError, match=f'{name} is in the archive twice'):
            prepare(tmp_path, extra=[(name, png(annotation(TRAIN[0])))])


def test_oversized_member_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(ade20k, 'MAX_MEMBER_BYTES', 1000)  # the fake JPEGs are ~1-2 KB
    with pytest.raises(CorruptFileError, match=r'images/training/ADE_train_\d+\.jpg is [\d,]+ '
                                               'bytes, more than the 1,000'):
        prepare(tmp_path)


def test_image_with_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(ade20k, 'MAX_PIXELS', 24 * 32 - 1)
    with pytest.raises(CorruptFileError, match='is 32x24 pixels, more than the 767'):
        prepare(tmp_path)


@pytest.mark.parametrize('name, data, problem', [
    (f'{R}/images/validation/{VAL[1]}.jpg', b'\xff\xd8\xff not a jpeg', 'not a readable image'),
    (f'{R}/annotations/training/{TRAIN[1]}.png', png(image(TRAIN[1])),
     "not a readable annotation PNG: an annotation has one channel of class values, this one is "
     "'RGB'"),
    (f'{R}/annotations/validation/{VAL[0]}.png', png(annotation(VAL[0]))[:60],
     'not a readable annotation PNG'),
])
def test_unreadable_member_is_named(tmp_path, name, data, problem):
    with pytest.raises(CorruptFileError, match=f'archive member {ade20k.ARCHIVE}:{name} '
                                               f'(is )?{problem}'):
        prepare(tmp_path, replace={name: data})


@pytest.mark.parametrize('removed, missing', [
    (f'{R}/annotations/training/{TRAIN[2]}.png', f'{R}/annotations/training/{TRAIN[2]}.png'),
    (f'{R}/images/validation/{VAL[0]}.jpg', f'{R}/images/validation/{VAL[0]}.jpg'),
])
def test_image_without_annotation_and_the_reverse(tmp_path, removed, missing):
    with pytest.raises(MissingMemberError, match=f'archive member {ade20k.ARCHIVE}:{missing} is '
                                                 'missing'):
        prepare(tmp_path, replace={removed: None})


def test_size_mismatch_names_the_example(tmp_path):
    name = f'{R}/annotations/validation/{VAL[0]}.png'
    with pytest.raises(ValueError, match=f'validation example {VAL[0]}: image .* is 24x32 but '
                                         'annotation .* is 24x30'):
        prepare(tmp_path, replace={name: png(annotation(VAL[0])[:, :30])})


def test_archive_without_the_layout_is_named(tmp_path):
    replace = {name: None for name in members() if '/images/training/' in name}
    with pytest.raises(MissingMemberError, match=f'has no {R}/images/training/ADE_'):
        prepare(tmp_path, replace=replace)


def prepared(tmp_path):
    """What the prepare command and every run call (lock, one-line errors)."""
    return prepare_lib.prepared(
        lambda: ade20k.Ade20k(data_dir=str(tmp_path / 'tfds')),
        tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))


def damaged(tmp_path, damage) -> str:
    manual = tmp_path / 'manual'
    manual.mkdir()
    path = manual / ade20k.ARCHIVE
    write_zip(path)
    path.write_bytes(damage(path.read_bytes()))
    return str(path)


def test_truncated_zip_is_one_line_naming_it(tmp_path):
    path = damaged(tmp_path, lambda b: b[:len(b) // 2])  # no central directory
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepared(tmp_path)
    message = str(error.value)
    assert message == (f'{path} is truncated or corrupt (reading it failed: File is not a zip '
                       f'file); it is {os.path.getsize(path):,} bytes - download it again from '
                       f'{ade20k.URL} and run again')


def test_corrupt_member_data_names_member_and_archive(tmp_path):
    name = f'{R}/images/training/{TRAIN[0]}.jpg'

    def flip_member_bytes(data: bytes) -> bytes:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = archive.getinfo(name)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 20
        data = bytearray(data)
        data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
        return bytes(data)

    path = damaged(tmp_path, flip_member_bytes)
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepared(tmp_path)
    message = str(error.value)
    assert message.startswith(f'preparing ade20k_segmentation/1.0.0 in {tmp_path}/tfds: archive '
                              f'member {ade20k.ARCHIVE}:{name} ')
    assert message.endswith(f'{ade20k.ARCHIVE} is damaged or not the official file; it is '
                            f'{os.path.getsize(path):,} bytes - download it again from '
                            f'{ade20k.URL} and run again')
    assert '\n' not in message


# ----------------------------------------------------------------------------------------------
# Pipeline.


def test_train_batches(builder):
    recipe = pipeline.TrainRecipe(
        crop_size=(16, 16), scale_range=(0.5, 2.0), base_size=(64, 16), cat_max_ratio=0.75,
        flip=True, photometric=True, num_classes=150)
    batches = pipeline.train_batches(builder, recipe, split='train', local_batch_size=2, seed=0)
    for _ in range(3):
        batch = next(batches)
        assert batch['image'].shape == (2, 16, 16, 3) and batch['label'].shape == (2, 16, 16)
        assert batch['image'].dtype == np.float32
        assert set(np.unique(batch['label'])) <= set(range(150)) | {255}


def test_eval_batches_are_the_mapped_labels_padded(builder):
    recipe = pipeline.EvalRecipe(pad_size=(32, 32), num_classes=150)
    (batch,) = list(pipeline.eval_batches(builder, recipe, split='validation',
                                          local_batch_size=2))
    order = [ex['image/filename'].decode()[:-4] for ex in tfds.as_numpy(
        builder.as_dataset(split='validation', shuffle_files=False))]
    for label, example_id in zip(batch['label'], order, strict=True):
        height, width = size(example_id)
        np.testing.assert_array_equal(label[:height, :width], expected_label(example_id))
        assert (label[height:] == 255).all() and (label[:, width:] == 255).all()


@pytest.mark.slow
@pytest.mark.long
def test_prepare_command(tmp_path):
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_zip(manual / ade20k.ARCHIVE)
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.data.ade20k', '--data_dir', str(tmp_path / 'tfds'),
         '--manual_dir', str(manual)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (f'preparing ade20k_segmentation/1.0.0 in {tmp_path}/tfds (once; later '
                        'runs reuse it)')
    assert lines[2:4] == ['train: 3 examples', 'validation: 2 examples']
    assert 'the official ADEChallengeData2016.zip has 20210' in result.stderr
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / ade20k.ARCHIVE).write_bytes(b'PK\x03\x04 not a zip')
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.data.ade20k', '--data_dir', str(tmp_path / 'tfds2'),
         '--manual_dir', str(broken)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith('python -m segjax.data.ade20k: error: ')
    assert 'is truncated or corrupt' in result.stderr


@pytest.mark.slow
@pytest.mark.long
def test_the_ade20k_experiment_trains_and_evaluates_on_the_fake_zip(tmp_path):
    """The experiment's data and recipe end to end (a tiny U-Net in place of the ResNet, with a
    10x LR group), prepared from <data_dir>/downloads/manual as a first run does."""
    from segjax import config as config_lib
    from segjax import train
    from segjax.models import unet

    manual = tmp_path / 'tfds' / 'downloads' / 'manual'
    manual.mkdir(parents=True)
    write_zip(manual / ade20k.ARCHIVE)
    config = config_lib.load('experiments/deeplabv3plus_r50_ade20k.py', [
        f'data.data_dir={tmp_path / "tfds"}', 'num_steps=2', 'batch_size=8',
        'data.crop_size=(16, 16)', 'data.base_size=(32, 16)', 'data.eval_base_size=(32, 16)',
        'data.eval_pad_size=(32, 32)', 'eval_batch_size=8', 'log_every=1', 'eval_every=0',
        'checkpoint_every=2', 'num_summary_images=0'])
    config.model = {'fn': unet.UNet, 'base_width': 4, 'depth': 2}
    config.loss = {'fn': config.loss.main}
    config.optimizer.lr_multipliers = {'ConvTranspose2x2': 10.0}
    config_lib.validate(config)
    result = train.train(config, str(tmp_path / 'run'))
    assert 0.0 <= result['miou'] <= 1.0 and result['skipped_steps'] == 0
    assert result['class_names'] == list(ade20k.CLASS_NAMES)
