"""COCO 2017 instances: the builder on tiny fake official zips (train2017.zip, val2017.zip,
annotations_trainval2017.zip with annotations/instances_{train,val}2017.json), masks against
pycocotools' own COCO.annToMask on the same json, hostile archives and jsons, and the instance
transforms on the result."""

import copy
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
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segjax.data import coco, instance_transforms
from segjax.data import prepare as prepare_lib
from segjax.data.voc import CorruptFileError, MissingMemberError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANNOTATIONS = coco.ANNOTATIONS_ARCHIVE
VAL_JSON = 'annotations/instances_val2017.json'
TRAIN_JSON = 'annotations/instances_train2017.json'

# (image id, height, width); 285 is a greyscale JPEG, 632 has no annotation.
VAL_IMAGES = ((139, 32, 40), (285, 24, 36), (632, 28, 28))
TRAIN_IMAGES = ((9, 30, 24), (25, 26, 34))
GREY = 285


def file_name(image_id: int) -> str:
    return f'{image_id:012d}.jpg'


def pixels(image_id: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(image_id)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def image_bytes(image_id: int, height: int, width: int) -> bytes:
    array = pixels(image_id, height, width)
    return jpeg(array[..., 0] if image_id == GREY else array)


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros, written out by hand (not pycocotools)."""
    flat = mask.T.reshape(-1).astype(int)
    runs, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    return runs + [run]


def crowd_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 2:, 3:width - 5] = 1
    mask[2:5, 1:4] = 1
    return mask


def categories() -> list[dict]:
    return [{'supercategory': 'thing', 'id': i, 'name': n} for i, n in coco._CATEGORIES]


def annotation(annotation_id, image_id, category_id, segmentation, bbox, iscrowd=0) -> dict:
    return {'id': annotation_id, 'image_id': image_id, 'category_id': category_id,
            'segmentation': segmentation, 'bbox': bbox, 'iscrowd': iscrowd, 'area': 1.0}


def val_json() -> dict:
    rle_mask = np.zeros((24, 36), np.uint8)
    rle_mask[3:20, 10:30] = 1
    rle_mask[8:12, 15:18] = 0  # a hole
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))['counts'].decode('ascii')
    annotations = [
        # Two polygon parts; a person.
        annotation(1, 139, 1, [[4, 4, 20, 4, 20, 18, 4, 18], [25, 20, 35, 20, 30, 30.5]],
                   [4, 4, 31, 26.5]),
        # A tv (COCO id 72 -> label 63) whose polygon and box reach outside the image.
        annotation(2, 139, 72, [[-3, -2, 12.5, -2, 12.5, 10, -3, 10]], [-3, -2, 15.5, 12]),
        # A crowd as uncompressed RLE.
        annotation(3, 139, 1, {'size': [32, 40], 'counts': uncompressed_rle(crowd_mask(32, 40))},
                   [1, 2, 34, 30], iscrowd=1),
        # A zero-width box (kept; drop_degenerate_boxes removes it in training).
        annotation(4, 139, 3, [[10, 10, 10, 15, 10, 12]], [10, 10, 0, 5]),
        # A polygon of 2 points (dropped and counted) next to a valid one.
        annotation(5, 139, 17, [[5, 22, 15, 22, 15, 30, 5, 30], [1, 1, 2, 2]], [5, 22, 10, 8]),
        # A compressed-RLE string on the greyscale image; a toothbrush (COCO 90 -> label 80).
        annotation(6, 285, 90, {'size': [24, 36], 'counts': compressed}, [10, 3, 20, 17]),
    ]
    return {
        'info': {'description': 'fake COCO 2017'}, 'licenses': [],
        'images': [{'id': i, 'file_name': file_name(i), 'height': h, 'width': w, 'license': 1}
                   for i, h, w in VAL_IMAGES[::-1]],  # not in id order
        'annotations': annotations, 'categories': categories(),
    }


def train_json() -> dict:
    return {
        'images': [{'id': i, 'file_name': file_name(i), 'height': h, 'width': w}
                   for i, h, w in TRAIN_IMAGES],
        'annotations': [
            annotation(10, 9, 1, [[2, 2, 20, 3, 12, 25]], [2, 2, 18, 23]),
            annotation(11, 25, 3, {'size': [26, 34], 'counts': uncompressed_rle(
                crowd_mask(26, 34))}, [1, 2, 26, 24], iscrowd=1),
        ],
        'categories': categories(),
    }


def archives(edit_val=None, edit_train=None) -> dict[str, dict[str, bytes]]:
    """{zip name: {member: bytes}} in the official layout (with directory entries)."""
    val, train = val_json(), train_json()
    if edit_val:
        edit_val(val)
    if edit_train:
        edit_train(train)
    return {
        'val2017.zip': {'val2017/': b'', **{f'val2017/{file_name(i)}': image_bytes(i, h, w)
                                           for i, h, w in VAL_IMAGES}},
        'train2017.zip': {'train2017/': b'', **{f'train2017/{file_name(i)}': image_bytes(i, h, w)
                                               for i, h, w in TRAIN_IMAGES}},
        ANNOTATIONS: {'annotations/': b'', VAL_JSON: json.dumps(val).encode(),
                      TRAIN_JSON: json.dumps(train).encode(),
                      'annotations/captions_val2017.json': b'{"annotations": []}'},
    }


def write_zips(manual, edit_val=None, edit_train=None, replace=None, extra=()) -> None:
    """`replace` {(zip, member): bytes or None (removed)}; `extra` [(zip, member, bytes)] are
    appended as they are (duplicates, hostile names)."""
    manual.mkdir(parents=True, exist_ok=True)
    contents = archives(edit_val, edit_train)
    for (archive, name), data in (replace or {}).items():
        if data is None:
            del contents[archive][name]
        else:
            contents[archive][name] = data
    for archive, files in contents.items():
        with zipfile.ZipFile(manual / archive, 'w', compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
            for extra_archive, name, data in extra:
                if extra_archive == archive:
                    z.writestr(zipfile.ZipInfo(name), data)


def prepare(tmp_path, **changes):
    write_zips(tmp_path / 'manual', **changes)
    data_dir = str(tmp_path / 'tfds')
    coco.Coco2017Instances(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
    return coco.Coco2017Instances(data_dir=data_dir)  # as a later run reads it


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp('coco'))


def stored(builder, split: str) -> dict[int, dict]:
    return {int(ex['image/id']): ex
            for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


def oracle(tmp_path, dataset: dict) -> COCO:
    """pycocotools' own COCO on the same json."""
    path = tmp_path / 'instances.json'
    path.write_text(json.dumps(dataset))
    return COCO(str(path))


# ----------------------------------------------------------------------------------------------
# Classes.


def test_categories_are_torchvisions_and_labels_are_contiguous():
    assert len(coco.CLASS_NAMES) == 80 and coco.NUM_CLASSES == 81
    assert coco.COCO_ID_TO_LABEL[1] == 1 and coco.COCO_ID_TO_LABEL[90] == 80
    assert sorted(coco.COCO_ID_TO_LABEL.values()) == list(range(1, 81))
    assert coco.COCO_ID_TO_LABEL[72] == 63 and coco.CLASS_NAMES[62] == 'tv'
    np.testing.assert_array_equal(coco.coco_category_ids(np.array([1, 63, 80])), [1, 72, 90])
    assert coco.coco_category_ids(np.zeros((0,), np.int32)).shape == (0,)
    with pytest.raises(ValueError, match=r'COCO labels are 1..80, got \[0, 81\]'):
        coco.coco_category_ids(np.array([0, 5, 81]))
    meta = pytest.importorskip('torchvision.models._meta')
    # torchvision's 91 names are indexed by COCO id ('N/A' in the gaps, 0 the background).
    by_id = {i: name for i, name in enumerate(meta._COCO_CATEGORIES) if name != 'N/A' and i}
    assert tuple(by_id) == coco.COCO_CATEGORY_IDS
    assert tuple(by_id.values()) == coco.CLASS_NAMES


# ----------------------------------------------------------------------------------------------
# Builder.


def test_splits_ids_images_and_filenames(builder):
    assert builder.info.splits['train'].num_examples == 2
    assert builder.info.splits['validation'].num_examples == 3
    for split, images in (('train', TRAIN_IMAGES), ('validation', VAL_IMAGES)):
        found = stored(builder, split)
        assert sorted(found) == sorted(i for i, _, _ in images)
        for image_id, height, width in images:
            ex = found[image_id]
            assert ex['image/filename'].decode() == file_name(image_id)
            assert ex['image'].shape == (height, width, 3) and ex['image'].dtype == np.uint8
            data = image_bytes(image_id, height, width)
            if image_id == GREY:  # decoded by PIL, stored as RGB PNG pixels
                decoded = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
            else:  # the original JPEG bytes
                decoded = tf.io.decode_jpeg(data).numpy()
            np.testing.assert_array_equal(ex['image'], decoded)


def test_masks_boxes_labels_and_crowd_against_pycocotools(builder, tmp_path):
    for split, dataset in (('validation', val_json()), ('train', train_json())):
        reference = oracle(tmp_path, dataset)
        found = stored(builder, split)
        for image_id, ex in found.items():
            instances = ex['instances']
            annotations = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
            height, width = ex['image'].shape[:2]
            assert instances['mask'].shape == (len(annotations), height, width)
            assert instances['mask'].dtype == np.uint8 and instances['bbox'].dtype == np.float32
            for i, ann in enumerate(annotations):
                if ann['id'] == 5:  # the 2-point polygon is dropped; annToMask cannot take it
                    ann = {**ann, 'segmentation': ann['segmentation'][:1]}
                np.testing.assert_array_equal(instances['mask'][i], reference.annToMask(ann),
                                              err_msg=f'annotation {ann["id"]}')
                x, y, w, h = ann['bbox']
                expected = [min(max(x, 0), width), min(max(y, 0), height),
                            min(max(x + w, 0), width), min(max(y + h, 0), height)]
                np.testing.assert_allclose(instances['bbox'][i], expected, rtol=0, atol=1e-6)
                assert instances['label'][i] == 1 + coco.COCO_CATEGORY_IDS.index(
                    ann['category_id'])
                assert instances['is_crowd'][i] == bool(ann['iscrowd'])


def test_values_written_out(builder):
    """The same facts as above, by hand: no oracle shared with the builder."""
    found = stored(builder, 'validation')
    first = found[139]['instances']
    np.testing.assert_array_equal(first['label'], [1, 63, 1, 3, 16])
    np.testing.assert_array_equal(first['is_crowd'], [False, False, True, False, False])
    np.testing.assert_array_equal(first['bbox'][1], [0, 0, 12.5, 10])  # clipped at 0
    np.testing.assert_array_equal(first['bbox'][3], [10, 10, 10, 15])  # zero width: kept
    np.testing.assert_array_equal(first['mask'][2], crowd_mask(32, 40))
    assert first['mask'][1][:10, :12].all() and not first['mask'][1][10:].any()
    assert first['mask'][0][4:18, 4:20].all()  # the square part of the polygon
    greyscale = found[285]['instances']
    expected = np.zeros((24, 36), np.uint8)
    expected[3:20, 10:30] = 1
    expected[8:12, 15:18] = 0
    np.testing.assert_array_equal(greyscale['mask'], expected[None])
    np.testing.assert_array_equal(greyscale['label'], [80])
    empty = found[632]['instances']  # a negative example
    assert empty['mask'].shape == (0, 28, 28) and empty['bbox'].shape == (0, 4)
    assert empty['label'].shape == (0,) and empty['is_crowd'].shape == (0,)


def test_dropped_polygons_are_counted(builder):
    report = builder.info.metadata['dropped_polygons']
    assert report['validation'] == {'polygons': 1, 'first_annotation_ids': [5]}
    assert report['train'] == {'polygons': 0, 'first_annotation_ids': []}


def test_compressed_counts_match_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(100):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        mask[: trial % 5] = trial % 2  # long runs of both values
        counts = mask_utils.encode(np.asfortranarray(mask))['counts']
        assert coco.compressed_counts(counts) == uncompressed_rle(mask)


def test_instance_transforms_take_it(builder):
    ds = builder.as_dataset(split='validation', shuffle_files=False).map(
        lambda ex: instance_transforms.instance_train_transform(
            ex, tf.constant([0, 0]), num_classes=coco.NUM_CLASSES, min_size=32, max_size=64,
            height=64, width=64, max_instances=8))
    batches = list(tfds.as_numpy(ds.batch(3)))
    (batch,) = batches
    assert batch['image'].shape == (3, 64, 64, 3) and batch['masks'].shape == (3, 8, 64, 64)
    # Image 139: the crowd and the zero-width box are dropped; 285: one; 632: none.
    assert sorted(batch['valid'].sum(axis=1).tolist()) == [0, 1, 3]
    assert set(batch['labels'][batch['valid']].tolist()) <= {1, 63, 16, 80}


def test_ground_truth_for_coco_eval(builder):
    from segjax.instance import coco_eval

    ex = stored(builder, 'validation')[139]
    annotations = coco_eval.ground_truth_annotations(int(ex['image/id']), ex['instances'], 1)
    assert [a['iscrowd'] for a in annotations] == [0, 0, 1, 0, 0]
    assert annotations[2]['area'] == crowd_mask(32, 40).sum()


# ----------------------------------------------------------------------------------------------
# Missing, hostile and damaged input: each an error naming the file, member or key.


def test_missing_zips_are_named_with_urls(tmp_path):
    (tmp_path / 'manual').mkdir()
    with zipfile.ZipFile(tmp_path / 'manual' / 'val2017.zip', 'w'):
        pass
    builder = coco.Coco2017Instances(data_dir=str(tmp_path / 'tfds'))
    with pytest.raises(FileNotFoundError) as error:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(tmp_path / 'manual')))
    message = str(error.value)
    assert f'missing: train2017.zip, {ANNOTATIONS})' in message
    assert 'http://images.cocodataset.org/zips/train2017.zip' in message
    assert str(tmp_path / 'manual') in message


@pytest.mark.parametrize('archive, name', [
    ('val2017.zip', 'val2017/../../evil.jpg'), ('train2017.zip', '/etc/evil.jpg'),
    (ANNOTATIONS, 'annotations\\instances_val2017.json'), ('val2017.zip', 'C:/evil.jpg'),
])
def test_unsafe_member_names_are_refused(tmp_path, archive, name):
    with pytest.raises(CorruptFileError, match='has an unsafe name') as error:
        prepare(tmp_path, extra=[(archive, name, b'x')])
    assert repr(f'{archive}:{name}') in str(error.value)


def test_duplicate_member_is_refused(tmp_path):
    name = f'val2017/{file_name(139)}'
    with pytest.warns(UserWarning, match='Duplicate name'):  # zipfile's own warning
        with pytest.raises(CorruptFileError, match=f'val2017.zip:{name} is in the archive twice'):
            prepare(tmp_path, extra=[('val2017.zip', name, b'x')])


def test_oversized_image_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(coco, 'MAX_IMAGE_BYTES', 500)  # the fake JPEGs are 1-3 KB
    with pytest.raises(CorruptFileError, match=r'2017.zip:(train|val)2017/\d{12}\.jpg is '
                                               r'[\d,]+ bytes, more than the 500'):
        prepare(tmp_path)


def test_json_bomb_is_refused_before_reading(tmp_path, monkeypatch):
    """8 MB of spaces (a valid json around them) compress to a few KB."""
    monkeypatch.setattr(coco, 'MAX_JSON_BYTES', 1 << 20)
    bomb = b'{"images": [], ' + b' ' * (8 << 20) + b'"annotations": [], "categories": []}'
    with pytest.raises(CorruptFileError, match=f'{ANNOTATIONS}:{VAL_JSON} is 8,388,6.. bytes, '
                                               'more than the 1,048,576'):
        prepare(tmp_path, replace={(ANNOTATIONS, VAL_JSON): bomb})
    assert os.path.getsize(tmp_path / 'manual' / ANNOTATIONS) < 100_000


def test_bounded_read_even_when_the_header_lies(tmp_path):
    path = tmp_path / 'lying.zip'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr('annotations/x.json', b' ' * 5000)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo('annotations/x.json')
        info.file_size = 100  # the header claims 100 bytes; the data inflates to 5,000
        with pytest.raises(CorruptFileError, match='lying.zip:annotations/x.json is 100 bytes, '
                                                   'more than the 50'):
            coco.read_member(z, info, 50)
        # Within the limit: reading stops at the claimed size, and the CRC then fails.
        with pytest.raises(CorruptFileError, match='lying.zip:annotations/x.json cannot be read: '
                                                   'Bad CRC-32'):
            coco.read_member(z, info, 1000)


def test_image_with_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(coco, 'MAX_PIXELS', 40 * 32 - 1)
    with pytest.raises(CorruptFileError, match='is 32x40, expected 1 to 1,279 pixels'):
        prepare(tmp_path)


def test_image_header_is_checked_before_decoding(monkeypatch):
    monkeypatch.setattr(coco, 'MAX_PIXELS', 32 * 40 - 1)
    with pytest.raises(CorruptFileError, match='z.zip:a.jpg is 32x40 pixels, more than the 1,279'):
        coco.read_image(image_bytes(139, 32, 40), 'z.zip:a.jpg')


@pytest.mark.parametrize('data, problem', [
    (b'\xff\xfe not json', 'is not JSON'),
    (b'[1, 2]', 'is not a COCO instances json: expected an object, got list'),
    (b'{"images": [], "categories": []}',
     "is not a COCO instances json: it has no key 'annotations'"),
    (b'{"images": {}, "annotations": [], "categories": []}',
     "is not a COCO instances json: it has a dict as key 'images'"),
    (b'[' * 100_000, 'is not JSON'),  # nesting deeper than the parser's recursion limit
])
def test_json_that_is_not_coco_names_the_member(tmp_path, data, problem):
    with pytest.raises(CorruptFileError, match=f'{ANNOTATIONS}:{VAL_JSON} {problem}'):
        prepare(tmp_path, replace={(ANNOTATIONS, VAL_JSON): data})


def _without(key: str, where: str):
    def edit(dataset):
        del dataset[where][1][key]
    return edit


def _set(where: str, index: int, key: str, value):
    def edit(dataset):
        dataset[where][index][key] = value
    return edit


@pytest.mark.parametrize('edit, problem', [
    (_without('file_name', 'images'), r"images\[1\] has no key 'file_name'"),
    (_without('height', 'images'), r"images\[1\] has no key 'height'"),
    (_without('segmentation', 'annotations'), r"annotations\[1\] \(id 2\) has no key "
                                              "'segmentation'"),
    (_without('category_id', 'annotations'), r"annotations\[1\] \(id 2\) has no key "
                                             "'category_id'"),
    (_set('images', 0, 'id', '632'), r"images\[0\] has id='632', expected int"),
    (_set('annotations', 0, 'iscrowd', 2), r'annotations\[0\] \(id 1\) has iscrowd=2'),
    (_set('annotations', 0, 'image_id', 7), r'annotations\[0\] \(id 1\) names image 7, which '
                                            'is not in its images'),
    (_set('annotations', 0, 'category_id', 12), r'annotations\[0\] \(id 1\) names category '
                                                "12, which is not one of COCO's 80"),
    (_set('categories', 0, 'name', 'human'), r"categories\[0\] is 1 'human', but COCO 2017's "
                                             "category 1 is 'person'"),
    (_set('images', 0, 'file_name', '../../x.jpg'), r"images\[0\] has file_name "
                                                    "'../../x.jpg', expected a plain file name"),
    (_set('annotations', 0, 'bbox', [1, 2, 3]), r'annotation 1 has bbox \[1, 2, 3\], expected '
                                                '4 finite numbers'),
])
def test_bad_entries_name_the_file_entry_and_key(tmp_path, edit, problem):
    with pytest.raises(CorruptFileError, match=f'{ANNOTATIONS}:{VAL_JSON}: {problem}'):
        prepare(tmp_path, edit_val=edit)


def _segmentation(index: int, segmentation):
    return _set('annotations', index, 'segmentation', segmentation)


@pytest.mark.parametrize('edit, problem', [
    # pycocotools would rasterise these at 5x, allocating without bound (it is killed here).
    (_segmentation(0, [[1, 1, 3e9, 3, 5, 9]]), 'has a polygon reaching .* more than 40 pixels '
                                               'outside its 32x40 image'),
    (_segmentation(0, [[1, 1, float('nan'), 3, 5, 9]]), 'has a polygon .*expected a list of '
                                                        'finite numbers'),
    (_segmentation(0, [[1, 1, '3', 3, 5, 9]]), 'has a polygon .*expected a list of finite '
                                               'numbers'),
    # pycocotools decodes counts that do not fill the image from uninitialised memory.
    (_segmentation(2, {'size': [32, 40], 'counts': [3, 4]}), 'has an invalid RLE: the run '
                                                             'lengths .* add up to 7'),
    (_segmentation(2, {'size': [32, 40], 'counts': [3, -4, 1281]}), 'has an invalid RLE: the run '
                                                                    'lengths must be >= 0'),
    (_segmentation(2, {'size': [31, 40], 'counts': [1240]}), 'has an RLE of size \\[31, 40\\], '
                                                            'but its image is 32x40'),
    (_segmentation(2, {'size': [32, 40], 'counts': 'P'}), 'has an invalid RLE: the string ends '
                                                          'inside a run length'),
    (_segmentation(2, {'size': [32, 40], 'counts': '0\x00'}), 'has an invalid RLE: character'),
    (_segmentation(2, {'size': [32, 40]}), 'has an invalid RLE: counts is a NoneType'),
])
def test_bad_segmentations_are_refused(tmp_path, edit, problem):
    with pytest.raises(CorruptFileError, match=f'{ANNOTATIONS}:{VAL_JSON}: annotation \\d+ '
                                               f'{problem}'):
        prepare(tmp_path, edit_val=edit)


def test_missing_image_member_is_named(tmp_path):
    name = f'val2017/{file_name(285)}'
    with pytest.raises(MissingMemberError, match=f'archive member val2017.zip:{name} is missing '
                                                 f'\\({ANNOTATIONS}:{VAL_JSON} lists image 285'):
        prepare(tmp_path, replace={('val2017.zip', name): None})


def test_image_size_differing_from_the_json_is_named(tmp_path):
    def edit(dataset):
        dataset['images'][2]['width'] = 41  # image 139 (the list is in reverse id order)

    with pytest.raises(CorruptFileError, match=f'val2017.zip:val2017/{file_name(139)} is 32x40 '
                                               f'but {ANNOTATIONS}:{VAL_JSON} says image 139 is '
                                               '32x41'):
        prepare(tmp_path, edit_val=edit)


def test_unreadable_image_is_named(tmp_path):
    name = f'train2017/{file_name(25)}'
    with pytest.raises(CorruptFileError, match=f'train2017.zip:{name} is not a readable image'):
        prepare(tmp_path, replace={('train2017.zip', name): b'\xff\xd8\xff not a jpeg'})


def test_annotations_zip_without_the_json(tmp_path):
    with pytest.raises(MissingMemberError, match=f'{ANNOTATIONS} has no {TRAIN_JSON}'):
        prepare(tmp_path, replace={(ANNOTATIONS, TRAIN_JSON): None})


def test_truncated_zip_is_one_line_naming_it(tmp_path):
    write_zips(tmp_path / 'manual')
    path = tmp_path / 'manual' / 'val2017.zip'
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(prepare_lib.PrepareError) as error:
        prepare_lib.prepared(
            lambda: coco.Coco2017Instances(data_dir=str(tmp_path / 'tfds')),
            tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
    assert str(error.value) == (
        f'{path} is truncated or corrupt (reading it failed: File is not a zip file); it is 100 '
        'bytes (the official file: about 780 MB) - download it again from '
        'http://images.cocodataset.org/zips/val2017.zip and run again')


def test_inputs_are_not_modified():
    """decode_instances reads the json entries; it must not change them (the json is shared)."""
    dataset = val_json()
    before = copy.deepcopy(dataset)
    images, per_image = coco.index_annotations(dataset, 'x.json')
    coco.decode_instances(per_image[139], 32, 40, 'x.json', coco.DroppedPolygons())
    assert dataset == before and set(images) == {139, 285, 632}


@pytest.mark.slow
def test_prepare_command(tmp_path):
    write_zips(tmp_path / 'manual')
    result = subprocess.run(
        [sys.executable, '-m', 'segjax.data.coco', '--data_dir', str(tmp_path / 'tfds'),
         '--manual_dir', str(tmp_path / 'manual')], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr
    assert 'train: 2 examples' in result.stdout and 'validation: 3 examples' in result.stdout
    assert 'the official annotations/instances_val2017.json has 5000' in result.stderr
