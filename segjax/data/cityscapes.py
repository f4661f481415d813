"""Cityscapes: the official label table and TFDS's cityscapes/semantic_segmentation for segjax.

The label table (cityscapesscripts' `helpers/labels.py`) is the one place that says which raw
labelId trains as which of the 19 classes. Labels are stored as the raw labelIds of the
*_gtFine_labelIds.png files (0..33); the pipeline maps them in the graph with

    config.data.label_map = cityscapes.LABEL_ID_TO_TRAIN_ID  # 256 entries, all else -> 255

so that another table (e.g. the 7 categories) can be used on the same prepared data.

`Cityscapes` is TFDS's own Cityscapes builder (same zips, same manual download, same pairing of
images and labels by id) with segjax's feature names ('image', 'label', 'image/filename'), any
image size, and checks TFDS does not make: a corrupt or missing PNG names the zip member,
image/label sizes must agree, and a label value that is no labelId (0..33) is stored as 255 and
counted (logged and kept in `builder.info.metadata['unknown_label_values']`).

  splits   train 2,975 / validation 500 / test 1,525 (test labels are not public: the zip holds
           placeholders, so test is for predictions only)
  needs    leftImg8bit_trainvaltest.zip (11 GB) and gtFine_trainvaltest.zip (241 MB), from
           https://www.cityscapes-dataset.com/downloads/ (free registration), in the manual
           directory: <data_dir>/downloads/manual/ unless told otherwise.

    python -m segjax.data.cityscapes --data_dir ~/tensorflow_datasets [--manual_dir DIR]
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from typing import NamedTuple

# First: TensorFlow (loaded by TFDS's Cityscapes module) reads its C++ log level when it loads.
from segjax import logs  # noqa: F401

# isort: split

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.datasets.cityscapes import cityscapes_dataset_builder as tfds_cityscapes

from segjax.data import prepare
from segjax.data.prepare import CorruptFileError, MissingMemberError
from segjax.data.voc import UnknownLabels, encode_png, manual_dir

if __name__ == '__main__':
    # `python -m segjax.data.cityscapes` runs the package's copy of this module, so that the builder
    # is defined, and registered with TFDS, once and under its real module name.
    from segjax.data import cityscapes as _this_module

    _this_module.main()
    sys.exit()

IGNORE_INDEX = 255
DOWNLOAD_URL = 'https://www.cityscapes-dataset.com/downloads/'


class Label(NamedTuple):
    name: str
    id: int  # labelId, the value in *_gtFine_labelIds.png
    train_id: int  # 0..18, or 255 (ignored in training and evaluation), -1 (license plate)
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS = (
    #     name                    id  trainId category        catId instances ignore  color
    Label('unlabeled',             0, 255, 'void',         0, False, True,  (0, 0, 0)),
    Label('ego vehicle',           1, 255, 'void',         0, False, True,  (0, 0, 0)),
    Label('rectification border',  2, 255, 'void',         0, False, True,  (0, 0, 0)),
    Label('out of roi',            3, 255, 'void',         0, False, True,  (0, 0, 0)),
    Label('static',                4, 255, 'void',         0, False, True,  (0, 0, 0)),
    Label('dynamic',               5, 255, 'void',         0, False, True,  (111, 74, 0)),
    Label('ground',                6, 255, 'void',         0, False, True,  (81, 0, 81)),
    Label('road',                  7,   0, 'flat',         1, False, False, (128, 64, 128)),
    Label('sidewalk',              8,   1, 'flat',         1, False, False, (244, 35, 232)),
    Label('parking',               9, 255, 'flat',         1, False, True,  (250, 170, 160)),
    Label('rail track',           10, 255, 'flat',         1, False, True,  (230, 150, 140)),
    Label('building',             11,   2, 'construction', 2, False, False, (70, 70, 70)),
    Label('wall',                 12,   3, 'construction', 2, False, False, (102, 102, 156)),
    Label('fence',                13,   4, 'construction', 2, False, False, (190, 153, 153)),
    Label('guard rail',           14, 255, 'construction', 2, False, True,  (180, 165, 180)),
    Label('bridge',               15, 255, 'construction', 2, False, True,  (150, 100, 100)),
    Label('tunnel',               16, 255, 'construction', 2, False, True,  (150, 120, 90)),
    Label('pole',                 17,   5, 'object',       3, False, False, (153, 153, 153)),
    Label('polegroup',            18, 255, 'object',       3, False, True,  (153, 153, 153)),
    Label('traffic light',        19,   6, 'object',       3, False, False, (250, 170, 30)),
    Label('traffic sign',         20,   7, 'object',       3, False, False, (220, 220, 0)),
    Label('vegetation',           21,   8, 'nature',       4, False, False, (107, 142, 35)),
    Label('terrain',              22,   9, 'nature',       4, False, False, (152, 251, 152)),
    Label('sky',                  23,  10, 'sky',          5, False, False, (70, 130, 180)),
    Label('person',               24,  11, 'human',        6, True,  False, (220, 20, 60)),
    Label('rider',                25,  12, 'human',        6, True,  False, (255, 0, 0)),
    Label('car',                  26,  13, 'vehicle',      7, True,  False, (0, 0, 142)),
    Label('truck',                27,  14, 'vehicle',      7, True,  False, (0, 0, 70)),
    Label('bus',                  28,  15, 'vehicle',      7, True,  False, (0, 60, 100)),
    Label('caravan',              29, 255, 'vehicle',      7, True,  True,  (0, 0, 90)),
    Label('trailer',              30, 255, 'vehicle',      7, True,  True,  (0, 0, 110)),
    Label('train',                31,  16, 'vehicle',      7, True,  False, (0, 80, 100)),
    Label('motorcycle',           32,  17, 'vehicle',      7, True,  False, (0, 0, 230)),
    Label('bicycle',              33,  18, 'vehicle',      7, True,  False, (119, 11, 32)),
    # Never drawn into the label PNGs (negative ids are skipped when they are rendered).
    Label('license plate',        -1,  -1, 'vehicle',      7, False, True,  (0, 0, 142)),
)
# fmt: on

_TRAIN_LABELS = sorted((label for label in LABELS if 0 <= label.train_id < 255),
                       key=lambda label: label.train_id)
CLASS_NAMES = tuple(label.name for label in _TRAIN_LABELS)  # the 19 evaluated classes
PALETTE = np.array([label.color for label in _TRAIN_LABELS], np.uint8)  # [19, 3]
NUM_CLASSES = len(CLASS_NAMES)
LABEL_IDS = tuple(label.id for label in LABELS if label.id >= 0)  # 0..33: values in the PNGs


def _label_id_table() -> tuple[int, ...]:
    table = [IGNORE_INDEX] * 256
    for label in LABELS:
        if label.id >= 0:
            table[label.id] = label.train_id if 0 <= label.train_id < 255 else IGNORE_INDEX
    return tuple(table)


# Index = labelId as stored, value = trainId 0..18 or 255: for `config.data.label_map`.
LABEL_ID_TO_TRAIN_ID = _label_id_table()

_KNOWN = np.zeros(256, bool)
_KNOWN[list(LABEL_IDS)] = True
_SPLIT_NAMES = {'train': 'train', 'val': 'validation', 'test': 'test'}


class Cityscapes(tfds_cityscapes.Builder):
    """TFDS's cityscapes/semantic_segmentation with features {'image', 'label' (labelIds)}."""

    name = 'cityscapes_segmentation'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        tfds_cityscapes.CityscapesConfig(
            name='semantic_segmentation',
            description='Fine annotations: train 2,975, validation 500, test 1,525.'),
    ]
    # What a damaged-archive error says about each zip (sizes as the download page lists them).
    ARCHIVES = {
        name: prepare.Archive(name, DOWNLOAD_URL, size_text=size)
        for name, size in (('leftImg8bit_trainvaltest.zip', 'about 11 GB'),
                           ('gtFine_trainvaltest.zip', 'about 241 MB'))
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
                'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://www.cityscapes-dataset.com',
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        directory = manual_dir(dl_manager)
        archives = {name: root for name, root in self.builder_config.zip_root.values()}
        missing = [name for name in archives if not (directory / name).exists()]
        if missing:
            raise FileNotFoundError(
                f'Cityscapes needs {" and ".join(archives)} in {directory} (missing: '
                f'{", ".join(missing)}). Register at {DOWNLOAD_URL}, download those packages and '
                f'put them there unextracted (or pass --manual_dir / DownloadConfig(manual_dir=) '
                'pointing at where they are).')
        self.archive_paths = {name: directory / name for name in archives}
        for name in archives:  # checked and extracted here; TFDS's own code then reuses these
            prepare.extract(dl_manager, directory / name, self.ARCHIVES[name])
        splits = super()._split_generators(dl_manager)
        for split in splits:
            for key, path in split.gen_kwargs.items():
                if not os.path.isdir(path):
                    name, root = self.builder_config.zip_root[key]
                    raise MissingMemberError(
                        f'{name} has no {root}/{os.path.basename(path)}/ directory: is it the '
                        f'official {name} from {DOWNLOAD_URL}?', f'{name}:')
        return splits

    def _generate_examples(self, **paths) -> Iterator[tuple[str, dict]]:
        split = _SPLIT_NAMES.get(os.path.basename(paths['images_left']), 'train')
        report = UnknownLabels(known=_KNOWN, ignore_index=IGNORE_INDEX)
        archives = {key: self.builder_config.zip_root[key][0] for key in paths}
        # Extraction roots, so that errors name the zip member ('gtFine/val/lindau/...').
        roots = {key: os.path.dirname(os.path.dirname(path)) for key, path in paths.items()}

        def member(key: str, path: str) -> str:
            return f'{archives[key]}:{os.path.relpath(path, roots[key])}'

        for image_id, features in super()._generate_examples(**paths):
            image_member = member('images_left', features['image_left'])
            label_member = member('segmentation_labels', features['segmentation_label'])
            image_bytes, (width, height) = _read_png(features['image_left'], image_member, 'RGB')
            label_bytes, label = _read_label(features['segmentation_label'], label_member)
            if label.shape != (height, width):
                raise ValueError(
                    f'{split} example {image_id}: image {image_member} is {height}x{width} but '
                    f'label {label_member} is {label.shape[0]}x{label.shape[1]}')
            mapped = report.map_unknown(label, label_member)
            if label_bytes is None or not np.array_equal(mapped, label):
                label_bytes = encode_png(mapped)
            yield image_id, {
                'image': image_bytes,
                'label': label_bytes,
                'image/filename': os.path.basename(features['image_left']),
            }
        report.publish(self, split)


def _read_file(path: str, member: str) -> bytes:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise MissingMemberError(f'archive member {member} is missing', member) from None


def _read_png(path: str, member: str, mode: str) -> tuple[bytes, tuple[int, int]]:
    """(bytes to store, (width, height)): decoded once in full to catch corrupt files."""
    data = _read_file(path, member)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode == mode and image.format == 'PNG':
                return data, image.size
            return encode_png(np.asarray(image.convert(mode))), image.size
    except Exception as e:  # any decoding failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable PNG: {e}',
                               member) from e


def _read_label(path: str, member: str) -> tuple[bytes | None, np.ndarray]:
    """(original bytes if they can be stored as they are, else None; labelIds [H, W])."""
    data = _read_file(path, member)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ('L', 'P', 'I', 'I;16'):
                raise ValueError(f'a labelIds PNG has one channel, this one is {image.mode!r}')
            label = np.asarray(image).astype(np.int32)
            keep = image.mode == 'L' and image.format == 'PNG'
    except Exception as e:  # any decoding failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable label PNG: {e}',
                               member) from e
    return (data if keep else None), label


def main(argv: list[str] | None = None) -> None:
    prepare.cli(
        argv, prog='python -m segjax.data.cityscapes',
        description='Prepare cityscapes_segmentation (TFDS).', manual_files='the two zips',
        make_builder=lambda args: Cityscapes(data_dir=args.data_dir),
        report=lambda builder: print('labels outside 0..33:',
                                     dict(builder.info.metadata['unknown_label_values'])))
