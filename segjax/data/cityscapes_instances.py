"""Cityscapes instance segmentation: the gtFine *_instanceIds.png as segjax instance annotations.

The same zips, manual directory, pairing and checks as segjax.data.cityscapes (this builder is
its subclass), read for the 8 classes Cityscapes evaluates instances of (CLASS_NAMES, labels
1..8: person, rider, car, truck, bus, train, motorcycle, bicycle).

An instanceIds PNG (16-bit) holds, per pixel, labelId * 1000 + instance number for the pixels of
a separately annotated object of a class with instances, and the bare labelId (< 1000) for
everything else: stuff, and groups of objects annotated together ("cargroup", "persongroup").
So each value >= 1000 of one of the 8 classes is an instance, and each value < 1000 that is one of
the 8 classes' labelIds is a crowd region (is_crowd True: ignored by COCO-style matching and
dropped by instance_transforms.drop_crowd, as COCO's crowds are). caravan and trailer have
instances in the PNGs but are not evaluated (trainId 255): their pixels are no instance. Values
>= 1000 whose labelId is no class with instances are no instance either, and are counted
(logged, and kept in `info.metadata['unknown_instance_values']`).

Features are segjax.data.coco's without 'image/id': 'image' uint8 [H, W, 3], 'image/filename',
'instances' {'bbox' float32 [N, 4] (the mask's tight box, x2 = last column + 1), 'label' int64
1..8, 'mask' uint8 [N, H, W], 'is_crowd' bool}; instances in increasing instanceIds value
order. The test split's labels are not public (its PNGs are placeholders): it has no instances.

    python -m segjax.data.cityscapes_instances --data_dir ~/tensorflow_datasets [--manual_dir DIR]
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image
from tensorflow_datasets.datasets.cityscapes import cityscapes_dataset_builder as tfds_cityscapes

from segjax.data import prepare
from segjax.data.cityscapes import LABELS, Cityscapes, _read_file, _read_png
from segjax.data.instances import mask_to_box
from segjax.data.prepare import CorruptFileError

if __name__ == '__main__':
    # `python -m segjax.data.cityscapes_instances` runs the package's copy of this module, so
    # that the builder is defined, and registered with TFDS, once and under its real name.
    from segjax.data import cityscapes_instances as _this_module

    _this_module.main()
    sys.exit()

# The evaluated classes with instances, in trainId order: label k is _THINGS[k - 1].
_THINGS = tuple(sorted((label for label in LABELS if label.has_instances and not
                        label.ignore_in_eval), key=lambda label: label.train_id))
CLASS_NAMES = tuple(label.name for label in _THINGS)
NUM_CLASSES = len(CLASS_NAMES) + 1  # with the background
LABEL_ID_TO_LABEL = {label.id: k + 1 for k, label in enumerate(_THINGS)}
_WITH_INSTANCES = frozenset(label.id for label in LABELS if label.has_instances)
INSTANCE_OFFSET = 1000  # cityscapesscripts: id = labelId * 1000 + instance number


def instances_from_ids(ids: np.ndarray) -> tuple[dict[str, np.ndarray], list[int]]:
    """An instanceIds array [H, W] -> ({'bbox', 'label', 'mask', 'is_crowd'}, values >= 1000
    whose labelId has no instances)."""
    values = np.unique(ids)
    kept, labels, crowd, unknown = [], [], [], []
    for value in values.tolist():
        label_id = value // INSTANCE_OFFSET if value >= INSTANCE_OFFSET else value
        if value >= INSTANCE_OFFSET and label_id not in _WITH_INSTANCES:
            unknown.append(value)
        if label_id in LABEL_ID_TO_LABEL:
            kept.append(value)
            labels.append(LABEL_ID_TO_LABEL[label_id])
            crowd.append(value < INSTANCE_OFFSET)  # a group annotated as one region
    height, width = ids.shape
    masks = np.zeros((len(kept), height, width), np.uint8)
    for row, value in enumerate(kept):
        masks[row] = ids == value
    return {
        'bbox': np.array([mask_to_box(m) for m in masks], np.float32).reshape(-1, 4),
        'label': np.array(labels, np.int64),
        'mask': masks,
        'is_crowd': np.array(crowd, bool),
    }, unknown


def read_instance_ids(path: str, member: str) -> np.ndarray:
    """A *_instanceIds.png (16-bit greyscale in the official zip) -> int32 [H, W]."""
    data = _read_file(path, member)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ('I', 'I;16', 'L'):
                raise ValueError(f'an instanceIds PNG has one integer channel, this one is '
                                 f'{image.mode!r}')
            return np.asarray(image).astype(np.int32)
    except Exception as e:  # any decoding failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable instanceIds PNG: '
                               f'{e}', member) from e


class CityscapesInstances(Cityscapes):
    """Cityscapes gtFine instances of the 8 evaluated thing classes."""

    name = 'cityscapes_instances'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        tfds_cityscapes.CityscapesConfig(
            name='fine', description='gtFine instances: train 2,975, validation 500, test 1,525 '
                                     '(no labels).'),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
                'image/filename': tfds.features.Text(),
                # As segjax.data.coco: one zlib blob of [N, H, W] masks per image.
                'instances': tfds.features.FeaturesDict({
                    'bbox': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                    'label': tfds.features.Tensor(shape=(None,), dtype=np.int64),
                    'mask': tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8,
                                                 encoding=tfds.features.Encoding.ZLIB),
                    'is_crowd': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                }),
            }),
            homepage='https://www.cityscapes-dataset.com',
            metadata=tfds.core.MetadataDict(),
        )

    def _generate_examples(self, **paths) -> Iterator[tuple[str, dict]]:
        split = {'train': 'train', 'val': 'validation', 'test': 'test'}.get(
            os.path.basename(paths['images_left']), 'train')
        archives = {key: self.builder_config.zip_root[key][0] for key in paths}
        roots = {key: os.path.dirname(os.path.dirname(path)) for key, path in paths.items()}
        unknown_values, first_files = set(), []

        def member(key: str, path: str) -> str:
            return f'{archives[key]}:{os.path.relpath(path, roots[key])}'

        # TFDS's own pairing of images and labels (the parent's parent), by image id.
        for image_id, features in tfds_cityscapes.Builder._generate_examples(self, **paths):
            ids_path = features['segmentation_label'].replace('_labelIds.png',
                                                              '_instanceIds.png')
            image_member = member('images_left', features['image_left'])
            ids_member = member('segmentation_labels', ids_path)
            image_bytes, (width, height) = _read_png(features['image_left'], image_member, 'RGB')
            ids = read_instance_ids(ids_path, ids_member)
            if ids.shape != (height, width):
                raise ValueError(
                    f'{split} example {image_id}: image {image_member} is {height}x{width} but '
                    f'{ids_member} is {ids.shape[0]}x{ids.shape[1]}')
            instances, unknown = instances_from_ids(ids)
            if unknown:
                unknown_values.update(unknown)
                if len(first_files) < 5:
                    first_files.append(ids_member)
            yield image_id, {
                'image': image_bytes,
                'image/filename': os.path.basename(features['image_left']),
                'instances': instances,
            }
        self.info.metadata.setdefault('unknown_instance_values', {})[split] = {
            'values': sorted(unknown_values), 'first_files': first_files}
        if unknown_values:
            logging.warning('%s %s: instanceIds values %s name no class with instances; they '
                            'are no instance. First files: %s', self.name, split,
                            sorted(unknown_values), first_files)


def main(argv: list[str] | None = None) -> None:
    prepare.cli(argv, prog='python -m segjax.data.cityscapes_instances',
                description='Prepare cityscapes_instances (TFDS).', manual_files='the two zips',
                make_builder=lambda args: CityscapesInstances(data_dir=args.data_dir))
