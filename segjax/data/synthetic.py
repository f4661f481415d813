"""SyntheticShapes: a self-generating TFDS segmentation dataset of textured, occluding shapes.

Objects are told apart by shape only: every object's colour and texture come from the same
distribution whatever its class, on a textured background, with random scale, rotation, aspect
and occlusion. Nothing is downloaded; examples are generated deterministically from the config's
seed, each from its own rng stream `(seed, split_id, index)`.

    builder = SyntheticShapes(data_dir='/tmp/tfds')  # or config=SyntheticShapesConfig(...)
    builder.download_and_prepare()
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASS_NAMES = ('background', 'circle', 'square', 'triangle', 'ring', 'cross', 'bar', 'star')

PALETTE = np.array(
    [
        [0, 0, 0],  # background
        [230, 25, 75],  # circle: red
        [60, 180, 75],  # square: green
        [255, 225, 25],  # triangle: yellow
        [0, 130, 200],  # ring: blue
        [245, 130, 48],  # cross: orange
        [145, 30, 180],  # bar: purple
        [70, 240, 240],  # star: cyan
    ],
    dtype=np.uint8,
)

_SPLIT_IDS = {'train': 0, 'validation': 1}


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Size and difficulty of the generated data; pixel quantities are in 0-255 image units.

    Generated data is cached under data_dir/synthetic_shapes/<name>/<version>: after changing a
    config's numbers, bump SyntheticShapes.VERSION (or use a new name / data_dir).
    """

    image_size: int = 64
    num_train: int = 2000
    num_validation: int = 300
    min_objects: int = 2
    max_objects: int = 4
    min_object_size: int = 14  # object diameter (bounding circle) in pixels
    max_object_size: int = 36
    max_aspect: float = 1.25  # aspect ratio up to this, along a random axis
    noise_sigma: float = 6.0  # i.i.d. Gaussian pixel noise added last
    texture_strength: float = 1.0  # scales low-frequency noise and stripes on objects and bg
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Shapes: boolean masks from pixel coordinates (u, v) in the object's unit frame (radius 1).


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u**2 + v**2 <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Equilateral triangle with circumradius 1.15 (so its area is not tiny next to the circle).
    normals = np.pi / 2 + np.pi / 3 + 2 * np.pi * np.arange(3) / 3
    proj = u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)
    return np.all(proj <= 1.15 * np.cos(np.pi / 3), axis=-1)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u**2 + v**2
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))


def _bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.22)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    # Fold the angle onto half a sector, then test against the straight edge tip -> valley.
    sector = 2 * np.pi / points
    phi = np.mod(np.arctan2(v, u) - np.pi / 2, sector)
    psi = np.minimum(phi, sector - phi)
    rho = np.sqrt(u**2 + v**2)
    x, y = rho * np.cos(psi), rho * np.sin(psi)
    tip = np.array([1.0, 0.0])
    valley = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    normal = np.array([valley[1] - tip[1], tip[0] - valley[0]])  # points away from the origin
    return x * normal[0] + y * normal[1] <= tip @ normal


# Index i + 1 in CLASS_NAMES; objects are drawn uniformly from these.
_SHAPES: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _circle,
    _square,
    _triangle,
    _ring,
    _cross,
    _bar,
    _star,
)
assert len(_SHAPES) + 1 == len(CLASS_NAMES)


# ----------------------------------------------------------------------------------------------
# Textures: float32 images in 0-255 units (unclipped until the end).


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Unit-variance-ish noise, bilinearly upsampled from a (cells+1)^2 grid to size x size."""
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(np.floor(pos).astype(int), cells - 1)
    frac = pos - lo
    weights = np.zeros((size, cells + 1))
    weights[np.arange(size), lo] = 1 - frac
    weights[np.arange(size), lo + 1] = frac
    coarse = rng.standard_normal((cells + 1, cells + 1, channels))  # (rows, cols, channels)
    return (weights @ coarse.transpose(2, 0, 1) @ weights.T).transpose(1, 2, 0)


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each float32 [size, size] in pixels."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False  # shared between calls
    return yy, xx


def _texture(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A random colour with blotchy noise, a linear gradient and faint stripes: [size, size, 3]."""
    yy, xx = (c / size - 0.5 for c in _grid(size))
    colour = rng.uniform(0, 255, size=3)
    blotches = rng.uniform(10, 40) * _smooth_noise(rng, size, int(rng.integers(2, 8)), 3)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (xx * np.cos(angle) + yy * np.sin(angle))[..., None] * rng.uniform(-80, 80, size=3)
    freq, stripe_angle = rng.uniform(2, 10), rng.uniform(0, np.pi)
    phase = 2 * np.pi * freq * (xx * np.cos(stripe_angle) + yy * np.sin(stripe_angle))
    stripes = rng.uniform(0, 25) * np.sin(phase)[..., None]
    return colour + strength * (blotches + gradient + stripes)


# ----------------------------------------------------------------------------------------------
# Examples.


def _object_frame(
    rng: np.random.Generator, config: SyntheticShapesConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres mapped to a random object's unit frame (random centre, size, angle, aspect)."""
    size = config.image_size
    yy, xx = _grid(size)
    cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
    radius = rng.uniform(config.min_object_size, config.max_object_size) / 2
    angle = rng.uniform(0, 2 * np.pi)
    stretch = np.sqrt(np.exp(rng.uniform(-1, 1) * np.log(config.max_aspect)))
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / (radius * stretch)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) * stretch / radius
    return u, v


def generate_example(
    config: SyntheticShapesConfig, split_id: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """One example from its own rng stream: (image uint8 [S, S, 3], label uint8 [S, S])."""
    rng = np.random.default_rng([config.seed, split_id, index])
    size = config.image_size
    image = _texture(rng, size, config.texture_strength)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
        class_id = int(rng.integers(1, len(CLASS_NAMES)))
        mask = _SHAPES[class_id - 1](*_object_frame(rng, config))
        # Later objects are painted over earlier ones; the label follows what is visible.
        image = np.where(mask[..., None], _texture(rng, size, config.texture_strength), image)
        label[mask] = class_id
    image = image + rng.normal(0, config.noise_sigma, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Textured shapes on textured backgrounds; classes differ by shape only."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        SyntheticShapesConfig(name='default', description='The field defaults.'),
        # Seconds to build; for smoke tests of the whole train/evaluate/predict path.
        SyntheticShapesConfig(name='smoke', description='32x32, 48 train, 16 validation.',
                              image_size=32, num_train=48, num_validation=16,
                              min_object_size=8, max_object_size=18),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
                    'label': tfds.features.Image(shape=(size, size, 1), encoding_format='png'),
                    'image/filename': tfds.features.Text(),
                }
            ),
            supervised_keys=('image', 'label'),
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
            image, label = generate_example(self.builder_config, _SPLIT_IDS[split], index)
            # PIL images: TFDS then PNG-encodes with PIL, far faster than its per-image TF graph.
            yield index, {
                'image': Image.fromarray(image),
                'label': Image.fromarray(label),
                'image/filename': f'{split}_{index:05d}.png',
            }
