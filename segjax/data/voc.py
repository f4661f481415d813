"""Pascal VOC 2012 semantic segmentation (+ SBD): a TFDS builder reading the official archives.

TFDS's own `voc` builder has no segmentation masks, so this one reads them itself:

  config `voc2012` (default): from VOCtrainval_11-May-2012.tar
    train       1,464  ImageSets/Segmentation/train.txt
    validation  1,449  ImageSets/Segmentation/val.txt
  config `aug`: the same plus benchmark.tgz (SBD, Hariharan et al. 2011)
    train_aug  10,582  VOC train + SBD train + SBD val - VOC val: the split papers train on.
                       Labels: VOC's SegmentationClass where the image has one (VOC train),
                       SBD's cls/<id>.mat (GTcls.Segmentation) otherwise, as mmsegmentation does.

Images are stored as the original JPEG bytes; labels as single-channel PNGs of class indices
0..20 (CLASS_NAMES) with 255 where VOC marks object boundaries and difficult regions (ignored in
training and evaluation). Labels are decoded from the palette PNGs' indices (an RGB rendering is
mapped back through PALETTE). A label value outside {0..20, 255} becomes 255 and is counted:
logged, and kept in `builder.info.metadata['unknown_label_values']`.

Archives are taken from the manual directory (TFDS's `<data_dir>/downloads/manual/` unless
`download_config.manual_dir` says otherwise) when there, else downloaded from the official URLs
by TFDS's download manager and checked against recorded checksums. Prepare with

    python -m segjax.data.voc --data_dir ~/tensorflow_datasets --config aug \\
        [--manual_dir DIR_WITH_ARCHIVES]
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from segjax.data import prepare
from segjax.data.prepare import CorruptFileError, MissingMemberError

if __name__ == '__main__':
    # `python -m segjax.data.voc` runs the package's copy of this module, so that the builder
    # is defined, and registered with TFDS, once and under its real module name.
    from segjax.data import voc as _this_module

    _this_module.main()
    sys.exit()

CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor',
)

# VOCdevkit's `labelcolormap`: row i is the colour of class i in SegmentationClass PNGs.
PALETTE = np.array(
    [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128],
        [0, 128, 128], [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0],
        [64, 0, 128], [192, 0, 128], [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0],
        [0, 192, 0], [128, 192, 0], [0, 64, 128],
    ],
    dtype=np.uint8,
)
IGNORE_INDEX = 255
BOUNDARY_COLOR = (224, 224, 192)  # palette entry 255: object boundaries, 'difficult' regions

VOC_ARCHIVE = 'VOCtrainval_11-May-2012.tar'
VOC_URL = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar'
VOC_SHA256 = 'e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb'
VOC_SIZE = 1_999_639_040
SBD_ARCHIVE = 'benchmark.tgz'
SBD_URL = ('http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/'
           'semantic_contours/benchmark.tgz')
SBD_MD5 = '82b4d87ceb2ed10f6038a1cba92111cb'  # as recorded by torchvision's SBDataset

_VOC_ROOT = 'VOCdevkit/VOC2012'
_SBD_ROOT = 'benchmark_RELEASE/dataset'
_KNOWN = np.zeros(256, bool)
_KNOWN[: len(CLASS_NAMES)] = _KNOWN[IGNORE_INDEX] = True


@dataclasses.dataclass
class VocSegmentationConfig(tfds.core.BuilderConfig):
    with_sbd: bool = False  # adds the train_aug split from benchmark.tgz


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one example comes from: archive members, relative to their extraction roots."""

    id: str
    image: epath.Path
    image_member: str
    label: epath.Path
    label_member: str  # .png (VOC SegmentationClass) or .mat (SBD cls)


class VocSegmentation(tfds.core.GeneratorBasedBuilder):
    """Pascal VOC 2012 segmentation (21 classes), optionally with SBD's train_aug split."""

    name = 'voc2012_segmentation'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        VocSegmentationConfig(
            name='voc2012', description='VOC 2012 train (1,464) and validation (1,449).'),
        VocSegmentationConfig(
            name='aug', with_sbd=True,
            description='+ train_aug (10,582): VOC train + SBD train/val - VOC val.'),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Optional (otherwise downloaded): put {VOC_ARCHIVE} ({VOC_URL}) and, for the `aug` config,
    {SBD_ARCHIVE} ({SBD_URL}) in the manual directory, unextracted.
    """
    # TFDS's download manager checks downloads against these (cf. TFDS's voc checksums).
    url_infos = {VOC_URL: tfds.download.checksums.UrlInfo(
        size=VOC_SIZE, checksum=VOC_SHA256, filename=VOC_ARCHIVE)}
    # What a damaged-archive error says about each archive (prepare.prepared reads it).
    ARCHIVES = {
        VOC_ARCHIVE: prepare.Archive(VOC_ARCHIVE, VOC_URL, size=VOC_SIZE,
                                     checksum=f'sha256 {VOC_SHA256}'),
        SBD_ARCHIVE: prepare.Archive(SBD_ARCHIVE, SBD_URL, size_text='about 1.4 GB',
                                     checksum=f'md5 {SBD_MD5}'),
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='http://host.robots.ox.ac.uk/pascal/VOC/voc2012/',
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        self.archive_paths = {}  # archive file name -> the file read, for error messages
        voc_dir = _extract(self, dl_manager, VOC_ARCHIVE, VOC_URL)
        voc = voc_dir / _VOC_ROOT
        lists = voc / 'ImageSets' / 'Segmentation'
        if not (lists / 'train.txt').exists():
            raise MissingMemberError(
                f'{VOC_ARCHIVE} has no {_VOC_ROOT}/ImageSets/Segmentation/train.txt: is it the '
                f'VOC 2012 trainval archive from {VOC_URL}?', f'{VOC_ARCHIVE}:')
        train, val = _read_ids(lists / 'train.txt'), _read_ids(lists / 'val.txt')

        def voc_source(image_id: str) -> _Source:
            image, label = f'JPEGImages/{image_id}.jpg', f'SegmentationClass/{image_id}.png'
            return _Source(image_id, voc / image, f'{VOC_ARCHIVE}:{_VOC_ROOT}/{image}',
                           voc / label, f'{VOC_ARCHIVE}:{_VOC_ROOT}/{label}')

        splits = {
            'train': self._generate_examples('train', [voc_source(i) for i in train]),
            'validation': self._generate_examples('validation', [voc_source(i) for i in val]),
        }
        if self.builder_config.with_sbd:
            sbd = _extract(self, dl_manager, SBD_ARCHIVE, SBD_URL, md5=SBD_MD5) / _SBD_ROOT
            if not (sbd / 'train.txt').exists():
                raise MissingMemberError(
                    f'{SBD_ARCHIVE} has no {_SBD_ROOT}/train.txt: is it SBD from {SBD_URL}?',
                    f'{SBD_ARCHIVE}:')
            sbd_ids = _read_ids(sbd / 'train.txt') + _read_ids(sbd / 'val.txt')
            voc_train, excluded = set(train), set(val)

            def sbd_source(image_id: str) -> _Source:
                image = voc / 'JPEGImages' / f'{image_id}.jpg'
                image_member = f'{VOC_ARCHIVE}:{_VOC_ROOT}/JPEGImages/{image_id}.jpg'
                if not image.exists():  # every SBD image is in VOC 2012; SBD's copy otherwise
                    image = sbd / 'img' / f'{image_id}.jpg'
                    image_member = f'{SBD_ARCHIVE}:{_SBD_ROOT}/img/{image_id}.jpg'
                return _Source(image_id, image, image_member, sbd / 'cls' / f'{image_id}.mat',
                               f'{SBD_ARCHIVE}:{_SBD_ROOT}/cls/{image_id}.mat')

            aug_ids = sorted((voc_train | set(sbd_ids)) - excluded)
            sources = [voc_source(i) if i in voc_train else sbd_source(i) for i in aug_ids]
            splits['train_aug'] = self._generate_examples('train_aug', sources)
        return splits

    def _generate_examples(self, split: str, sources: list[_Source]) -> Iterator[tuple[str, dict]]:
        report = UnknownLabels()
        for source in sources:
            image_bytes, (width, height) = read_image(source.image, source.image_member)
            if source.label_member.endswith('.mat'):
                label = read_sbd_label(source.label, source.label_member)
            else:
                label = read_voc_label(source.label, source.label_member)
            if label.shape != (height, width):
                raise ValueError(
                    f'{split} example {source.id}: image {source.image_member} is '
                    f'{height}x{width} but label {source.label_member} is '
                    f'{label.shape[0]}x{label.shape[1]}')
            label = report.map_unknown(label, source.label_member)
            yield source.id, {
                'image': image_bytes,
                'label': encode_png(label),
                'image/filename': f'{source.id}.jpg',
            }
        report.publish(self, split)


# ----------------------------------------------------------------------------------------------
# Archives.


def manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path:
    """The manual directory, whether or not it exists yet (TFDS's property raises if not)."""
    try:
        return dl_manager.manual_dir
    except (AssertionError, ValueError):
        return epath.Path(dl_manager._manual_dir)  # only its path, for messages


def _extract(builder: VocSegmentation, dl_manager: tfds.download.DownloadManager,
             filename: str, url: str, md5: str | None = None) -> epath.Path:
    """Extracts the archive from the manual dir, or downloads it (checksum-checked) first."""
    manual = manual_dir(dl_manager) / filename
    if manual.exists():
        builder.archive_paths[filename] = manual
        return prepare.extract(dl_manager, manual, builder.ARCHIVES[filename])
    try:
        path = epath.Path(dl_manager.download(url))
    except Exception as e:  # any download failure gets the same advice
        raise RuntimeError(
            f'could not download {url} ({type(e).__name__}: {e}). Download {filename} yourself '
            f'and put it, unextracted, in {manual.parent}') from e
    if md5 is not None:
        digest = hashlib.md5()
        with path.open('rb') as f:
            for chunk in iter(lambda: f.read(1 << 24), b''):
                digest.update(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f'{path} (from {url}) has md5 {digest.hexdigest()}, expected {md5}; '
                             'delete it and try again')
    builder.archive_paths[filename] = path
    return prepare.extract(dl_manager, path, builder.ARCHIVES[filename])


def _read_ids(path: epath.Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_member(path: epath.Path, member: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingMemberError(f'archive member {member} is missing', member) from None


def read_image(path: epath.Path, member: str) -> tuple[bytes, tuple[int, int]]:
    """(encoded bytes to store, (width, height)); the whole image is decoded once to check it.

    RGB JPEG/PNG bytes are kept as they are; other modes (greyscale, CMYK) are converted to RGB
    and stored as PNG, so that training decodes exactly these pixels.
    """
    data = _read_member(path, member)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode == 'RGB' and image.format in ('JPEG', 'PNG'):
                return data, image.size
            return encode_png(np.asarray(image.convert('RGB'))), image.size
    except Exception as e:  # any decoding failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable image: {e}',
                               member) from e


def read_voc_label(path: epath.Path, member: str) -> np.ndarray:
    """A SegmentationClass PNG -> uint8 [H, W] of palette indices (class ids, 255 boundary)."""
    data = _read_member(path, member)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ('P', 'L'):  # the official files: palette indices are the classes
                return np.asarray(image, np.uint8).copy()
            if image.mode in ('RGB', 'RGBA'):
                return colors_to_indices(np.asarray(image.convert('RGB')))
            raise ValueError(f'unexpected PNG mode {image.mode!r}')
    except Exception as e:  # any decoding failure: the member is unreadable
        raise CorruptFileError(f'archive member {member} is not a readable label PNG: {e}',
                               member) from e


def colors_to_indices(rgb: np.ndarray) -> np.ndarray:
    """A VOC colour rendering [H, W, 3] -> class indices; the boundary colour -> 255, any other
    colour -> 256 (unknown, for the caller to count and ignore)."""
    colors = np.concatenate([PALETTE, np.array([BOUNDARY_COLOR], np.uint8)]).astype(np.int64)
    values = np.array(list(range(len(PALETTE))) + [IGNORE_INDEX])
    keys = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    packed = rgb.astype(np.int64)
    packed = (packed[..., 0] << 16) | (packed[..., 1] << 8) | packed[..., 2]
    order = np.argsort(keys)
    pos = np.clip(np.searchsorted(keys[order], packed), 0, len(keys) - 1)
    found = keys[order][pos] == packed
    return np.where(found, values[order][pos], 256).astype(np.int32)


def read_sbd_label(path: epath.Path, member: str) -> np.ndarray:
    """An SBD cls/<id>.mat -> its GTcls.Segmentation, uint8-valued [H, W] (needs scipy)."""
    from scipy import io as scipy_io  # only the aug config needs it

    data = _read_member(path, member)
    try:
        mat = scipy_io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False,
                               variable_names=['GTcls'])
        segmentation = np.asarray(mat['GTcls'].Segmentation)
    except Exception as e:  # scipy raises many kinds on a bad file
        raise CorruptFileError(
            f'archive member {member} is not a readable SBD .mat with GTcls.Segmentation: '
            f'{type(e).__name__}: {e}', member) from e
    if segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype, np.number):
        raise CorruptFileError(f'archive member {member}: GTcls.Segmentation is not a 2-D '
                               f'numeric array ({segmentation.dtype}, {segmentation.shape})',
                               member)
    whole = np.isfinite(segmentation) & (segmentation == np.round(segmentation))
    # Non-integers and out-of-byte values are unknown labels (256), never wrapped into a class.
    in_range = whole & (segmentation >= 0) & (segmentation <= 255)
    return np.where(in_range, segmentation, 256).astype(np.int32)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format='PNG')
    return buffer.getvalue()


class UnknownLabels:
    """Maps label values outside {0..20, 255} to 255 and counts them per split."""

    def __init__(self, known: np.ndarray = _KNOWN, ignore_index: int = IGNORE_INDEX):
        self.known, self.ignore_index = known, ignore_index
        self.pixels, self.files, self.values, self.first = 0, 0, set(), []

    def map_unknown(self, label: np.ndarray, member: str) -> np.ndarray:
        label = np.asarray(label)
        unknown = ~self.known[np.clip(label, 0, 255)] | (label < 0) | (label > 255)
        if unknown.any():
            self.pixels += int(unknown.sum())
            self.files += 1
            self.values.update(int(v) for v in np.unique(label[unknown]))
            if len(self.first) < 5:
                self.first.append(member)
            label = np.where(unknown, self.ignore_index, label)
        return label.astype(np.uint8)

    def publish(self, builder: tfds.core.DatasetBuilder, split: str) -> None:
        """Logs the count and records it in the data set's metadata (saved with it)."""
        record = {'pixels': self.pixels, 'label_files': self.files,
                  'values': sorted(self.values), 'first_files': self.first}
        builder.info.metadata.setdefault('unknown_label_values', {})[split] = record
        if self.pixels:
            logging.warning(
                '%s %s: %d pixels in %d label files had values %s outside the known set; they '
                'are stored as %d (ignore). First files: %s', builder.name, split, self.pixels,
                self.files, sorted(self.values), self.ignore_index, self.first)


def main(argv: list[str] | None = None) -> None:
    prepare.cli(
        argv, prog='python -m segjax.data.voc', description='Prepare voc2012_segmentation (TFDS).',
        manual_files='the archives',
        add_arguments=lambda parser: parser.add_argument('--config', default='voc2012',
                                                         choices=['voc2012', 'aug']),
        make_builder=lambda args: VocSegmentation(config=args.config, data_dir=args.data_dir),
        report=lambda builder: print('labels outside the known set:',
                                     dict(builder.info.metadata['unknown_label_values'])))
