"""SyntheticInstances: the synthetic shapes (segjax.data.synthetic) as instance annotations.

Every shape is an instance. Images are drawn with the same rng stream and the same drawing calls
as `synthetic.generate_example`, so for the same config an instance example's image is the
semantic example's image and its masks, painted in order, give the semantic label map. A later
shape covers earlier ones: each mask is the shape's VISIBLE part, and a shape left with no
visible pixel is dropped. Images without instances are allowed (negative examples).

Features (COCO's conventions, torchvision's box layout):
    'image'      uint8 [H, W, 3]
    'instances'  {'bbox'     float32 [N, 4]  (x1, y1, x2, y2) in pixels, pixel edges: the
                                              tight box of the mask, x2 = last column + 1
                  'label'    int64 [N]       1..7, index in synthetic.CLASS_NAMES
                  'mask'     uint8 [N, H, W] 0/1 visible pixels
                  'is_crowd' bool [N]        always False here}

    builder = SyntheticInstances(data_dir='/tmp/tfds', config='smoke')
    builder.download_and_prepare()
"""

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data.synthetic import (
    _SHAPES,
    _SPLIT_IDS,
    CLASS_NAMES,
    SyntheticShapesConfig,
    _object_frame,
    _texture,
)


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight box (x1, y1, x2, y2) of a non-empty bool [H, W] mask, pixel edges (COCO's toBbox)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def generate_instances(config: SyntheticShapesConfig, split_id: int, index: int) -> dict:
    """One example from its own rng stream (the semantic generator's draws, in its order):
    {'image' uint8 [S, S, 3], 'instances': {'bbox', 'label', 'mask', 'is_crowd'}}."""
    rng = np.random.default_rng([config.seed, split_id, index])
    size = config.image_size
    image = _texture(rng, size, config.texture_strength)
    masks, labels = [], []
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
        class_id = int(rng.integers(1, len(CLASS_NAMES)))
        mask = _SHAPES[class_id - 1](*_object_frame(rng, config))
        image = np.where(mask[..., None], _texture(rng, size, config.texture_strength), image)
        # The new shape hides what it covers of every earlier one.
        masks = [earlier & ~mask for earlier in masks] + [mask]
        labels.append(class_id)
    image = image + rng.normal(0, config.noise_sigma, size=image.shape)
    visible = [i for i, m in enumerate(masks) if m.any()]
    mask_array = np.zeros((len(visible), size, size), np.uint8)
    for row, i in enumerate(visible):
        mask_array[row] = masks[i]
    return {
        'image': np.clip(np.round(image), 0, 255).astype(np.uint8),
        'instances': {
            'bbox': np.array([mask_to_box(masks[i]) for i in visible], np.float32).reshape(-1, 4),
            'label': np.array([labels[i] for i in visible], np.int64),
            'mask': mask_array,
            'is_crowd': np.zeros(len(visible), bool),
        },
    }


class SyntheticInstances(tfds.core.GeneratorBasedBuilder):
    """Textured shapes with one instance annotation (box, class, visible mask) per shape."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        # min_objects=0: about one image in five is a negative example.
        SyntheticShapesConfig(name='default', description='64x64, 0-4 instances per image.',
                              min_objects=0),
        SyntheticShapesConfig(name='smoke', description='32x32, 48 train, 16 validation.',
                              image_size=32, num_train=48, num_validation=16, min_objects=0,
                              min_object_size=8, max_object_size=18),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
                'instances': tfds.features.Sequence({
                    'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    'label': tfds.features.Tensor(shape=(), dtype=np.int64),
                    'mask': tfds.features.Tensor(shape=(size, size), dtype=np.uint8,
                                                 encoding=tfds.features.Encoding.ZLIB),
                    'is_crowd': tfds.features.Tensor(shape=(), dtype=np.bool_),
                }),
                'image/filename': tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # generated locally
        config = self.builder_config
        return {
            'train': self._generate_examples('train', config.num_train),
            'validation': self._generate_examples('validation', config.num_validation),
        }

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        for index in range(num_examples):
            example = generate_instances(self.builder_config, _SPLIT_IDS[split], index)
            yield index, {
                'image': Image.fromarray(example['image']),
                'instances': example['instances'],
                'image/filename': f'{split}_{index:05d}.png',
            }
