"""The VOC 2012 (+ SBD) builder on tiny fake archives in the official layouts, and its pipeline."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from segjax import visualize
from segjax.data import pipeline, voc
from segjax.data import prepare as prepare_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOC_TRAIN = ('2007_000032', '2007_000039', '2008_000002')
VOC_VAL = ('2007_000033', '2007_000042')
# SBD's own lists overlap VOC's both ways, as the real ones do.
SBD_TRAIN = ('2008_000002', '2008_000003', '2008_000007', '2007_000033')
SBD_VAL = ('2008_000008', '2007_000042', '2007_000039')
TRAIN_AUG = {'2007_000032', '2007_000039', '2008_000002', '2008_000003', '2008_000007',
             '2008_000008'}
SBD_ONLY_IMAGE = '2008_000008'  # not in the fake VOC JPEGImages: read from SBD's img/


def _size(image_id: str) -> tuple[int, int]:
    """(height, width): examples differ in size and orientation."""
    index = int(image_id[-3:]) + int(image_id[3])
    return (30, 40) if index % 2 else (44, 28)


def _image(image_id: str) -> np.ndarray:
    rng = np.random.default_rng(int(image_id.replace('_', '')))
    return rng.integers(0, 256, _size(image_id) + (3,), dtype=np.uint8)


def _classes(image_id: str) -> np.ndarray:
    """Blocks of a few classes covering the image, class ids 0..20."""
    rng = np.random.default_rng(int(image_id.replace('_', '')) + 1)
    height, width = _size(image_id)
    label = np.zeros((height, width), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        label[y:y + 10, x:x + 12] = rng.integers(1, 21)
    return label


def voc_label(image_id: str) -> np.ndarray:
    """VOC's annotation: the classes with a 255 band on every class boundary."""
    label = _classes(image_id)
    edges = np.zeros_like(label, bool)
    edges[:, 1:] |= label[:, 1:] != label[:, :-1]
    edges[1:, :] |= label[1:, :] != label[:-1, :]
    return np.where(edges, 255, label).astype(np.uint8)


def sbd_label(image_id: str) -> np.ndarray:
    """SBD's annotation of the same image: no boundary band."""
    return _classes(image_id)


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def palette_png(indices: np.ndarray) -> bytes:
    """A SegmentationClass file: mode 'P' with VOCdevkit's 256-colour map."""
    image = Image.fromarray(indices, mode='P')
    image.putpalette(visualize.default_palette(256).tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def sbd_mat(segmentation: np.ndarray) -> bytes:
    """A cls/<id>.mat as the SBD release has it: struct GTcls with Segmentation, Boundaries
    (a cell of 20 sparse masks) and CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(segmentation == i + 1, dtype=bool)
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)])
    gtcls = {'Segmentation': segmentation, 'Boundaries': boundaries,
             'CategoriesPresent': present.astype(np.uint8)}
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {'GTcls': gtcls}, do_compression=True)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_voc_tar(path, replace: dict[str, bytes] | None = None) -> None:
    """VOCtrainval_11-May-2012.tar: VOCdevkit/VOC2012/{JPEGImages, SegmentationClass,
    SegmentationObject, Annotations, ImageSets/...}; `replace` overrides members by name."""
    root = 'VOCdevkit/VOC2012/'
    members = {
        root + 'ImageSets/Segmentation/train.txt': '\n'.join(VOC_TRAIN) + '\n',
        root + 'ImageSets/Segmentation/val.txt': '\n'.join(VOC_VAL) + '\n',
        root + 'ImageSets/Segmentation/trainval.txt': '\n'.join(VOC_TRAIN + VOC_VAL) + '\n',
        root + 'ImageSets/Main/train.txt': '2007_000027\n',
    }
    members = {k: v.encode() for k, v in members.items()}
    all_ids = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL) - {SBD_ONLY_IMAGE})
    for image_id in all_ids:
        members[f'{root}JPEGImages/{image_id}.jpg'] = _jpeg(_image(image_id))
        members[f'{root}Annotations/{image_id}.xml'] = b'<annotation></annotation>'
    for image_id in VOC_TRAIN + VOC_VAL:
        label = voc_label(image_id)
        members[f'{root}SegmentationClass/{image_id}.png'] = palette_png(label)
        objects = (label > 0).astype(np.uint8)
        members[f'{root}SegmentationObject/{image_id}.png'] = palette_png(objects)
    members.update(replace or {})
    with tarfile.open(path, 'w') as tar:
        for name in sorted(members):
            _add(tar, name, members[name])


def write_sbd_tgz(path, replace: dict[str, bytes] | None = None) -> None:
    """benchmark.tgz: benchmark_RELEASE/dataset/{train.txt, val.txt, cls/, inst/, img/}."""
    root = 'benchmark_RELEASE/dataset/'
    members = {root + 'train.txt': ('\n'.join(SBD_TRAIN) + '\n').encode(),
               root + 'val.txt': ('\n'.join(SBD_VAL) + '\n').encode()}
    for image_id in SBD_TRAIN + SBD_VAL:
        members[f'{root}cls/{image_id}.mat'] = sbd_mat(sbd_label(image_id))
        members[f'{root}img/{image_id}.jpg'] = _jpeg(_image(image_id))
    members.update(replace or {})
    with tarfile.open(path, 'w:gz') as tar:
        for name in sorted(members):
            _add(tar, name, members[name])


def prepare(tmp_path, config: str = 'voc2012', voc_replace=None, sbd_replace=None):
    manual = tmp_path / 'manual'
    manual.mkdir()
    write_voc_tar(manual / voc.VOC_ARCHIVE, voc_replace)
    if config == 'aug':
        write_sbd_tgz(manual / voc.SBD_ARCHIVE, sbd_replace)
    data_dir = str(tmp_path / 'tfds')
    voc.VocSegmentation(config=config, data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return voc.VocSegmentation(config=config, data_dir=data_dir)  # as a later run reads it


def examples(builder, split: str) -> dict[str, dict]:
    return {ex['image/filename'].decode()[:-4]: ex
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


@pytest.fixture(scope='module')
def aug_builder(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp('voc_aug'), 'aug')


# ----------------------------------------------------------------------------------------------
# Builder.


def test_class_names_and_palette():
    assert len(voc.CLASS_NAMES) == 21 and voc.CLASS_NAMES[15] == 'person'
    np.testing.assert_array_equal(voc.PALETTE, visualize.default_palette(21))
    assert tuple(visualize.default_palette(256)[255]) == voc.BOUNDARY_COLOR


def test_voc2012_splits_labels_and_images(tmp_path):
    builder = prepare(tmp_path, 'voc2012')
    assert builder.info.splits['train'].num_examples == len(VOC_TRAIN)
    assert builder.info.splits['validation'].num_examples == len(VOC_VAL)
    assert set(builder.info.splits) == {'train', 'validation'}
    for split, ids in (('train', VOC_TRAIN), ('validation', VOC_VAL)):
        found = examples(builder, split)
        assert set(found) == set(ids)
        for image_id, ex in found.items():
            # Palette indices -> class ids, boundaries kept as 255, pixel for pixel.
            np.testing.assert_array_equal(ex['label'][..., 0], voc_label(image_id))
            assert 255 in ex['label']
            # The original JPEG bytes are stored: the image decodes exactly as the file does.
            expected = tf.io.decode_jpeg(_jpeg(_image(image_id))).numpy()
            np.testing.assert_array_equal(ex['image'], expected)
    assert builder.info.metadata['unknown_label_values']['train']['pixels'] == 0


def test_train_aug_union_minus_val_and_label_sources(aug_builder):
    splits = aug_builder.info.splits
    assert splits['train'].num_examples == 3 and splits['validation'].num_examples == 2
    assert splits['train_aug'].num_examples == len(TRAIN_AUG)
    found = examples(aug_builder, 'train_aug')
    assert set(found) == TRAIN_AUG and not set(found) & set(VOC_VAL)
    for image_id, ex in found.items():
        # VOC's own annotation where there is one (VOC train), SBD's .mat otherwise.
        expected = voc_label(image_id) if image_id in VOC_TRAIN else sbd_label(image_id)
        np.testing.assert_array_equal(ex['label'][..., 0], expected)
        assert ex['image'].shape[:2] == _size(image_id)
    assert 255 not in found['2008_000003']['label'] and 255 in found['2008_000002']['label']


def test_rgb_rendered_labels_are_mapped_back():
    indices = voc_label('2007_000032')
    rgb = np.concatenate([voc.PALETTE, [voc.BOUNDARY_COLOR]]).astype(np.uint8)[
        np.where(indices == 255, 21, indices)]
    np.testing.assert_array_equal(voc.colors_to_indices(rgb), indices)
    rgb[0, 0] = (1, 2, 3)  # a colour that is no class
    assert voc.colors_to_indices(rgb)[0, 0] == 256


def test_unknown_label_values_become_ignore_and_are_counted(tmp_path):
    label = voc_label('2007_000039')
    bad = label.copy()
    bad[:2, :3] = 37  # 6 pixels of a value that is no VOC class
    member = 'VOCdevkit/VOC2012/SegmentationClass/2007_000039.png'
    builder = prepare(tmp_path, 'voc2012', voc_replace={member: palette_png(bad)})
    stored = examples(builder, 'train')['2007_000039']['label'][..., 0]
    np.testing.assert_array_equal(stored, np.where(bad == 37, 255, bad))
    report = builder.info.metadata['unknown_label_values']
    assert report['train']['pixels'] == 6 and report['train']['values'] == [37]
    assert report['train']['first_files'] == [f'{voc.VOC_ARCHIVE}:{member}']
    assert report['validation']['pixels'] == 0


@pytest.mark.parametrize('member', [
    'VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg',
    'VOCdevkit/VOC2012/SegmentationClass/2007_000042.png',
])
def test_corrupt_member_is_named(tmp_path, member):
    with pytest.raises(voc.CorruptFileError, match=member):
        prepare(tmp_path, 'voc2012', voc_replace={member: b'\x89PNG\r\n\x1a\n truncated'})


def test_corrupt_sbd_mat_is_named(tmp_path):
    member = 'benchmark_RELEASE/dataset/cls/2008_000007.mat'
    with pytest.raises(voc.CorruptFileError, match=f'{voc.SBD_ARCHIVE}:{member}'):
        prepare(tmp_path, 'aug', sbd_replace={member: b'MATLAB 5.0 MAT-file, garbage'})


def test_size_mismatch_names_the_example(tmp_path):
    member = 'VOCdevkit/VOC2012/SegmentationClass/2007_000032.png'
    small = palette_png(voc_label('2007_000032')[:-3])
    with pytest.raises(ValueError, match=r'train example 2007_000032: image .*2007_000032\.jpg '
                                         r'is \d+x\d+ but label .*2007_000032\.png'):
        prepare(tmp_path, 'voc2012', voc_replace={member: small})


# ----------------------------------------------------------------------------------------------
# Pipeline on the prepared data.


def test_train_recipe_batches(aug_builder):
    recipe = pipeline.TrainRecipe(
        crop_size=(32, 32), scale_range=(0.5, 2.0), base_size=(64, 32), cat_max_ratio=0.75,
        flip=True, rotation=10.0, photometric=True, num_classes=21)
    batches = pipeline.train_batches(aug_builder, recipe, split='train_aug', local_batch_size=4,
                                     seed=0)
    for _ in range(3):
        batch = next(batches)
        assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].shape == (4, 32, 32)
        assert set(np.unique(batch['label'])) <= set(range(21)) | {255}


def test_eval_batches_are_the_stored_labels_padded(aug_builder):
    recipe = pipeline.EvalRecipe(pad_size=(48, 48), num_classes=21)
    batches = list(pipeline.eval_batches(aug_builder, recipe, split='validation',
                                         local_batch_size=2))
    assert len(batches) == 1 and batches[0]['valid'].all()
    # The pipeline reads the split in TFDS's stored order, as as_dataset does.
    stored = tfds.as_numpy(aug_builder.as_dataset(split='validation', shuffle_files=False))
    for label, ex in zip(batches[0]['label'], stored, strict=True):
        image_id = ex['image/filename'].decode()[:-4]
        height, width = _size(image_id)
        np.testing.assert_array_equal(label[:height, :width], voc_label(image_id))
        assert (label[height:] == 255).all() and (label[:, width:] == 255).all()


def test_eval_resize_keeping_aspect_ratio(aug_builder):
    recipe = pipeline.EvalRecipe(pad_size=(24, 24), base_size=(24, 16), num_classes=21)
    batch = next(pipeline.eval_batches(aug_builder, recipe, split='validation',
                                       local_batch_size=2))
    for label in batch['label']:
        valid_rows = (label != 255).any(axis=1).sum()
        valid_cols = (label != 255).any(axis=0).sum()
        # 30x40 -> 16x21 (short edge bound), 44x28 -> 24x15 (long edge bound).
        assert (valid_rows, valid_cols) in ((16, 21), (24, 15))
        assert set(np.unique(label)) <= set(range(21)) | {255}


# ----------------------------------------------------------------------------------------------
# Damaged archives: one line naming the archive and what to do, nothing half-extracted left.


def prepared(tmp_path, config: str = 'voc2012'):
    """What the prepare command and every run call (lock, one-line errors)."""
    return prepare_lib.prepared(
        lambda: voc.VocSegmentation(config=config, data_dir=str(tmp_path / 'tfds')),
        tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.rglob('incomplete*'))


def damaged_archives(tmp_path, voc_bytes=None, sbd_bytes=None) -> None:
    """The fake archives in tmp_path/manual, each passed through a damaging function."""
    manual = tmp_path / 'manual'
    manual.mkdir()
    for name, write, damage in ((voc.VOC_ARCHIVE, write_voc_tar, voc_bytes),
                                (voc.SBD_ARCHIVE, write_sbd_tgz, sbd_bytes)):
        write(manual / name)
        if damage is not None:
            (manual / name).write_bytes(damage((manual / name).read_bytes()))


def flip_bytes(data: bytes, start: int, count: int = 64) -> bytes:
    data = bytearray(data)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    return bytes(data)


def test_truncated_voc_tar_names_file_size_and_source(tmp_path):
    damaged_archives(tmp_path, voc_bytes=lambda b: b[:len(b) * 2 // 3])
    size = (tmp_path / 'manual' / voc.VOC_ARCHIVE).stat().st_size
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepared(tmp_path)
    assert str(error.value) == (
        f'{tmp_path / "manual" / voc.VOC_ARCHIVE} is truncated (it ends inside a member, without '
        f'the tar end-of-archive blocks); it is {size:,} bytes (the official file: '
        f'1,999,639,040 bytes, sha256 {voc.VOC_SHA256}) - download it again from {voc.VOC_URL} '
        'and run again')
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize('damage, problem', [
    (lambda b: b[:len(b) * 2 // 3], 'Compressed file ended before the end-of-stream marker'),
    (lambda b: flip_bytes(b, 0, 512), ''),  # no gzip header: tarfile cannot open it
])
def test_damaged_sbd_tgz_is_one_line_and_leaves_no_half_extraction(tmp_path, damage, problem):
    damaged_archives(tmp_path, sbd_bytes=damage)
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepared(tmp_path, 'aug')
    message = str(error.value)
    assert message.startswith(f'{tmp_path / "manual" / voc.SBD_ARCHIVE} is truncated or corrupt '
                              f'(extracting it failed: {problem}')
    assert message.endswith(f'(the official file: about 1.4 GB, md5 {voc.SBD_MD5}) - download '
                            f'it again from {voc.SBD_URL} and run again')
    assert '\n' not in message
    assert leftovers(tmp_path) == []  # TFDS leaves incomplete.<uuid>_TAR_GZ.benchmark.tgz
    assert (tmp_path / 'tfds' / 'downloads' / 'extracted' / f'TAR.{voc.VOC_ARCHIVE}').is_dir()


def test_damaged_member_then_the_downloaded_again_archive_is_extracted_again(tmp_path):
    member = 'VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg'
    damaged_archives(tmp_path)
    write_voc_tar(tmp_path / 'manual' / voc.VOC_ARCHIVE, {member: b'\xff\xd8\xff not a jpeg'})
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepared(tmp_path)
    message = str(error.value)
    assert message.startswith(f'preparing voc2012_segmentation/voc2012/1.0.0 in {tmp_path}/tfds: '
                              f'archive member {voc.VOC_ARCHIVE}:{member} is not a readable image')
    assert f'{voc.VOC_ARCHIVE} is damaged or not the official file; it is ' in message
    assert message.endswith(f'download it again from {voc.VOC_URL} and run again')
    assert leftovers(tmp_path) == []
    # TFDS keys extractions by file name: the old one must not be reused for the new file.
    write_voc_tar(tmp_path / 'manual' / voc.VOC_ARCHIVE)
    stored = examples(prepared(tmp_path), 'validation')
    assert sorted(stored) == sorted(VOC_VAL)
    np.testing.assert_array_equal(stored['2007_000033']['label'][..., 0],
                                  voc_label('2007_000033'))


def run_module(module, *args):
    return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_prepare_command_error_is_one_line_without_traceback(tmp_path):
    damaged_archives(tmp_path, voc_bytes=lambda b: b[:20_000])
    result = run_module('segjax.data.voc', '--data_dir', tmp_path / 'tfds', '--manual_dir',
                        tmp_path / 'manual')
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith('python -m segjax.data.voc: error: ')
    assert 'is truncated' in result.stderr and voc.VOC_URL in result.stderr
    assert result.stdout == (f'preparing voc2012_segmentation/voc2012/1.0.0 in {tmp_path}/tfds '
                             '(once; later runs reuse it)\n')


def test_train_on_a_damaged_archive_is_a_clean_error(tmp_path):
    damaged_archives(tmp_path, voc_bytes=lambda b: b[:20_000])
    data_dir = tmp_path / 'tfds'
    (data_dir / 'downloads').mkdir(parents=True)
    (tmp_path / 'manual').rename(data_dir / 'downloads' / 'manual')  # TFDS's default place
    result = run_module('segjax.train', '--config', 'experiments/fcn_voc_aug.py', '--workdir',
                        tmp_path / 'run', f'--config.data.data_dir={data_dir}')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert result.stderr.startswith(f'segjax.train: error: {data_dir}/downloads/manual/'
                                    f'{voc.VOC_ARCHIVE} is truncated')
    assert result.stderr.count('\n') == 1, result.stderr
