"""Recipes: what the input pipeline does to each example, as frozen dataclasses.

`TrainRecipe` (label map, random scale, crop, flip, rotation, photometric distortion,
normalisation) and `EvalRecipe` (label map, resize, pad, normalisation) hold the per-example
options of `pipeline.train_batches` / `pipeline.eval_batches`; which examples and how many are
those functions' own arguments. A recipe is checked and normalised (sequences -> tuples) once,
when built: by hand, `TrainRecipe(crop_size=(32, 32), flip=False)` (a ValueError names the
field), or from an experiment, `TrainRecipe.from_config(config.data)` (a ConfigError names the
config.data key). Both are re-exported by segjax.data.pipeline.
"""

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self

import ml_collections
import numpy as np

from segjax.config import ConfigError
from segjax.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
            and math.isfinite(value))


def _numbers(value, name: str, count: int, expected: str) -> tuple:
    """`value` as a tuple of `count` finite numbers (lists and arrays accepted), else an error."""
    items = tuple(value) if isinstance(value, Sequence | np.ndarray) else None
    if (isinstance(value, str) or items is None or len(items) != count
            or not all(_is_number(v) for v in items)):
        raise ValueError(f'{name}={value!r}: expected {expected}')
    return items


def _positive_pair(what: str, example: str) -> Callable[[Any, str], tuple[int, int]]:
    def check(value, name: str) -> tuple[int, int]:
        pair = _numbers(value, name, 2, f'{what}, two positive integers, e.g. {example}')
        if not all(_is_int(v) and v > 0 for v in pair):
            raise ValueError(f'{name}={value!r}: expected {what}, two positive integers, '
                             f'e.g. {example}')
        return pair
    return check


_size = _positive_pair('(height, width)', '(512, 512)')
_edges = _positive_pair('(long, short) edge bounds', '(2048, 512)')


def _optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, name: None if value is None else check(value, name)


def _scale_range(value, name: str) -> tuple[float, float]:
    low, high = _numbers(value, name, 2, '(min, max) scale ratios, e.g. (0.5, 2.0)')
    if not 0 < low <= high:
        raise ValueError(f'{name}={value!r}: expected ratios with 0 < min <= max, e.g. (0.5, 2.0)')
    return low, high


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f'{name}={value!r}: expected True or False')
    return bool(value)


def _cat_max_ratio(value, name: str) -> float:
    if not (_is_number(value) and 0 < value <= 1):
        raise ValueError(f'{name}={value!r}: expected a share in (0, 1] (1 = no retries), '
                         'e.g. 0.75')
    return value


def _degrees(value, name: str) -> float:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f'{name}={value!r}: expected a finite angle >= 0 in degrees (0 = none)')
    return value


def _mean(value, name: str) -> tuple[float, float, float]:
    return _numbers(value, name, 3, 'three numbers (R, G, B) in 0-255 units, e.g. '
                                    f'{IMAGENET_MEAN}')


def _std(value, name: str) -> tuple[float, float, float]:
    std = _numbers(value, name, 3, f'three numbers (R, G, B) in 0-255 units, e.g. {IMAGENET_STD}')
    if not all(v > 0 for v in std):
        raise ValueError(f'{name}={value!r}: expected three numbers > 0 (a division by zero '
                         'otherwise)')
    return std


def _ignore_index(value, name: str) -> int:
    if not (_is_int(value) and 0 <= value <= 255):
        raise ValueError(f'{name}={value!r}: expected a label value in 0..255 (labels are '
                         'stored as uint8), e.g. 255')
    return value


def _label_map(value, name: str) -> tuple[int, ...]:
    table = tuple(value) if isinstance(value, Sequence | np.ndarray) else ()
    if (isinstance(value, str) or len(table) != 256
            or not all(_is_int(v) and 0 <= v <= 255 for v in table)):
        raise ValueError(f'{name}: expected a 256-entry table of label values in 0..255 (index = '
                         f'stored value, entry = class or ignore_index), got {value!r:.80}')
    return tuple(int(v) for v in table)


def _num_classes(value, name: str) -> int:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f'{name}={value!r}: expected a positive integer (or None: no check)')
    return value


def _checked(checks: Mapping[str, Callable[[Any, str], Any]], values: Mapping[str, Any],
             names: Mapping[str, str]) -> dict[str, Any]:
    """Each of `values` normalised (tuples) by its check; an error names it as `names` does."""
    return {field: check(values[field], names[field]) for field, check in checks.items()}


class _Recipe:
    """The checks and the config.data keys of a recipe dataclass (see TrainRecipe)."""

    CHECKS: ClassVar[dict[str, Callable[[Any, str], Any]]]
    CONFIG_KEYS: ClassVar[dict[str, str]] = {}  # field -> config.data key, where they differ

    def __post_init__(self) -> None:
        checked = _checked(self.CHECKS, vars(self), {field: field for field in self.CHECKS})
        for field, value in checked.items():
            object.__setattr__(self, field, value)  # frozen: normalised once, here

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict) -> Self:
        """The recipe of an experiment's config.data; a ConfigError names a malformed key."""
        keys = {field: cls.CONFIG_KEYS.get(field, field) for field in cls.CHECKS}
        values = {field: data[key] for field, key in keys.items()}
        try:
            return cls(**_checked(cls.CHECKS, values,
                                  {field: f'config.data.{key}' for field, key in keys.items()}))
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class TrainRecipe(_Recipe):
    """What `train_batches` does to each example, in this order (every step optional):

    label_map: 256-entry table applied to the stored labels first (None: stored = classes).
    scale_range, base_size: random scale by a ratio in scale_range, of base_size = (long, short)
      edge bound with the aspect ratio kept (mmsegmentation's `scale`), or of each image's own
      size (None).
    crop_size: (height, width) crop, padded with ignore_index where the image is smaller;
      cat_max_ratio < 1 retries the crop (up to 10 windows) until no class covers this share.
    num_classes: if given, labels outside 0..num_classes-1 that are not ignore_index are an error.
    flip: random horizontal flip. rotation: > 0 rotates by an angle uniform in
      [-rotation, rotation] degrees. photometric: mmsegmentation's photometric distortion
      (brightness, contrast, saturation, hue).
    mean, std: normalisation, (image - mean) / std in 0-255 units.

    Built from config.data (same key names) by `TrainRecipe.from_config(config.data)`. Sizes
    and ranges are stored as tuples; a malformed value is a ValueError naming the field.
    """

    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    base_size: tuple[int, int] | None = None
    cat_max_ratio: float = 1.0
    rotation: float = 0.0
    photometric: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255
    label_map: tuple[int, ...] | None = None
    num_classes: int | None = None

    CHECKS: ClassVar[dict[str, Callable[[Any, str], Any]]] = {
        'crop_size': _size, 'scale_range': _scale_range, 'flip': _flag,
        'base_size': _optional(_edges), 'cat_max_ratio': _cat_max_ratio, 'rotation': _degrees,
        'photometric': _flag, 'mean': _mean, 'std': _std, 'ignore_index': _ignore_index,
        'label_map': _optional(_label_map), 'num_classes': _optional(_num_classes),
    }


@dataclasses.dataclass(frozen=True)
class EvalRecipe(_Recipe):
    """What `eval_batches` does to each example: label_map and num_classes as in TrainRecipe;
    base_size = (long, short): resized into it with the aspect ratio kept (label
    nearest-neighbour), None: evaluated whole; pad_size = (height, width) every image is padded
    to with ignore_index (None: the data set's fixed image size); mean, std: normalisation.

    `EvalRecipe.from_config(config.data)` reads config.data.eval_pad_size and eval_base_size.
    """

    pad_size: tuple[int, int] | None = None
    base_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255
    label_map: tuple[int, ...] | None = None
    num_classes: int | None = None

    CHECKS: ClassVar[dict[str, Callable[[Any, str], Any]]] = {
        'pad_size': _optional(_size), 'base_size': _optional(_edges), 'mean': _mean,
        'std': _std, 'ignore_index': _ignore_index, 'label_map': _optional(_label_map),
        'num_classes': _optional(_num_classes),
    }
    CONFIG_KEYS: ClassVar[dict[str, str]] = {'pad_size': 'eval_pad_size',
                                             'base_size': 'eval_base_size'}
