"""State dicts from weights files that strangers publish, read without torch and without trust.

`read_state_dict(path)` reads both layouts of `torch.save` (the zip format of torch >= 1.6 and
the legacy pre-1.6 format) into {name: numpy array}, and hands `.safetensors` files to
`segjax.safetensors.read_safetensors` (bounded header, offsets, dtypes, duplicate names). A
`.pth` holds a pickle, and a pickle is a program, so this reader assumes every file is hostile:

  * Code: the unpickler knows `collections.OrderedDict`, torch's tensor-rebuild functions and
    torch's storage/dtype names, all as stand-ins of its own; any other global (`os.system`,
    `builtins.eval`, ...) is refused with `UnsafePickleError` before anything runs.
  * Mutation: every object a file can reach through those names is an immutable record whose
    `__setstate__` refuses a pickle BUILD, so one file cannot change how the next one loads.
  * Memory: a storage is a record made from a persistent id (key, dtype, element count), never
    another tensor; its bytes are read only when a state-dict entry needs them, must be exactly
    the declared size and present in the file (zip members through a bounded read, at most the
    file's size in all). A tensor's size, strides and offset are checked against its storage's
    bytes before anything is read, and the tensors returned may add up to at most
    `_EXPANSION` x their storages' bytes + `_SLACK_BYTES` (stride-0 and repeated views).
    Pickles are read from memory after a scan that checks every declared length (the C
    unpickler allocates a declared length before reading it).
  * Errors: any malformed or hostile file raises `PretrainedError` (`UnsafePickleError` for the
    two above), never a zipfile/pickle/struct/numpy error.
"""

from __future__ import annotations

import _compat_pickle  # pickle's own Python 2 -> 3 name table
import collections
import io
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from segjax.safetensors import PretrainedError, read_safetensors


class UnsafePickleError(PretrainedError):
    """A `.pth` file that asks the unpickler for something other than tensors."""


_MAX_PICKLE_BYTES = 16 << 20  # ~100 bytes a tensor: room for 150,000 tensors
_MAX_EXTENT = 1 << 48  # sizes, strides, offsets: past any real tensor, far from int64 overflow
_MAX_DIMS = 32
_EXPANSION = 4  # tied weights repeat a storage under several names
_SLACK_BYTES = 1 << 20  # small expanded (stride-0) buffers
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001
_STORAGE_KEY = re.compile(r'[0-9A-Za-z_]{1,64}')  # torch writes decimal numbers

_STORAGE_DTYPES = {  # torch.<Name>Storage -> numpy dtypes
    'Double': np.float64, 'Float': np.float32, 'Half': np.float16,
    'BFloat16': ml_dtypes.bfloat16, 'Long': np.int64, 'Int': np.int32, 'Short': np.int16,
    'Char': np.int8, 'Byte': np.uint8, 'Bool': np.bool_,
}
_TORCH_DTYPES = {  # torch.<dtype>, as _rebuild_tensor_v3 pickles it
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'int32': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
}


# ---------------------------------------------------------------------------------------------
# What a file can reach: immutable records.

class _Record:
    """Base of every object a file can reach. Immutable; a pickle BUILD calls `__setstate__`
    when an object has one, so defining it here refuses BUILD/SETSTATE on all of them."""

    __slots__ = ()

    def __init__(self, **fields: Any):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any):
        raise UnsafePickleError(f'refusing to modify {self!r}')

    def __setstate__(self, state: Any):
        raise UnsafePickleError(f'refusing to modify {self!r}: the file applies a pickle BUILD '
                                '(setstate) to it, which no state dict needs')


class _TorchType(_Record):
    """Stands in for `torch.FloatStorage`, `torch.float32`, ...: only the dtype matters."""

    __slots__ = ('name', 'dtype')

    def __repr__(self) -> str:
        return self.name


class _Function(_Record):
    """Stands in for an allowed callable (the real one is not reachable, so not mutable)."""

    __slots__ = ('name', 'function')

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __repr__(self) -> str:
        return self.name


class _Storage(_Record):
    """A storage the unpickler made from a persistent id; its bytes are read later."""

    __slots__ = ('key', 'dtype', 'numel', 'byteorder')

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self) -> str:
        return f'storage {self.key}'


class _Tensor(_Record):
    """A strided view of a storage whose bounds have been checked; numpy comes later."""

    __slots__ = ('storage', 'dtype', 'offset', 'size', 'stride')

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize

    def __repr__(self) -> str:
        return f'tensor {self.size} of {self.storage!r}'


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < _MAX_EXTENT:
        raise PretrainedError(f'malformed {what} {value!r:.80}: expected an int in [0, 2**48)')
    return int(value)


def _counts(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > _MAX_DIMS:
        raise PretrainedError(f'malformed tensor {what} {values!r:.80}')
    return tuple(_count(v, f'tensor {what} entry') for v in values)


def _span(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from a non-empty view's first element to its last, inclusive."""
    return 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))


def _tensor(storage: Any, dtype: np.dtype, offset: Any, size: Any, stride: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise PretrainedError(f'a tensor names a {type(storage).__name__} as its storage; only '
                              "storages the file declares (persistent ids) are accepted")
    offset = _count(offset, 'tensor offset')
    size, stride = _counts(size, 'size'), _counts(stride, 'stride')
    if len(size) != len(stride):
        raise PretrainedError(f'tensor size {size} and stride {stride} differ in length')
    if math.prod(n for n in size if n) * dtype.itemsize >= 2**62:  # numpy cannot shape it
        raise PretrainedError(f'tensor size {size} is too large')
    if 0 not in size and (offset + _span(size, stride)) * dtype.itemsize > storage.nbytes:
        raise PretrainedError(f'tensor of size {size}, stride {stride}, offset {offset} reads '
                              f'past its storage ({storage.nbytes} bytes)')
    return _Tensor(storage=storage, dtype=dtype, offset=offset, size=size, stride=stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *unused: Any):
    return _tensor(storage, getattr(storage, 'dtype', None), offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    # v3 pickles a byte storage and the element dtype separately.
    if not isinstance(dtype, _TorchType):
        raise PretrainedError(f'a tensor names a {type(dtype).__name__} as its dtype')
    return _tensor(storage, dtype.dtype, offset, size, stride)


def _rebuild_parameter(data: Any, *unused: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise PretrainedError(f'a parameter holds a {type(data).__name__}, not a tensor')
    return data


def _allowed_globals() -> dict[tuple[str, str], _Record]:
    functions = {('collections', 'OrderedDict'): collections.OrderedDict,
                 ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
                 ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
                 ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
                 ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter}
    types = {'UntypedStorage': np.uint8, **{f'{n}Storage': d for n, d in _STORAGE_DTYPES.items()},
             **_TORCH_DTYPES}
    return {**{key: _Function(name='.'.join(key), function=f) for key, f in functions.items()},
            **{('torch', n): _TorchType(name=f'torch.{n}', dtype=np.dtype(d))
               for n, d in types.items()}}


_ALLOWED_GLOBALS = _allowed_globals()


# ---------------------------------------------------------------------------------------------
# The unpickler.

def _scan_pickle(stream: io.BytesIO) -> None:
    """Walks one pickle without building anything: a declared length the data does not hold,
    or a missing STOP, fails here, before the C unpickler would allocate that length."""
    start = stream.tell()
    for _ in pickletools.genops(stream):
        pass
    stream.seek(start)


class _Unpickler(pickle.Unpickler):
    """Unpickles containers of tensors: `_ALLOWED_GLOBALS` only, storages as `_Storage`
    records (when `byteorder` is given; other pickles may name none), collected in `storages`.
    """

    def __init__(self, stream: io.BytesIO, byteorder: str | None = None):
        _scan_pickle(stream)
        super().__init__(stream)
        self.byteorder = byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles name Python 2 modules (`__builtin__`): use Python 3's names.
        module, name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f'refusing to load {module:.80}.{name:.80}: this file asks to import more than '
            'tensors (a checkpoint should hold only a state dict; it may be malicious). Allowed: '
            + ', '.join(sorted(f'{m}.{n}' for (m, n), value in _ALLOWED_GLOBALS.items()
                               if isinstance(value, _Function))))

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel[, view metadata: None since torch 1.0])
        if not (self.byteorder and isinstance(pid, tuple) and len(pid) in (5, 6)
                and pid[0] == 'storage' and isinstance(pid[1], _TorchType)
                and (len(pid) == 5 or pid[5] is None)):
            raise PretrainedError(f'unsupported persistent id (a {type(pid).__name__}); expected '
                                  "('storage', torch.<Type>Storage, key, location, numel)")
        key = pid[2]
        if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key)):
            raise PretrainedError(f'storage key {key!r:.80} is not a plain name')
        storage = _Storage(key=key, dtype=pid[1].dtype, numel=_count(pid[4], 'storage size'),
                           byteorder=self.byteorder)
        known = self.storages.setdefault(key, storage)
        if (known.dtype, known.numel) != (storage.dtype, storage.numel):
            raise PretrainedError(f'storage {key} is declared twice, with different types/sizes')
        return known


# ---------------------------------------------------------------------------------------------
# The two torch.save layouts.

def _read_torch_zip(path: str) -> dict[str, np.ndarray]:
    """torch.save's zip format: <name>/data.pkl, <name>/byteorder, <name>/data/<key>."""
    file_size = os.path.getsize(path)
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.count('/') <= 1 and n.rsplit('/', 1)[-1] == 'data.pkl']
        if len(pickles) != 1:
            raise PretrainedError(f'{path}: not a torch.save zip (found {len(pickles)} data.pkl)')
        prefix = pickles[0][: -len('data.pkl')]
        read_so_far = 0

        def read_member(name: str, size: int | None, limit: int) -> bytes:
            nonlocal read_so_far
            info = infos.get(name)
            if info is None:
                raise PretrainedError(f'{path}: has no member {name!r:.100}')
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise PretrainedError(f'{path}: {name} uses zip compression {info.compress_type}'
                                      '; torch.save stores members uncompressed')
            if (size is not None and info.file_size != size) or info.file_size > limit:
                raise PretrainedError(f'{path}: {name} holds {info.file_size} bytes; expected '
                                      f'{size if size is not None else f"at most {limit}"}')
            read_so_far += info.compress_size
            if read_so_far > file_size:  # members that share data (a zip bomb) add up past it
                raise PretrainedError(f'{path}: its members add up to more than the file')
            with archive.open(info) as member:
                data = member.read(info.file_size + 1)  # never more than declared
            if len(data) != info.file_size:
                raise PretrainedError(f'{path}: {name} holds {len(data)} bytes, not the '
                                      f'{info.file_size} it declares')
            return data

        byteorder = 'little'
        if prefix + 'byteorder' in infos:
            byteorder = read_member(prefix + 'byteorder', None, 16).decode('ascii').strip()
            if byteorder not in ('little', 'big'):
                raise PretrainedError(f'{path}: byte order {byteorder!r:.20}')
        unpickler = _Unpickler(io.BytesIO(read_member(pickles[0], None, _MAX_PICKLE_BYTES)),
                               byteorder)
        return _state_dict(path, unpickler.load(), lambda storage: read_member(
            f'{prefix}data/{storage.key}', storage.nbytes, storage.nbytes))


def _read_torch_legacy(path: str) -> dict[str, np.ndarray]:
    """torch.save's pre-1.6 format: pickles of the magic number, protocol version, system info,
    the object and its storage keys, then each storage as int64 numel + little-endian bytes."""
    with open(path, 'rb') as f:
        raw = f.read()
    stream = io.BytesIO(raw[:_MAX_PICKLE_BYTES])  # the pickles come first
    magic, protocol = _Unpickler(stream).load(), _Unpickler(stream).load()
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise PretrainedError(f'{path}: neither a safetensors nor a torch.save file')
    _Unpickler(stream).load()  # system info
    unpickler = _Unpickler(stream, 'little')
    obj = unpickler.load()
    keys = _Unpickler(stream).load()
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise PretrainedError(f'{path}: malformed list of storage keys')
    storages, position = {}, stream.tell()
    for key in keys:
        storage = unpickler.storages.get(key)
        if storage is None or key in storages:
            raise PretrainedError(f'{path}: storage key {key!r:.80} is not (once) in the pickle')
        numel = struct.unpack('<q', raw[position:position + 8])[0] if (
            position + 8 <= len(raw)) else None
        end = position + 8 + storage.nbytes
        if numel != storage.numel or end > len(raw):
            raise PretrainedError(f'{path}: storage {key} is truncated or inconsistent with '
                                  'the pickle')
        storages[key] = memoryview(raw)[position + 8:end]
        position = end

    def read_storage(storage: _Storage) -> memoryview:
        if storage.key not in storages:
            raise PretrainedError(f'{path}: {storage!r} has no data')
        return storages[storage.key]

    return _state_dict(path, obj, read_storage)


def _to_numpy(tensor: _Tensor, data: bytes | memoryview) -> np.ndarray:
    """The tensor as a compact numpy array in native byte order; `data` holds its storage's
    bytes, exactly (so `_tensor`'s bounds check holds)."""
    if 0 in tensor.size:
        return np.zeros(tensor.size, tensor.dtype)
    itemsize = tensor.dtype.itemsize
    order = '<' if tensor.storage.byteorder == 'little' else '>'
    elements = np.frombuffer(data, tensor.dtype.newbyteorder(order),
                             count=_span(tensor.size, tensor.stride),
                             offset=tensor.offset * itemsize)
    view = np.lib.stride_tricks.as_strided(
        elements, tensor.size, tuple(s * itemsize for s in tensor.stride), writeable=False)
    return np.array(view, tensor.dtype, order='C')  # compact, owns its memory


def _state_dict(path: str, obj: Any, read_storage: Callable[[_Storage], Any]) -> dict:
    """The unpickled object's state dict, with its storages read and bounds checked."""
    for wrapper in ('state_dict', 'model'):  # mmcv's {'state_dict': ...}, {'model': ...}
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise PretrainedError(f'{path}: holds a {type(obj).__name__}, not a state dict')
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise PretrainedError(f'{path}: entry {name!r:.80} is a {type(value).__name__}, '
                                  'not a tensor')
    storages = {tensor.storage.key: tensor.storage for tensor in obj.values()}
    data = {key: read_storage(storage) for key, storage in storages.items()}
    stored = sum(storage.nbytes for storage in storages.values())
    wanted = sum(tensor.nbytes for tensor in obj.values())
    if wanted > _EXPANSION * stored + _SLACK_BYTES:
        raise PretrainedError(f'{path}: its tensors would take {wanted} bytes from {stored} '
                              'bytes of storage (views repeated or expanded with stride 0)')
    return {name.removeprefix('module.'): _to_numpy(tensor, data[tensor.storage.key])
            for name, tensor in obj.items()}


# ---------------------------------------------------------------------------------------------
# The entry point.

def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat {name: numpy array} state dict in a `.safetensors` or `.pth`/`.pt`/`.bin` file.

    A checkpoint that wraps its state dict (`{'state_dict': ...}` as mmcv saves, or
    `{'model': ...}`) is unwrapped; a DataParallel `module.` prefix is dropped. Raises
    `PretrainedError` for any file it cannot read safely (see the module docstring).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no weights file at {path!r}')
    try:
        if path.endswith('.safetensors'):
            return read_safetensors(path)
        with open(path, 'rb') as f:
            zip_format = f.read(2) == b'PK'
        return _read_torch_zip(path) if zip_format else _read_torch_legacy(path)
    except (PretrainedError, MemoryError):  # MemoryError: a real tensor too big for this machine
        raise
    except Exception as e:  # a malformed file: pickle, zipfile, struct, json, numpy, ... errors
        raise PretrainedError(f'{path}: not a readable weights file '
                              f'({type(e).__name__}: {str(e):.200})') from e
