"""Input-pipeline throughput (images/s) of the VOC and Cityscapes training recipes.

No data set can be downloaded here, so this writes archives in the official layouts at the real
image sizes (VOC ~500x375 JPEGs with palette PNG labels, Cityscapes 2048x1024 PNGs with
labelIds PNGs) with natural-image-like content (smooth colour fields, edges, sensor noise),
prepares them with the real builders, and times `pipeline.train_batches` with each recipe:

  voc         train_aug-style: scale 0.5-2.0 of (2048, 512), 512x512 crop, cat_max_ratio 0.75,
              flip, photometric distortion; batch 16
  cityscapes  scale 0.5-2.0 of (2048, 1024), 512x1024 crop, cat_max_ratio 0.75, flip,
              photometric distortion, labelId -> trainId map; batch 8

    python benchmarks/input_pipeline.py                      # both, all cores
    taskset -c 0 python benchmarks/input_pipeline.py         # per-core figure

Reported: wall-clock images/s of the steady state (after `--warmup` batches), CPU time per image
over all threads (images per core-second: what to multiply by the host's free cores; robust on a
shared machine), and the one-off prepare time per image (the builders decode every file once).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tarfile
import tempfile
import time
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data import cityscapes, pipeline, voc


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour fields with a few hard-edged regions and mild noise: compresses like a
    photograph (a VOC JPEG ~60-120 KB, a Cityscapes PNG ~2-3 MB), unlike pure noise."""
    coarse = rng.uniform(0, 255, (height // 64 + 2, width // 64 + 2, 3)).astype(np.float32)
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height),
                                                                       Image.BICUBIC), np.float32)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(height // 8, height // 2), rng.integers(width // 8, width // 2)
        image[y:y + h, x:x + w] = 0.5 * image[y:y + h, x:x + w] + rng.uniform(0, 128, 3)
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def region_label(rng: np.random.Generator, height: int, width: int, values) -> np.ndarray:
    label = np.full((height, width), values[0], np.uint8)
    for _ in range(8):
        y, x = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(height // 10, height // 2), rng.integers(width // 10, width // 2)
        label[y:y + h, x:x + w] = rng.choice(values)
    return label


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_voc(directory: str, num_train: int, rng: np.random.Generator) -> None:
    ids = [f'2008_{i:06d}' for i in range(num_train + 2)]
    train, val = ids[:num_train], ids[num_train:]
    root = 'VOCdevkit/VOC2012/'
    members = {root + 'ImageSets/Segmentation/train.txt': '\n'.join(train).encode(),
               root + 'ImageSets/Segmentation/val.txt': '\n'.join(val).encode()}
    palette = np.zeros((256, 3), np.uint8)
    palette[:21] = voc.PALETTE
    palette[255] = voc.BOUNDARY_COLOR
    for image_id in ids:
        height, width = (375, 500) if rng.random() < 0.7 else (500, 375)
        members[f'{root}JPEGImages/{image_id}.jpg'] = _encode(
            natural_image(rng, height, width), 'JPEG', quality=90)
        label = Image.fromarray(region_label(rng, height, width, [0, 0, 15, 7, 12, 255]), 'P')
        label.putpalette(palette.tobytes())
        members[f'{root}SegmentationClass/{image_id}.png'] = _palette_png(label)
    with tarfile.open(os.path.join(directory, voc.VOC_ARCHIVE), 'w') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _palette_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def write_cityscapes(directory: str, num_train: int, rng: np.random.Generator) -> None:
    images, labels = {}, {}
    frames = {'train': [('aachen', i) for i in range(num_train)], 'val': [('frankfurt', 0)],
              'test': [('berlin', 0)]}
    for split, items in frames.items():
        for city, i in items:
            image_id = f'{city}_{i:06d}_000019'
            images[f'leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png'] = _encode(
                natural_image(rng, 1024, 2048), 'PNG')
            labels[f'gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png'] = _encode(
                region_label(rng, 1024, 2048, [7, 7, 8, 11, 21, 23, 26, 24, 0]), 'PNG')
    for name, members in (('leftImg8bit_trainvaltest.zip', images),
                          ('gtFine_trainvaltest.zip', labels)):
        with zipfile.ZipFile(os.path.join(directory, name), 'w') as archive:
            for member, data in members.items():
                archive.writestr(member, data)


RECIPES = {
    'voc': pipeline.TrainRecipe(
        crop_size=(512, 512), scale_range=(0.5, 2.0), base_size=(2048, 512), cat_max_ratio=0.75,
        flip=True, photometric=True, num_classes=21),
    'cityscapes': pipeline.TrainRecipe(
        crop_size=(512, 1024), scale_range=(0.5, 2.0), base_size=(2048, 1024),
        cat_max_ratio=0.75, flip=True, photometric=True,
        label_map=cityscapes.LABEL_ID_TO_TRAIN_ID, num_classes=19),
}
BATCH_SIZES = {'voc': 16, 'cityscapes': 8}


def run(name: str, workdir: str, num_train: int, warmup: int, batches: int) -> dict:
    rng = np.random.default_rng(0)
    manual = os.path.join(workdir, name, 'manual')
    os.makedirs(manual, exist_ok=True)
    data_dir = os.path.join(workdir, name, 'tfds')
    if name == 'voc':
        write_voc(manual, num_train, rng)
        make = functools.partial(voc.VocSegmentation, config='voc2012', data_dir=data_dir)
    else:
        write_cityscapes(manual, num_train, rng)
        make = functools.partial(cityscapes.Cityscapes, data_dir=data_dir)
    start = time.perf_counter()
    make().download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    prepare_s = time.perf_counter() - start
    builder = make()
    num_prepared = sum(split.num_examples for split in builder.info.splits.values())
    recipe, batch_size = RECIPES[name], BATCH_SIZES[name]
    it = pipeline.train_batches(builder, recipe, split='train', local_batch_size=batch_size,
                                seed=0)
    for _ in range(warmup):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(it)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert batch['image'].shape[1:3] == recipe.crop_size
    num_images = batches * batch_size
    # CPU time (all threads) per image is what a core costs, whatever else runs on the machine.
    return {'dataset': name, 'images_per_s': round(num_images / elapsed, 2),
            'cpu_ms_per_image': round(1000 * cpu / num_images, 1),
            'images_per_core_s': round(num_images / cpu, 2),
            'batch': batch_size, 'crop': recipe.crop_size,
            'prepare_s_per_image': round(prepare_s / num_prepared, 3),
            'cpus': len(os.sched_getaffinity(0)), 'load_avg_1min': os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dataset', choices=['voc', 'cityscapes', 'both'], default='both')
    parser.add_argument('--num_train', type=int, default=32, help='fake training images')
    parser.add_argument('--warmup', type=int, default=3, help='batches before timing')
    parser.add_argument('--batches', type=int, default=10, help='batches timed')
    parser.add_argument('--workdir', default=None, help='default: a temporary directory')
    args = parser.parse_args()
    names = ['voc', 'cityscapes'] if args.dataset == 'both' else [args.dataset]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result = run(name, args.workdir or tmp, args.num_train, args.warmup, args.batches)
            print(json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
