"""python -m segjax.browse --config <exp> --output <dir> [--split S] [--augmented] [--num_images N]

Writes PNG grids of a data set's images and labels, as stored or as augmented for training.

mmsegmentation's browse_dataset for segjax experiments: `grid_000.png`, `grid_001.png`, ... of
--per_grid examples each, one example per row as image | label colours | overlay, and below them
a legend of the classes present in that grid (colour swatch, class index and name; ignore pixels
and label values that are no class get colours of their own, listed when present).

Without --augmented: the first N examples of the split in stored order, decoded at their own
sizes (the label map applied, nothing resized or padded). With --augmented: the first N examples
the training pipeline yields (pipeline.train_batches with the experiment's data options and
config.seed: random scale, crop, flip, rotation, photometric), denormalised back to RGB. The
split defaults to config.data.train_split in both modes, so that --augmented changes only the
augmentation; --split names another (or a TFDS slice such as 'validation[:50]').
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds  # imports no TensorFlow by itself
from PIL import Image, ImageDraw, ImageFont

import segjax.logs  # noqa: F401  (first: it hides TensorFlow's start-up lines, on import)
from segjax import config as config_lib
from segjax import experiment, logs, visualize
from segjax.data import pipeline, prepare

# Pixels around and between panels, rows and the legend.
GAP = 4
# Height of one legend line; the swatch is a SWATCH x SWATCH square centred in it.
LEGEND_ROW = 14
SWATCH = 10
BACKGROUND = (40, 40, 40)
TEXT_COLOR = (235, 235, 235)
SWATCH_OUTLINE = (160, 160, 160)
# Ignore pixels and values that are no class take the first of these the palette does not use:
# white (visualize.color_mask's ignore colour), VOC's void colour, then loud ones.
SPECIAL_COLORS = ((255, 255, 255), (224, 224, 192), (255, 0, 255), (0, 255, 255),
                  (128, 128, 128), (255, 128, 0))
# Values that are no class listed in the legend at most.
MAX_LISTED_VALUES = 8

Example = dict[str, np.ndarray]


class WrittenGrid(NamedTuple):
    path: str
    num_images: int
    legend: tuple[str, ...]  # the legend's lines, top to bottom


# ----------------------------------------------------------------------------------------------
# Examples.


def raw_examples(builder, split: str, label_map: Sequence[int] | None = None
                 ) -> Iterator[Example]:
    """The split's examples in stored order: {'image': uint8 [H,W,3], 'label': uint8 [H,W]} at
    their own sizes, label_map (256 entries: stored value -> class) applied."""
    table = None if label_map is None else np.asarray(label_map, np.uint8)
    if table is not None and table.shape != (256,):
        raise ValueError(f'label_map must have 256 entries, got {table.shape}')
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))
    for example in tfds.as_numpy(ds):
        label = example['label'][..., 0]
        yield {'image': example['image'],
               'label': label if table is None else table[label]}


def augmented_examples(builder, split: str, config: ml_collections.ConfigDict
                       ) -> Iterator[Example]:
    """The examples training reads first (one process), augmented with the experiment's data
    options and config.seed, the image denormalised to uint8. Label values that are no class are
    shown, not an error (num_classes is not checked)."""
    data = config.data
    recipe = dataclasses.replace(pipeline.TrainRecipe.from_config(data), num_classes=None)
    batches = pipeline.train_batches(builder, recipe, split=split, local_batch_size=1,
                                     seed=config.seed)
    for batch in batches:
        yield {'image': visualize.denormalize(batch['image'][0], data.mean, data.std),
               'label': batch['label'][0]}


# ----------------------------------------------------------------------------------------------
# Colours and legend.


def special_colors(palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ignore colour, no-class colour): the first two SPECIAL_COLORS not in the palette."""
    used = {tuple(int(v) for v in color) for color in np.asarray(palette)}
    free = [c for c in SPECIAL_COLORS if c not in used]
    if len(free) < 2:
        raise ValueError(f'the palette uses all of {SPECIAL_COLORS}; no colour is left for '
                         'ignore pixels')
    return np.asarray(free[0], np.uint8), np.asarray(free[1], np.uint8)


def label_colors(label: np.ndarray, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """uint8 [H,W,3]: classes in the palette's colours, ignore_index and values that are no
    class in special_colors'."""
    ignore_color, no_class_color = special_colors(palette)
    colors = visualize.color_mask(label, palette, ignore_index, ignore_color)
    label = np.asarray(label)
    colors[(label >= len(palette)) & (label != ignore_index)] = no_class_color
    return colors


def legend_entries(labels: Iterable[np.ndarray], palette: np.ndarray,
                   class_names: Sequence[str], ignore_index: int
                   ) -> list[tuple[np.ndarray, str]]:
    """(colour, text) for each class present in `labels`, by index, then ignore and the values
    that are no class if present."""
    values = np.unique(np.concatenate([np.unique(np.asarray(label)) for label in labels]))
    ignore_color, no_class_color = special_colors(palette)
    entries = [(np.asarray(palette[v], np.uint8), f'{v} {class_names[v]}')
               for v in values if v < len(palette) and v != ignore_index]
    if ignore_index in values:
        entries.append((ignore_color, f'{ignore_index} ignore'))
    no_class = [int(v) for v in values if v >= len(palette) and v != ignore_index]
    if no_class:
        listed = ', '.join(map(str, no_class[:MAX_LISTED_VALUES]))
        more = ', ...' if len(no_class) > MAX_LISTED_VALUES else ''
        entries.append((no_class_color, f'not a class: {listed}{more}'))
    return entries


def render_legend(entries: Sequence[tuple[np.ndarray, str]], min_width: int = 0) -> np.ndarray:
    """uint8 [len(entries) * LEGEND_ROW, width, 3]: a swatch and its text per line, on
    BACKGROUND; as wide as its longest line (at least min_width)."""
    font = ImageFont.load_default()
    text_x = GAP + SWATCH + GAP
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    text_width = max((math.ceil(measure.textlength(text, font=font)) for _, text in entries),
                     default=0)
    width = max(min_width, text_x + text_width + GAP)
    image = Image.new('RGB', (width, len(entries) * LEGEND_ROW), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for row, (color, text) in enumerate(entries):
        top = row * LEGEND_ROW + (LEGEND_ROW - SWATCH) // 2
        # An outline keeps a swatch the colour of the background visible.
        draw.rectangle((GAP, top, GAP + SWATCH - 1, top + SWATCH - 1),
                       fill=tuple(int(c) for c in color), outline=SWATCH_OUTLINE)
        # Centred by its bounding box: bitmap fonts (no FreeType) take no anchor.
        left, upper, _, lower = draw.textbbox((0, 0), text, font=font)
        draw.text((text_x - left, row * LEGEND_ROW + (LEGEND_ROW - lower - upper) // 2), text,
                  fill=TEXT_COLOR, font=font)
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------
# Grids.


def example_row(example: Example, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """uint8 [H, 3W + 2 GAP, 3]: image | label colours | overlay, GAP apart."""
    image = np.asarray(example['image'], np.uint8)
    colors = label_colors(example['label'], palette, ignore_index)
    gap = np.full((image.shape[0], GAP, 3), BACKGROUND, np.uint8)
    return np.concatenate([image, gap, colors, gap, visualize.overlay(image, colors)], axis=1)


def grid(examples: Sequence[Example], palette: np.ndarray, class_names: Sequence[str],
         ignore_index: int) -> tuple[np.ndarray, list[str]]:
    """(uint8 image, legend lines): one example_row per example, GAP around and between them,
    left-aligned, then render_legend of the classes present and a GAP margin below.

    Height: GAP + sum(H_i + GAP) + len(legend) * LEGEND_ROW + GAP; width: the widest row plus
    2 GAP, or the legend if it is wider.
    """
    rows = [example_row(example, palette, ignore_index) for example in examples]
    entries = legend_entries([e['label'] for e in examples], palette, class_names, ignore_index)
    rows_width = 2 * GAP + max(row.shape[1] for row in rows)
    legend = render_legend(entries, min_width=rows_width)
    width = legend.shape[1]
    height = GAP + sum(row.shape[0] + GAP for row in rows) + legend.shape[0] + GAP
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[...] = BACKGROUND
    top = GAP
    for row in rows:
        canvas[top:top + row.shape[0], GAP:GAP + row.shape[1]] = row
        top += row.shape[0] + GAP
    canvas[top:top + legend.shape[0]] = legend
    return canvas, [text for _, text in entries]


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------
# Command line.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def argument_parser() -> argparse.ArgumentParser:
    # Not config_lib.argument_parser: that one requires --workdir, which browsing has no use for.
    parser = argparse.ArgumentParser(
        prog='segjax.browse', description=__doc__.splitlines()[2],
        epilog='Any config field can be overridden: --config.data.crop_size=(256,256)')
    parser.add_argument('--config', required=True, help='experiment file, e.g. experiments/x.py')
    parser.add_argument('--output', required=True, help='directory for grid_NNN.png')
    parser.add_argument('--split', default=None,
                        help='TFDS split or slice (default config.data.train_split)')
    parser.add_argument('--augmented', action='store_true',
                        help="after the experiment's train augmentation (default: as stored)")
    parser.add_argument('--num_images', type=positive_int, default=16,
                        help='examples to show (default 16; as stored, at most the split)')
    parser.add_argument('--per_grid', type=positive_int, default=4,
                        help='examples (rows) per grid (default 4)')
    logs.add_verbose_flag(parser)
    return parser


def split_size(builder, split: str) -> int:
    """Examples in `split`; a ValueError lists the data set's splits."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError):
        available = ', '.join(repr(s) for s in builder.info.splits)
        raise ValueError(f'split {split!r} is not a split of {builder.info.full_name}; '
                         f'available: {available} (or a TFDS slice such as '
                         "'train[:100]')") from None


def main(argv: Sequence[str]) -> list[WrittenGrid]:
    parser = argument_parser()
    overrides, rest = config_lib.split_argv(argv)
    args = parser.parse_args(rest)
    logs.quiet(args.verbose)
    error = f'{parser.prog}: error:'
    try:
        config = config_lib.load(args.config, overrides)
        if args.augmented:  # a malformed data value: one line, up front
            pipeline.TrainRecipe.from_config(config.data)
    except config_lib.ConfigError as e:
        parser.exit(2, f'{error} {e}\n')
    split = args.split or config.data.train_split
    try:
        builder = experiment.dataset_builder(config)
    except prepare.PrepareError as e:
        parser.exit(1, f'{error} {e}\n')
    try:
        available = split_size(builder, split)
    except ValueError as e:
        where = '--split' if args.split else 'config.data.train_split'
        parser.exit(2, f'{error} {where}: {e}\n')
    if available == 0:
        parser.exit(1, f'{error} split {split!r} has no examples\n')
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        parser.exit(1, f'{error} --output {args.output!r}: {e}\n')
    examples = (augmented_examples(builder, split, config) if args.augmented
                else raw_examples(builder, split, config.data.label_map))
    num_images = args.num_images if args.augmented else min(args.num_images, available)
    palette = experiment.palette(config)[:config.data.num_classes]
    names = experiment.class_names(config)
    written = []
    selected = itertools.islice(examples, num_images)
    for index, group in enumerate(chunks(selected, args.per_grid)):
        canvas, legend = grid(group, palette, names, config.data.ignore_index)
        path = os.path.join(args.output, f'grid_{index:03d}.png')
        Image.fromarray(canvas).save(path)
        written.append(WrittenGrid(path, len(group), tuple(legend)))
        print(f'wrote {path} ({len(group)} images, {len(legend)} legend entries)', flush=True)
    mode = 'augmented' if args.augmented else 'as stored'
    grids = f'{len(written)} grid' + ('' if len(written) == 1 else 's')
    print(f'browsed {num_images} images of {split!r} ({mode}) in {grids} in {args.output}')
    return written


def run() -> None:
    # Browsing needs no accelerator: JAX (loaded with the experiment) stays off a busy GPU.
    jax.config.update('jax_platforms', 'cpu')
    main(sys.argv[1:])


if __name__ == '__main__':
    run()
