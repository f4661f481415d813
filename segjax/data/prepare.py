"""Preparing a TFDS data set once per data_dir: safe when several runs start at once, and with
one clear line when it fails.

    builder = prepare.prepared(lambda: VocSegmentation(config='aug', data_dir=data_dir))

`prepared` is what the prepare commands (`python -m segjax.data.voc`, `.cityscapes`) and every
run (`segjax.experiment.dataset_builder`) call. It

- holds an exclusive lock, `<data_dir>/.<builder name>.lock` (fcntl.flock), while it prepares, so
  that a second run on the same data_dir waits (saying so, once) and then reuses the data instead
  of racing TFDS's final rename and dying with FileExistsError. flock serialises the processes of
  one machine. Across machines it holds only where the file system supports it (local disks, NFS
  with working lock managers); elsewhere, prepare once (the prepare command, or a single run)
  before starting runs on several machines;
- raises `PrepareError` with a one-line message for every failure: the archive, what is wrong with
  it and what to do (download it again, check its size or checksum), and removes the
  `incomplete.*` directories the failed attempt left (TFDS leaves half-extracted archives);
- re-extracts an archive whose file changed since it was extracted (TFDS keys extractions by
  file name only, so a re-downloaded archive would otherwise be read from the old extraction).

It also holds what the builders share: the errors naming an archive member (CorruptFileError),
reading a zip in place without trusting its members (`open_zip`, `zip_members`,
`read_zip_member`), and the prepare command itself (`cli`, each builder's `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import os
import re
import shutil
import sys
import time
import traceback
import zipfile
import zlib
from collections.abc import Callable, Iterator

import tensorflow_datasets as tfds
from etils import epath

from segjax import logs

# TFDS's prefix for directories that become real ones by a rename once complete.
INCOMPLETE_PREFIX = 'incomplete.'


class PrepareError(RuntimeError):
    """Preparing a data set failed; the message is one line saying what to do."""


class DamagedArchiveError(PrepareError):
    """An archive that cannot be extracted (truncated or corrupt)."""


class CorruptFileError(ValueError):
    """An archive member that cannot be read as what it should be (names the member).

    `member` is '<archive file name>:<path inside it>'; `archive` (its first part) lets
    `prepared` add what to do about the archive to the message.
    """

    def __init__(self, message: str, member: str = ''):
        super().__init__(message)
        self.archive = member.split(':', 1)[0] if ':' in member else None


class MissingMemberError(CorruptFileError):
    """A file the archive's own lists name is not in it: a truncated or different archive."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """An archive a builder reads, and what is known about the official file."""

    filename: str
    source: str  # where to get it
    size: int | None = None  # exact size in bytes of the official file, when known
    size_text: str = ''  # otherwise the size the download page lists, e.g. 'about 11 GB'
    checksum: str = ''  # e.g. 'md5 82b4...' when known


def archive_advice(archive: Archive, path: epath.PathLike | None) -> str:
    """'it is N bytes (the official file: M bytes, sha256 ...); download it again from URL ...'"""
    official = ', '.join(x for x in (f'{archive.size:,} bytes' if archive.size
                                     else archive.size_text, archive.checksum) if x)
    facts = []
    if path is not None and os.path.exists(path):
        facts.append(f'it is {os.path.getsize(path):,} bytes')
    if official:
        facts.append(f'(the official file: {official})')
    return ' '.join(facts + [f'- download it again from {archive.source} and run again'])


def one_line(text: str) -> str:
    return ' '.join(str(text).split())


# ----------------------------------------------------------------------------------------------
# Extraction.


def _stamp(path: epath.Path) -> dict:
    stat = os.stat(path)
    return {'archive': os.path.realpath(path), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def _incomplete(directory: epath.Path) -> set[str]:
    if not directory.exists():
        return set()
    return {p.name for p in directory.iterdir() if p.name.startswith(INCOMPLETE_PREFIX)}


def _remove(path: epath.Path) -> None:
    """rmtree that tolerates files still being written by TFDS's copy threads."""
    for _ in range(5):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.2)


def plain_tar_is_truncated(path: epath.PathLike, official_size: int | None = None) -> bool:
    """A .tar ends with two zero 512-byte blocks; a cut-off download ends mid-member."""
    size = os.path.getsize(path)
    if size == official_size:
        return False
    if size < 1024 or size % 512:
        return True
    with open(path, 'rb') as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def extract(dl_manager: tfds.download.DownloadManager, path: epath.PathLike,
            archive: Archive) -> epath.Path:
    """dl_manager.extract(path) that re-extracts a changed archive, cleans up after a failure and
    names the archive and what to do when it is truncated or corrupt (DamagedArchiveError)."""
    path = epath.Path(path)
    if path.name.endswith('.tar') and plain_tar_is_truncated(path, archive.size):
        raise DamagedArchiveError(
            f'{os.fspath(path)} is truncated (it ends inside a member, without the tar '
            f'end-of-archive blocks); {archive_advice(archive, path)}')
    extract_dir = epath.Path(dl_manager._extract_dir)  # TFDS keeps no public name for it
    method = tfds.download.ExtractMethod(
        tfds.download.Resource(path=path).extract_method).name
    target = extract_dir / f'{method}.{path.name}'
    stamp_file = extract_dir / f'{method}.{path.name}.segjax-source.json'
    stamp = _stamp(path)
    if target.exists() and (not stamp_file.exists()
                            or json.loads(stamp_file.read_text()) != stamp):
        _remove(target)  # extracted from another file of the same name (or by older segjax)
    for name in _incomplete(extract_dir):
        if name.endswith(f'_{target.name}'):  # under the lock: left by a killed run
            _remove(extract_dir / name)
    stamp_file.unlink(missing_ok=True)
    before = _incomplete(extract_dir)
    try:
        extracted = epath.Path(dl_manager.extract(path))
    except BaseException as e:
        for name in _incomplete(extract_dir) - before:
            _remove(extract_dir / name)
        if isinstance(e, Exception):
            cause = one_line(str(e.__cause__ or e))
            raise DamagedArchiveError(
                f'{os.fspath(path)} is truncated or corrupt (extracting it failed: {cause}); '
                f'{archive_advice(archive, path)}') from e
        raise
    extract_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp))
    return extracted


# ----------------------------------------------------------------------------------------------
# Reading a zip in place: untrusted members.


@contextlib.contextmanager
def open_zip(path: epath.PathLike, archive: Archive) -> Iterator[zipfile.ZipFile]:
    """zipfile.ZipFile(path), a truncated or corrupt zip being a DamagedArchiveError."""
    try:
        opened = zipfile.ZipFile(os.fspath(path))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DamagedArchiveError(
            f'{os.fspath(path)} is truncated or corrupt (reading it failed: '
            f'{one_line(str(e))}); {archive_advice(archive, path)}') from e
    with opened:
        yield opened


def is_unsafe_member_name(name: str) -> bool:
    """An absolute or drive-rooted name, a `..` component, a backslash or NUL: never in an
    official archive, and what path-traversal archives use."""
    return (name.startswith('/') or '\\' in name or '..' in name.split('/') or '\x00' in name
            or re.match(r'^[A-Za-z]:', name) is not None)


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """'<zip file name>:<member>', as errors name it."""
    return f'{os.path.basename(archive.filename or "")}:{info.filename}'


def zip_members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """{member name: ZipInfo} of the files; an unsafe or duplicate name is a CorruptFileError."""
    index = {}
    for info in archive.infolist():
        member = _member(archive, info)
        if is_unsafe_member_name(info.filename):
            raise CorruptFileError(f'archive member {member!r} has an unsafe name (absolute, '
                                   "'..' or backslash); the official archive has none", member)
        if info.is_dir():
            continue
        if info.filename in index:
            raise CorruptFileError(f'archive member {member} is in the archive twice', member)
        index[info.filename] = info
    return index


def read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int,
                    what: str) -> bytes:
    """The member's bytes, never more than `limit` whatever its header says ('... more than the
    {limit} {what} can be'); a bad CRC, an encrypted or undecompressable member is a
    CorruptFileError naming it."""
    member = _member(archive, info)
    if info.file_size > limit:
        raise CorruptFileError(f'archive member {member} is {info.file_size:,} bytes, more than '
                               f'the {limit:,} {what} can be', member)
    try:
        with archive.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError,
            OSError, ValueError) as e:
        raise CorruptFileError(f'archive member {member} cannot be read: {e}', member) from e
    if len(data) > limit:  # a header that lies about the size (a decompression bomb)
        raise CorruptFileError(f'archive member {member} is more than {limit:,} bytes', member)
    return data


# ----------------------------------------------------------------------------------------------
# Locking.


def lock_path(builder: tfds.core.DatasetBuilder) -> epath.Path:
    return epath.Path(builder.data_dir_root) / f'.{builder.name}.lock'


@contextlib.contextmanager
def exclusive(path: epath.PathLike, what: str) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created if missing, never removed: removing a lock
    file races with processes about to open it); says once if it has to wait."""
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, 'a') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'waiting for {os.fspath(path)}: another process is preparing {what}',
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f'warning: cannot lock {os.fspath(path)} ({e.strerror}): preparing {what} '
                  'without a lock; do not start other runs on this data_dir until it is done',
                  file=sys.stderr, flush=True)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Preparing.


@contextlib.contextmanager
def _library_output() -> Iterator[None]:
    """TFDS prints banners to stdout while it prepares; quiet CLIs print their own line."""
    if logs.is_quiet():
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    else:
        yield


def _remove_stale(builder: tfds.core.DatasetBuilder) -> None:
    """Under the lock, `incomplete.*` next to the version directory are from killed runs."""
    config_dir = epath.Path(builder.data_path).parent
    for name in _incomplete(config_dir):
        _remove(config_dir / name)


def _message(error: BaseException, builder: tfds.core.DatasetBuilder) -> str:
    """One line: the error, then (for a damaged archive member) the archive and what to do."""
    if isinstance(error, PrepareError):
        return one_line(str(error))
    text = one_line(str(error))
    known = isinstance(error, OSError | ValueError | RuntimeError | AssertionError)
    message = (f'preparing {builder.info.full_name} in {os.fspath(builder.data_dir_root)}: '
               + (text if known and text else f'{type(error).__name__}: {text}'))
    # Builders that read archives name them: ARCHIVES (what is known), archive_paths (where).
    archive = getattr(builder, 'ARCHIVES', {}).get(getattr(error, 'archive', None))
    if archive is not None:
        path = getattr(builder, 'archive_paths', {}).get(archive.filename)
        message += (f'. {archive.filename} is damaged or not the official file; '
                    + archive_advice(archive, path))
    return message


def prepared(make_builder: Callable[[], tfds.core.DatasetBuilder],
             download_config: tfds.download.DownloadConfig | None = None,
             ) -> tfds.core.DatasetBuilder:
    """A builder of prepared data: prepares it first (once per data_dir, under the lock) if needed.

    `make_builder` is called again after preparation: a builder reads its split sizes when it is
    constructed. Failures raise PrepareError (one line) and leave no `incomplete.*` behind.
    """
    builder = make_builder()
    if builder.is_prepared():
        return builder
    what = f'{builder.info.full_name} in {os.fspath(builder.data_dir_root)}'
    try:
        with exclusive(lock_path(builder), what):
            builder = make_builder()  # another process may have prepared it while we waited
            if not builder.is_prepared():
                _remove_stale(builder)
                print(f'preparing {what} (once; later runs reuse it)', flush=True)
                start = time.time()
                with _library_output():
                    builder.download_and_prepare(download_config=download_config)
                print(f'prepared {builder.info.full_name} in {time.time() - start:.0f}s',
                      flush=True)
    except Exception as e:
        if logs.is_verbose():
            traceback.print_exception(e)
        raise PrepareError(_message(e, builder)) from e
    return make_builder()


# ----------------------------------------------------------------------------------------------
# The prepare command.


def cli(argv: list[str] | None, *, prog: str, description: str, manual_files: str,
        make_builder: Callable[[argparse.Namespace], tfds.core.DatasetBuilder],
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        report: Callable[[tfds.core.DatasetBuilder], None] | None = None) -> None:
    """`python -m segjax.data.<builder>`: prepares `make_builder(args)` in --data_dir from the
    files in --manual_dir (`manual_files` says which, in --help), then prints each split's size,
    what `report` prints and where the data is. `add_arguments` adds the builder's own flags.
    A failure is one line on stderr and exit code 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument('--data_dir', default=None, help='TFDS data_dir (default: TFDS default)')
    parser.add_argument('--manual_dir', default=None, help=f'directory holding {manual_files} '
                        '(default <data_dir>/downloads/manual)')
    if add_arguments is not None:
        add_arguments(parser)
    logs.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    logs.quiet(args.verbose)
    try:
        builder = prepared(lambda: make_builder(args),
                           tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    except PrepareError as e:  # missing, damaged or mismatched files: one line
        parser.exit(1, f'{parser.prog}: error: {e}\n')
    for split, info in builder.info.splits.items():
        print(f'{split}: {info.num_examples} examples')
    if report is not None:
        report(builder)
    print('prepared in', os.fspath(builder.data_dir))
