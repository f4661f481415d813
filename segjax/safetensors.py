"""`.safetensors` files read without the safetensors package and without trusting the file.

The format (https://huggingface.co/docs/safetensors): an unsigned little-endian 64-bit header
length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`, then the data, offsets relative to its start. What a crafted file
can get from `read_safetensors`:
  * Memory: the header is read only when its declared length is at most `MAX_HEADER_BYTES` and
    fits in the file; every entry is checked (dtype known, shape of non-negative ints whose
    bytes are exactly end - begin, offsets inside the file's data, entries neither overlapping
    nor leaving holes, as the format requires) before any tensor is read, so at most the
    file's own size is allocated.
  * Errors: `PretrainedError` naming the file and the entry, never a json/struct/numpy error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np


class PretrainedError(ValueError):
    """A weights file that does not fit the model (or cannot be read); here, not in segjax.pth,
    because this is the lowest of the weights readers (segjax.pth imports this module)."""


MAX_HEADER_BYTES = 100 << 20  # the safetensors package's own limit
_MAX_DIMS = 32
DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise PretrainedError(f'names appear twice in the header: {duplicates[:5]}')
    return dict(pairs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: str, name: str, info: Any, data_size: int) -> tuple[np.dtype, tuple, int, int]:
    """(dtype, shape, begin, end) of one header entry, checked against the data's size."""
    where = f'{path}: tensor {name!r:.100}'
    if not isinstance(info, dict) or set(info) != {'dtype', 'shape', 'data_offsets'}:
        raise PretrainedError(f'{where}: expected {{"dtype", "shape", "data_offsets"}}, got '
                              f'{info!r:.100}')
    if info['dtype'] not in DTYPES:
        raise PretrainedError(f'{where}: dtype {info["dtype"]!r:.20} is not one of '
                              f'{sorted(DTYPES)}')
    shape, offsets = info['shape'], info['data_offsets']
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
            and all(_is_count(n) for n in shape)):
        raise PretrainedError(f'{where}: malformed tensor shape {shape!r:.100}: expected at most '
                              f'{_MAX_DIMS} non-negative integers')
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise PretrainedError(f'{where}: malformed data_offsets {offsets!r:.100}: expected '
                              '[begin, end]')
    dtype = np.dtype(DTYPES[info['dtype']])
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if not begin <= end <= data_size or end - begin != nbytes:
        raise PretrainedError(
            f'{where}: inconsistent offsets {begin}..{end}: a {info["dtype"]} tensor of shape '
            f'{shape} holds {nbytes} bytes, and the data section holds {data_size}')
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: numpy array (native byte order)} of a `.safetensors` file; see the module
    docstring for what is checked. Raises FileNotFoundError or PretrainedError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no weights file at {path!r}')
    file_size = os.path.getsize(path)
    with open(path, 'rb') as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise PretrainedError(f'{path}: {file_size} bytes: too short for a safetensors file')
        header_size = struct.unpack('<Q', prefix)[0]
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise PretrainedError(f'{path}: safetensors header of {header_size} bytes does not '
                                  f'fit (file of {file_size} bytes, limit {MAX_HEADER_BYTES})')
        try:
            header = json.loads(f.read(header_size), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise PretrainedError(f'{path}: the safetensors header is not JSON ({e})') from e
        except PretrainedError as e:
            raise PretrainedError(f'{path}: {e}') from None
        if not isinstance(header, dict):
            raise PretrainedError(f'{path}: the safetensors header is a '
                                  f'{type(header).__name__}, not a JSON object')
        metadata = header.pop('__metadata__', {})
        if not (isinstance(metadata, dict)
                and all(isinstance(v, str) for v in metadata.values())):
            raise PretrainedError(f'{path}: __metadata__ must map strings to strings')
        data_start = 8 + header_size
        data_size = file_size - data_start
        entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
        # The data must be covered exactly once: no overlaps (aliasing), no holes (polyglots).
        position = 0
        for name, (_, _, begin, end) in sorted(entries.items(), key=lambda e: e[1][2:]):
            if begin != position:
                what = 'overlaps the tensor before it' if begin < position else 'leaves a hole'
                raise PretrainedError(f'{path}: tensor {name!r:.100} at {begin}..{end} {what} '
                                      f'(the previous one ends at {position})')
            position = end
        if position != data_size:
            raise PretrainedError(f'{path}: the tensors cover {position} of the {data_size} '
                                  'data bytes')
        tensors = {}
        for name, (dtype, shape, begin, end) in entries.items():
            f.seek(data_start + begin)
            raw = f.read(end - begin)
            if len(raw) != end - begin:  # the file shrank while being read
                raise PretrainedError(f'{path}: tensor {name!r:.100} is truncated')
            tensors[name] = np.frombuffer(raw, dtype.newbyteorder('<')).reshape(shape).astype(
                dtype)
    return tensors
