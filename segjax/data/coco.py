"""COCO 2017 instance segmentation: a TFDS builder over the official zips.

  splits   train 118,287 (train2017.zip) / validation 5,000 (val2017.zip)
  labels   80 classes, contiguous 1..80 in COCO's category order (CLASS_NAMES[k - 1] is label k;
           COCO's own category ids, 1..90 with gaps, are COCO_CATEGORY_IDS[k - 1]); 0 is left
           to the background, as segjax.data.instances and torchvision's detection models have it
  needs    train2017.zip, val2017.zip and annotations_trainval2017.zip (for
           annotations/instances_{train,val}2017.json), from https://cocodataset.org/#download,
           unextracted in the manual directory: <data_dir>/downloads/manual/ unless told otherwise

Features are segjax.data.instances' (so instance_transforms and coco_eval take either) plus
COCO's image id:
    'image'       uint8 [H, W, 3]   the original JPEG bytes (greyscale/CMYK ones as RGB PNG)
    'image/filename', 'image/id' (int64, COCO's id: for AP against the official json)
    'instances'  {'bbox'     float32 [N, 4]  COCO's box as (x1, y1, x2, y2), clipped to the image
                                              (as torchvision's reference loader clips it)
                  'label'    int64 [N]       1..80
                  'mask'     uint8 [N, H, W] the annotation decoded by pycocotools.mask
                                              (polygons, uncompressed and compressed RLE)
                  'is_crowd' bool [N]}
Every annotation is kept in the json's order, crowd ones and degenerate boxes included, and every
image, those without annotations too (negative examples); instance_transforms.drop_crowd and
drop_degenerate_boxes remove what training must not see, as torchvision's reference does.

The zips are read in place, member by member, and nothing in them is trusted: unsafe or duplicate
member names, members larger than the MAX_*_BYTES limits (whatever their headers say), images of
more than MAX_PIXELS, a json that is not COCO's (a missing key names the file, the entry and the
key), an annotation naming an unknown image or category, RLE counts that do not fill the image
exactly (pycocotools would read or write past its buffer), polygon coordinates that are not finite
or lie far outside the image (pycocotools would try to allocate them): each stops preparation with
an error naming `<zip>:<member>`. Polygons of fewer than 3 points (a few in COCO) are dropped from
their annotation, as detectron2 drops them, and counted in `info.metadata['dropped_polygons']`.

Masks are decoded one image at a time; the json is held (as pycocotools' COCO holds it), never its
decoded masks. Prepare with

    python -m segjax.data.coco --data_dir ~/tensorflow_datasets [--manual_dir DIR]
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data import prepare
from segjax.data.prepare import CorruptFileError, MissingMemberError
from segjax.data.voc import encode_png, manual_dir

if __name__ == '__main__':
    # `python -m segjax.data.coco` runs the package's copy of this module, so that the builder
    # is defined, and registered with TFDS, once and under its real module name.
    from segjax.data import coco as _this_module

    _this_module.main()
    sys.exit()

# fmt: off
# (COCO category id, name) of the 80 annotated classes, in COCO's order (instances_*.json).
_CATEGORIES = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'), (6, 'bus'),
    (7, 'train'), (8, 'truck'), (9, 'boat'), (10, 'traffic light'), (11, 'fire hydrant'),
    (13, 'stop sign'), (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'),
    (18, 'dog'), (19, 'horse'), (20, 'sheep'), (21, 'cow'), (22, 'elephant'), (23, 'bear'),
    (24, 'zebra'), (25, 'giraffe'), (27, 'backpack'), (28, 'umbrella'), (31, 'handbag'),
    (32, 'tie'), (33, 'suitcase'), (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'),
    (37, 'sports ball'), (38, 'kite'), (39, 'baseball bat'), (40, 'baseball glove'),
    (41, 'skateboard'), (42, 'surfboard'), (43, 'tennis racket'), (44, 'bottle'),
    (46, 'wine glass'), (47, 'cup'), (48, 'fork'), (49, 'knife'), (50, 'spoon'), (51, 'bowl'),
    (52, 'banana'), (53, 'apple'), (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'),
    (57, 'carrot'), (58, 'hot dog'), (59, 'pizza'), (60, 'donut'), (61, 'cake'), (62, 'chair'),
    (63, 'couch'), (64, 'potted plant'), (65, 'bed'), (67, 'dining table'), (70, 'toilet'),
    (72, 'tv'), (73, 'laptop'), (74, 'mouse'), (75, 'remote'), (76, 'keyboard'),
    (77, 'cell phone'), (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'),
    (82, 'refrigerator'), (84, 'book'), (85, 'clock'), (86, 'vase'), (87, 'scissors'),
    (88, 'teddy bear'), (89, 'hair drier'), (90, 'toothbrush'),
)
# fmt: on
CLASS_NAMES = tuple(name for _, name in _CATEGORIES)  # CLASS_NAMES[k - 1] is label k
COCO_CATEGORY_IDS = tuple(category_id for category_id, _ in _CATEGORIES)  # label k -> COCO id
COCO_ID_TO_LABEL = {category_id: k + 1 for k, category_id in enumerate(COCO_CATEGORY_IDS)}
NUM_CLASSES = len(CLASS_NAMES) + 1  # with the background, as the detection heads count them


def coco_category_ids(labels: np.ndarray) -> np.ndarray:
    """Labels 1..80 -> COCO's category ids (for results scored against the official json)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 1 or labels.max() > len(COCO_CATEGORY_IDS)):
        raise ValueError(f'COCO labels are 1..{len(COCO_CATEGORY_IDS)}, got '
                         f'{sorted(set(labels[(labels < 1) | (labels > 80)].tolist()))}')
    return np.asarray(COCO_CATEGORY_IDS, np.int64)[labels.astype(np.int64) - 1]


HOMEPAGE = 'https://cocodataset.org/#download'
ANNOTATIONS_ARCHIVE = 'annotations_trainval2017.zip'
IMAGE_ARCHIVES = {'train': 'train2017.zip', 'validation': 'val2017.zip'}
_IMAGE_DIRS = {'train': 'train2017', 'validation': 'val2017'}  # the zips' top directories
_URLS = {
    'train2017.zip': 'http://images.cocodataset.org/zips/train2017.zip',
    'val2017.zip': 'http://images.cocodataset.org/zips/val2017.zip',
    ANNOTATIONS_ARCHIVE: 'http://images.cocodataset.org/annotations/annotations_trainval2017.zip',
}
_SIZES = {'train2017.zip': 'about 18 GB', 'val2017.zip': 'about 780 MB',
          ANNOTATIONS_ARCHIVE: 'about 240 MB'}
OFFICIAL_SIZES = {'train': 118_287, 'validation': 5_000}

# Far above any COCO file; what a hostile member would need to exhaust memory.
MAX_JSON_BYTES = 1 << 30  # instances_train2017.json is about 450 MB
MAX_IMAGE_BYTES = 64 << 20
MAX_PIXELS = 1 << 26  # 8192 x 8192; checked from the header (or the json) before decoding


def annotations_member(split: str) -> str:
    return f'annotations/instances_{_IMAGE_DIRS[split]}.json'


class Coco2017Instances(tfds.core.GeneratorBasedBuilder):
    """COCO 2017 instance segmentation (80 classes): train 118,287 / validation 5,000."""

    name = 'coco2017_instances'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {', '.join(_URLS)} (from {HOMEPAGE}) and put them, unextracted, in the manual
    directory.
    """
    # What a damaged-archive error says about each zip (prepare.prepared reads it).
    ARCHIVES = {name: prepare.Archive(name, url, size_text=_SIZES[name])
                for name, url in _URLS.items()}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'image/filename': tfds.features.Text(),
                'image/id': tfds.features.Tensor(shape=(), dtype=np.int64),
                # A dict of [N, ...] tensors rather than a Sequence: decodes to the same
                # structure, and the masks of an image are one zlib blob, so an image without
                # instances decodes as [0, H, W] (a Sequence of dynamic-size masks cannot).
                'instances': tfds.features.FeaturesDict({
                    'bbox': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                    'label': tfds.features.Tensor(shape=(None,), dtype=np.int64),
                    'mask': tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8,
                                                 encoding=tfds.features.Encoding.ZLIB),
                    'is_crowd': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                }),
            }),
            homepage=HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        directory = manual_dir(dl_manager)
        missing = [name for name in _URLS if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(
                f'COCO 2017 needs {", ".join(_URLS)} in {directory} (missing: '
                f'{", ".join(missing)}). Download them from {HOMEPAGE} ('
                + ', '.join(_URLS[name] for name in missing)
                + ') and put them there unextracted (or pass --manual_dir / '
                'DownloadConfig(manual_dir=) pointing at where they are).')
        self.archive_paths = {name: directory / name for name in _URLS}
        with open_archive(self.archive_paths[ANNOTATIONS_ARCHIVE]) as archive:
            names = prepare.zip_members(archive)
            for split in IMAGE_ARCHIVES:  # fail before any image is read
                if annotations_member(split) not in names:
                    raise MissingMemberError(
                        f'{ANNOTATIONS_ARCHIVE} has no {annotations_member(split)}: is it the '
                        f'official {ANNOTATIONS_ARCHIVE} from {_URLS[ANNOTATIONS_ARCHIVE]}?',
                        f'{ANNOTATIONS_ARCHIVE}:')
        return {split: self._generate_examples(split) for split in IMAGE_ARCHIVES}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        # The json is read when the split is generated, so one split's json is held at a time.
        with open_archive(self.archive_paths[ANNOTATIONS_ARCHIVE]) as archive:
            info = prepare.zip_members(archive)[annotations_member(split)]
            dataset = parse_json(read_member(archive, info, MAX_JSON_BYTES),
                                 f'{ANNOTATIONS_ARCHIVE}:{info.filename}')
        json_member = f'{ANNOTATIONS_ARCHIVE}:{annotations_member(split)}'
        images, per_image = index_annotations(dataset, json_member)
        del dataset
        dropped = DroppedPolygons()
        image_archive = IMAGE_ARCHIVES[split]
        with open_archive(self.archive_paths[image_archive]) as archive:
            members = prepare.zip_members(archive)
            for image_id in sorted(images):
                entry = images[image_id]
                name = f'{_IMAGE_DIRS[split]}/{entry["file_name"]}'
                member = f'{image_archive}:{name}'
                if name not in members:
                    raise MissingMemberError(
                        f'archive member {member} is missing ({json_member} lists image '
                        f'{image_id} as {entry["file_name"]!r})', member)
                image_bytes, (width, height) = read_image(
                    read_member(archive, members[name], MAX_IMAGE_BYTES), member)
                if (height, width) != (entry['height'], entry['width']):
                    raise CorruptFileError(
                        f'archive member {member} is {height}x{width} but {json_member} says '
                        f'image {image_id} is {entry["height"]}x{entry["width"]}', member)
                yield image_id, {
                    'image': image_bytes,
                    'image/filename': entry['file_name'],
                    'image/id': image_id,
                    'instances': decode_instances(per_image.get(image_id, []), height, width,
                                                  json_member, dropped),
                }
        dropped.publish(self, split)
        if len(images) != OFFICIAL_SIZES[split]:
            logging.warning('%s %s: %d images; the official %s has %d', self.name, split,
                            len(images), annotations_member(split), OFFICIAL_SIZES[split])


# ----------------------------------------------------------------------------------------------
# Reading the zips: untrusted members.


@contextlib.contextmanager
def open_archive(path: epath.Path) -> Iterator[zipfile.ZipFile]:
    """zipfile.ZipFile(path), a truncated or corrupt zip being a prepare.DamagedArchiveError."""
    with prepare.open_zip(path, Coco2017Instances.ARCHIVES[path.name]) as archive:
        yield archive


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The member's bytes, never more than `limit` whatever its header says."""
    return prepare.read_zip_member(archive, info, limit, 'a COCO file')


def read_image(data: bytes, member: str) -> tuple[bytes, tuple[int, int]]:
    """(encoded bytes to store, (width, height)); the size is checked from the header, then the
    image decoded once in full. RGB JPEGs are kept as they are; greyscale and CMYK ones (COCO
    has both) are converted to RGB and stored as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise CorruptFileError(f'archive member {member} is {height}x{width} pixels, '
                                       f'more than the {MAX_PIXELS:,} a COCO image can be', member)
            image.load()
            if image.mode == 'RGB' and image.format == 'JPEG':
                return data, image.size
            return encode_png(np.asarray(image.convert('RGB'))), image.size
    except CorruptFileError:
        raise
    except Exception as e:  # any decoding failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable image: {e}',
                               member) from e


# ----------------------------------------------------------------------------------------------
# The instances json: untrusted structure.


def parse_json(data: bytes, member: str) -> dict:
    try:
        dataset = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CorruptFileError(f'archive member {member} is not JSON: {e}', member) from e
    if not isinstance(dataset, dict):
        raise CorruptFileError(f'archive member {member} is not a COCO instances json: expected '
                               f'an object, got {type(dataset).__name__}', member)
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(dataset.get(key), list):
            what = 'no key' if key not in dataset else f'a {type(dataset[key]).__name__} as key'
            raise CorruptFileError(f'archive member {member} is not a COCO instances json: it has '
                                   f'{what} {key!r} (expected a list)', member)
    return dataset


def _field(entry, key: str, kind: type | tuple, where: str, member: str):
    """entry[key], which must be of `kind` (a bool is not an int here)."""
    if not isinstance(entry, dict):
        raise CorruptFileError(f'{member}: {where} is a {type(entry).__name__}, expected an '
                               'object', member)
    if key not in entry:
        raise CorruptFileError(f'{member}: {where} has no key {key!r}', member)
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        kinds = ' or '.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CorruptFileError(f'{member}: {where} has {key}={value!r:.80}, expected {kinds}',
                               member)
    return value


def check_categories(categories: list, member: str) -> None:
    """The json's categories must be COCO's 80 (same id, same name)."""
    names = dict(_CATEGORIES)
    for i, entry in enumerate(categories):
        category_id = _field(entry, 'id', int, f'categories[{i}]', member)
        name = _field(entry, 'name', str, f'categories[{i}]', member)
        if names.get(category_id) != name:
            raise CorruptFileError(
                f'{member}: categories[{i}] is {category_id} {name!r}, but COCO 2017\'s category '
                f'{category_id} is ' + (repr(names[category_id]) if category_id in names
                                        else 'not one of its 80'), member)


def index_annotations(dataset: dict, member: str) -> tuple[dict[int, dict], dict[int, list]]:
    """({image id: image entry}, {image id: [annotation entries in json order]}), every field
    the builder reads checked; an annotation's unknown image or category is an error."""
    check_categories(dataset['categories'], member)
    images = {}
    for i, entry in enumerate(dataset['images']):
        where = f'images[{i}]'
        image_id = _field(entry, 'id', int, where, member)
        file_name = _field(entry, 'file_name', str, where, member)
        height = _field(entry, 'height', int, where, member)
        width = _field(entry, 'width', int, where, member)
        if image_id in images:
            raise CorruptFileError(f'{member}: {where} repeats image id {image_id}', member)
        if '/' in file_name or prepare.is_unsafe_member_name(file_name) or file_name in ('', '.'):
            raise CorruptFileError(f'{member}: {where} has file_name {file_name!r:.80}, expected '
                                   'a plain file name', member)
        if height < 1 or width < 1 or height * width > MAX_PIXELS:
            raise CorruptFileError(f'{member}: {where} is {height}x{width}, expected 1 to '
                                   f'{MAX_PIXELS:,} pixels', member)
        images[image_id] = entry
    per_image = {}
    for i, entry in enumerate(dataset['annotations']):
        where = f'annotations[{i}]'
        annotation_id = _field(entry, 'id', int, where, member)
        where = f'annotations[{i}] (id {annotation_id})'
        image_id = _field(entry, 'image_id', int, where, member)
        category_id = _field(entry, 'category_id', int, where, member)
        _field(entry, 'segmentation', (list, dict), where, member)
        _field(entry, 'bbox', list, where, member)
        if _field(entry, 'iscrowd', int, where, member) not in (0, 1):
            raise CorruptFileError(f'{member}: {where} has iscrowd={entry["iscrowd"]}, expected '
                                   '0 or 1', member)
        if image_id not in images:
            raise CorruptFileError(f'{member}: {where} names image {image_id}, which is not in '
                                   'its images', member)
        if category_id not in COCO_ID_TO_LABEL:
            raise CorruptFileError(f'{member}: {where} names category {category_id}, which is '
                                   'not one of COCO\'s 80', member)
        per_image.setdefault(image_id, []).append(entry)
    return images, per_image


# ----------------------------------------------------------------------------------------------
# Annotations -> boxes and masks.


class DroppedPolygons:
    """Counts the polygons of fewer than 3 points dropped from their annotation, per split."""

    def __init__(self):
        self.count, self.first = 0, []

    def add(self, annotation_id: int) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(annotation_id)

    def publish(self, builder: tfds.core.DatasetBuilder, split: str) -> None:
        builder.info.metadata.setdefault('dropped_polygons', {})[split] = {
            'polygons': self.count, 'first_annotation_ids': self.first}
        if self.count:
            logging.warning('%s %s: %d polygons of fewer than 3 points were dropped (first in '
                            'annotations %s)', builder.name, split, self.count, self.first)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def xywh_box(box: list, height: int, width: int, where: str, member: str) -> np.ndarray:
    """COCO's [x, y, w, h] -> (x1, y1, x2, y2) clipped to the image, as torchvision's reference
    loader (ConvertCocoPolysToMask) does; zero or negative sizes are kept (degenerate)."""
    if len(box) != 4 or not all(_is_number(v) for v in box):
        raise CorruptFileError(f'{member}: {where} has bbox {box!r:.80}, expected 4 finite '
                               'numbers [x, y, width, height]', member)
    x, y, w, h = box
    return np.clip(np.array([x, y, x + w, y + h], np.float64),
                   0, [width, height, width, height]).astype(np.float32)


def compressed_counts(counts: bytes) -> list[int]:
    """The run lengths of a compressed RLE string (pycocotools' rleFrString, in Python, so that
    they can be checked before its C code trusts them)."""
    values, position = [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                raise ValueError('the string ends inside a run length')
            c = counts[position] - 48
            if not 0 <= c < 64:
                raise ValueError(f'character {chr(counts[position])!r} is not in an RLE string')
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position, shift = position + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign extension
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def rle_mask(segmentation: dict, height: int, width: int, where: str, member: str) -> np.ndarray:
    """An RLE segmentation (uncompressed `counts` list or compressed string) -> uint8 [H, W]."""
    size, counts = segmentation.get('size'), segmentation.get('counts')
    if size != [height, width]:
        raise CorruptFileError(f'{member}: {where} has an RLE of size {size!r:.40}, but its image '
                               f'is {height}x{width}', member)
    try:
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise ValueError('uncompressed counts must be integers')
            runs = counts
        elif isinstance(counts, str | bytes):
            counts = counts.encode('ascii') if isinstance(counts, str) else counts
            runs = compressed_counts(counts)
        else:
            raise ValueError(f'counts is a {type(counts).__name__}, expected a list or a string')
        if any(c < 0 for c in runs) or sum(runs) != height * width:
            raise ValueError(f'the run lengths must be >= 0 and add up to {height}x{width} = '
                             f'{height * width}, they add up to {sum(runs)}')
    except (ValueError, UnicodeEncodeError) as e:
        raise CorruptFileError(f'{member}: {where} has an invalid RLE: {e}', member) from e
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {'size': [height, width], 'counts': counts}
    return mask_utils.decode(rle)


def polygon_mask(polygons: list, height: int, width: int, where: str, member: str,
                 annotation_id: int, dropped: DroppedPolygons) -> np.ndarray:
    """Polygons [[x0, y0, x1, y1, ...], ...] -> their union, uint8 [H, W] (annToMask's way)."""
    # pycocotools rasterises the outline at 5x: coordinates far outside the image (or not
    # finite) would make it allocate without bound, so they are an error.
    margin = max(height, width)
    kept = []
    for polygon in polygons:
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
            raise CorruptFileError(f'{member}: {where} has a polygon {polygon!r:.80}, expected a '
                                   'list of finite numbers', member)
        xs, ys = np.array(polygon[0::2], np.float64), np.array(polygon[1::2], np.float64)
        if (xs.size and (xs.min() < -margin or xs.max() > width + margin
                         or ys.min() < -margin or ys.max() > height + margin)):
            raise CorruptFileError(
                f'{member}: {where} has a polygon reaching ({xs.min():g}..{xs.max():g}, '
                f'{ys.min():g}..{ys.max():g}), more than {margin} pixels outside its '
                f'{height}x{width} image', member)
        if len(polygon) < 6 or len(polygon) % 2:
            dropped.add(annotation_id)  # fewer than 3 points: no area (detectron2 drops them)
            continue
        kept.append([float(v) for v in polygon])
    if not kept:
        return np.zeros((height, width), np.uint8)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(kept, height, width)))


def decode_instances(annotations: list[dict], height: int, width: int, member: str,
                     dropped: DroppedPolygons) -> dict[str, np.ndarray]:
    """One image's annotations -> {'bbox' [N, 4], 'label' [N], 'mask' [N, H, W], 'is_crowd'}."""
    boxes = np.zeros((len(annotations), 4), np.float32)
    masks = np.zeros((len(annotations), height, width), np.uint8)
    for i, annotation in enumerate(annotations):
        where = f'annotation {annotation["id"]}'
        boxes[i] = xywh_box(annotation['bbox'], height, width, where, member)
        segmentation = annotation['segmentation']
        if isinstance(segmentation, dict):
            masks[i] = rle_mask(segmentation, height, width, where, member)
        else:
            masks[i] = polygon_mask(segmentation, height, width, where, member,
                                    annotation['id'], dropped)
    return {
        'bbox': boxes,
        'label': np.array([COCO_ID_TO_LABEL[a['category_id']] for a in annotations], np.int64),
        'mask': masks,
        'is_crowd': np.array([bool(a['iscrowd']) for a in annotations], bool),
    }


def main(argv: list[str] | None = None) -> None:
    prepare.cli(
        argv, prog='python -m segjax.data.coco',
        description='Prepare coco2017_instances (TFDS).', manual_files='the three zips',
        make_builder=lambda args: Coco2017Instances(data_dir=args.data_dir),
        report=lambda builder: print('dropped polygons:',
                                     dict(builder.info.metadata['dropped_polygons'])))
