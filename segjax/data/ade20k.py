"""ADE20K (SceneParse150, the MIT Scene Parsing Benchmark): a TFDS builder over the official
ADEChallengeData2016.zip.

  splits   train 20,210 (images/training) / validation 2,000 (images/validation)
  classes  150 (CLASS_NAMES, in objectInfo150.txt's order: wall, building, sky, floor, tree, ...)
  needs    ADEChallengeData2016.zip, from http://sceneparsing.csail.mit.edu/ (the file:
           http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip), in the
           manual directory: <data_dir>/downloads/manual/ unless told otherwise. It is not
           downloaded for you: no checksum of it is recorded here to check a download against.

TFDS's own `scene_parse150` is not this data: it reads the 2017 challenge's instance
annotations (annotations_instance.tar), not the 150-class semantic masks, and has no
validation split.

The annotations (annotations/{training,validation}/ADE_*.png) hold 0 ("other", not one of the
150 classes) and 1..150. They are stored mapped to what training and evaluation read:
0 -> 255 (ignored), k -> k - 1 (mmsegmentation's `reduce_zero_label`), so CLASS_NAMES[c] is
class c; a value above 150 is stored as 255 too, and counted (logged, and kept in
`builder.info.metadata['unknown_label_values']`). Images are stored as the original JPEG bytes
(greyscale or CMYK ones converted to RGB and stored as PNG).

The archive is read in place, member by member (nothing is extracted), and its members are not
trusted: an absolute or `..` member name, a duplicate name, a member larger than
MAX_MEMBER_BYTES or an image of more than MAX_PIXELS pixels, an unreadable image or annotation,
an image without its annotation (or the reverse) stops preparation with an error naming
`ADEChallengeData2016.zip:<member>`; a truncated or corrupt zip is a one-line error naming the
file. Prepare with

    python -m segjax.data.ade20k --data_dir ~/tensorflow_datasets [--manual_dir DIR]
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from segjax.data import prepare
from segjax.data.prepare import CorruptFileError, MissingMemberError
from segjax.data.voc import UnknownLabels, encode_png, manual_dir

if __name__ == '__main__':
    # `python -m segjax.data.ade20k` runs the package's copy of this module, so that the builder
    # is defined, and registered with TFDS, once and under its real module name.
    from segjax.data import ade20k as _this_module

    _this_module.main()
    sys.exit()

# mmsegmentation's ADE20KDataset names (the first name of each objectInfo150.txt row).
CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag',
)

# mmsegmentation's ADE20K palette: row c is class c's colour (road and skyscraper share one).
PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
], dtype=np.uint8)

NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
NUM_RAW_VALUES = NUM_CLASSES + 1  # 0 ("other") and 1..150 in the annotation PNGs


def _raw_to_class_table() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, np.uint8)
    table[1:NUM_RAW_VALUES] = np.arange(NUM_CLASSES)
    return table


# Index = annotation value (0..150), value = class 0..149 or 255: what the builder stores.
RAW_TO_CLASS = _raw_to_class_table()

ARCHIVE = 'ADEChallengeData2016.zip'
URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'
ROOT = 'ADEChallengeData2016'
OFFICIAL_SIZES = {'train': 20_210, 'validation': 2_000}
# Far above any ADE20K file or image; what a hostile member would need to exhaust memory.
MAX_MEMBER_BYTES = 64 << 20
_MEMBER_IS = 'an ADE20K image or annotation'  # what MAX_MEMBER_BYTES is the limit of
MAX_PIXELS = 1 << 26  # 8192 x 8192; checked from the header before decoding

_SPLIT_DIRS = {'training': 'train', 'validation': 'validation'}
_MEMBER = re.compile(
    rf'{ROOT}/(?P<kind>images|annotations)/(?P<dir>training|validation)/'
    r'(?P<id>ADE_(?P<prefix>train|val)_\d{8})\.(?P<ext>jpg|png)')
_KNOWN = np.zeros(256, bool)
_KNOWN[:NUM_RAW_VALUES] = True


class Ade20k(tfds.core.GeneratorBasedBuilder):
    """ADE20K SceneParse150: 150 classes, train 20,210 / validation 2,000."""

    name = 'ade20k_segmentation'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download {ARCHIVE} ({URL}, linked from {HOMEPAGE}) and put it, unextracted, in the manual
    directory.
    """
    # What a damaged-archive error says about the zip (prepare.prepared reads it).
    ARCHIVES = {ARCHIVE: prepare.Archive(ARCHIVE, URL)}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage=HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        path = manual_dir(dl_manager) / ARCHIVE
        if not path.exists():
            raise FileNotFoundError(
                f'ADE20K needs {ARCHIVE} in {path.parent}. Download it from {URL} (linked from '
                f'{HOMEPAGE}) and put it there unextracted (or pass --manual_dir / '
                'DownloadConfig(manual_dir=) pointing at where it is).')
        self.archive_paths = {ARCHIVE: path}  # for prepare's damaged-archive advice
        with open_archive(path) as archive:
            pairs = paired_members(archive)
        return {split: self._generate_examples(split, path, pairs[split])
                for split in ('train', 'validation')}

    def _generate_examples(self, split: str, path: epath.Path,
                           pairs: list[tuple[str, zipfile.ZipInfo, zipfile.ZipInfo]],
                           ) -> Iterator[tuple[str, dict]]:
        report = UnknownLabels(known=_KNOWN, ignore_index=IGNORE_INDEX)
        with open_archive(path) as archive:
            for example_id, image_info, label_info in pairs:
                image_member = f'{ARCHIVE}:{image_info.filename}'
                label_member = f'{ARCHIVE}:{label_info.filename}'
                image_bytes, (width, height) = read_image(
                    read_member(archive, image_info), image_member)
                raw = read_annotation(read_member(archive, label_info), label_member)
                if raw.shape != (height, width):
                    raise ValueError(
                        f'{split} example {example_id}: image {image_member} is {height}x{width}'
                        f' but annotation {label_member} is {raw.shape[0]}x{raw.shape[1]}')
                label = RAW_TO_CLASS[report.map_unknown(raw, label_member)]
                yield example_id, {
                    'image': image_bytes,
                    'label': encode_png(label),
                    'image/filename': f'{example_id}.jpg',
                }
        report.publish(self, split)
        if len(pairs) != OFFICIAL_SIZES[split]:
            logging.warning('%s %s: %d examples; the official %s has %d', self.name, split,
                            len(pairs), ARCHIVE, OFFICIAL_SIZES[split])


# ----------------------------------------------------------------------------------------------
# Reading the zip: untrusted members.


@contextlib.contextmanager
def open_archive(path: epath.Path) -> Iterator[zipfile.ZipFile]:
    """zipfile.ZipFile(path), a truncated or corrupt zip being a prepare.DamagedArchiveError."""
    with prepare.open_zip(path, Ade20k.ARCHIVES[ARCHIVE]) as archive:
        yield archive


def paired_members(archive: zipfile.ZipFile,
                   ) -> dict[str, list[tuple[str, zipfile.ZipInfo, zipfile.ZipInfo]]]:
    """{split: [(example id, image member, annotation member)]} sorted by id; every other file
    of the archive (objectInfo150.txt, sceneCategories.txt, directories) is left alone."""
    found = {(kind, split): {} for kind in ('images', 'annotations')
             for split in _SPLIT_DIRS.values()}
    for info in prepare.zip_members(archive).values():  # unsafe and duplicate names refused
        match = _MEMBER.fullmatch(info.filename)
        if match is None:
            continue
        split = _SPLIT_DIRS[match['dir']]
        expected = ('images', 'jpg') if match['kind'] == 'images' else ('annotations', 'png')
        if (match['kind'], match['ext']) != expected or (match['prefix'] == 'train') != (
                split == 'train'):
            continue  # e.g. a .png among the images: not an example
        if info.file_size > MAX_MEMBER_BYTES:  # all of them before any is read
            member = f'{ARCHIVE}:{info.filename}'
            raise CorruptFileError(
                f'archive member {member} is {info.file_size:,} bytes, more than the '
                f'{MAX_MEMBER_BYTES:,} {_MEMBER_IS} can be', member)
        found[(match['kind'], split)][match['id']] = info
    pairs = {}
    for split, directory in ((s, d) for d, s in _SPLIT_DIRS.items()):
        images, labels = found[('images', split)], found[('annotations', split)]
        if not images:
            raise MissingMemberError(
                f'{ARCHIVE} has no {ROOT}/images/{directory}/ADE_*.jpg: is it the official '
                f'{ARCHIVE} from {URL}?', f'{ARCHIVE}:')
        for ids, other, kind in ((images, labels, 'annotations'), (labels, images, 'images')):
            missing = sorted(set(ids) - set(other))
            if missing:
                extension = 'png' if kind == 'annotations' else 'jpg'
                name = f'{ROOT}/{kind}/{directory}/{missing[0]}.{extension}'
                raise MissingMemberError(
                    f'archive member {ARCHIVE}:{name} is missing ({len(missing)} '
                    f'{split} {kind} missing in all)', f'{ARCHIVE}:{name}')
        pairs[split] = [(i, images[i], labels[i]) for i in sorted(images)]
    return pairs


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, never more than MAX_MEMBER_BYTES whatever its header says."""
    return prepare.read_zip_member(archive, info, MAX_MEMBER_BYTES, _MEMBER_IS)


def _open_image(data: bytes, member: str, what: str) -> Image.Image:
    """PIL's lazy open, with the size checked before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as e:  # any header failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable {what}: {e}',
                               member) from e
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise CorruptFileError(f'archive member {member} is {width}x{height} pixels, more than '
                               f'the {MAX_PIXELS:,} an ADE20K {what} can be', member)
    return image


def read_image(data: bytes, member: str) -> tuple[bytes, tuple[int, int]]:
    """(encoded bytes to store, (width, height)); decoded once in full to check it. RGB JPEGs
    are kept as they are; other modes are converted to RGB and stored as PNG."""
    with _open_image(data, member, 'image') as image:
        try:
            image.load()
            if image.mode == 'RGB' and image.format == 'JPEG':
                return data, image.size
            return encode_png(np.asarray(image.convert('RGB'))), image.size
        except Exception as e:  # any decoding failure: the member is unreadable
            raise CorruptFileError(f'archive member {member} is not a readable image: {e}',
                                   member) from e


def read_annotation(data: bytes, member: str) -> np.ndarray:
    """An annotation PNG -> int32 [H, W] of its values (0..150 in the official files)."""
    with _open_image(data, member, 'annotation') as image:
        try:
            if image.mode not in ('L', 'P', 'I', 'I;16'):
                raise ValueError(f'an annotation has one channel of class values, this one is '
                                 f'{image.mode!r}')
            image.load()
            return np.asarray(image).astype(np.int32)
        except Exception as e:  # any decoding failure: the member is unreadable
            raise CorruptFileError(f'archive member {member} is not a readable annotation '
                                   f'PNG: {e}', member) from e


def main(argv: list[str] | None = None) -> None:
    prepare.cli(
        argv, prog='python -m segjax.data.ade20k',
        description='Prepare ade20k_segmentation (TFDS).', manual_files=ARCHIVE,
        make_builder=lambda args: Ade20k(data_dir=args.data_dir),
        report=lambda builder: print('labels outside 0..150:',
                                     dict(builder.info.metadata['unknown_label_values'])))
