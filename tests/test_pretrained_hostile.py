"""segjax.pth against hostile files: every crafted or corrupted `.pth` is refused with
`PretrainedError` (or `UnsafePickleError`), within a memory limit, and changes nothing for the
files loaded after it.

Pickles are written by hand, opcode by opcode (no torch needed); torch, where installed, writes
the reference files of each pickle protocol. The hostile files are read in a subprocess whose
address space is capped at `_LIMIT_BYTES` above its baseline, so a reader that allocates what
a file declares, rather than what it holds, fails here with MemoryError.
"""

import io
import json
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

from segjax import pth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIMIT_BYTES = 256 << 20
_BOMB_BYTES = 384 << 20  # more than the limit: a reader that inflates it fails
_REFUSED = ('PretrainedError', 'UnsafePickleError')


# ------------------------------------------------------------------------- writing pickles

class _Pickle:
    """Pickle opcodes by hand, in the style of one protocol (0-5): text opcodes for 0, binary
    ones for 1+, PROTO for 2+, STACK_GLOBAL, SHORT_BINUNICODE and FRAME for 4+."""

    def __init__(self, protocol: int = 2):
        self.protocol = protocol

    def int(self, n: int) -> bytes:
        if self.protocol == 0:
            return b'I%d\n' % n
        if 0 <= n < 256:
            return b'K' + bytes([n])
        if -2**31 <= n < 2**31:
            return b'J' + struct.pack('<i', n)
        return b'L%dL\n' % n if self.protocol == 1 else (
            b'\x8a\x08' + n.to_bytes(8, 'little', signed=True))

    def str(self, s: str) -> bytes:
        data = s.encode()
        if self.protocol == 0:
            return b'V' + data + b'\n'
        if self.protocol >= 4 and len(data) < 256:
            return b'\x8c' + bytes([len(data)]) + data
        return b'X' + struct.pack('<I', len(data)) + data

    def global_(self, module: str, name: str) -> bytes:
        if self.protocol >= 4:
            return self.str(module) + self.str(name) + b'\x93'
        return b'c' + module.encode() + b'\n' + name.encode() + b'\n'

    def tuple(self, *items: bytes) -> bytes:
        return b'(' + b''.join(items) + b't'

    def call(self, function: bytes, *args: bytes) -> bytes:
        return function + self.tuple(*args) + b'R'

    def false(self) -> bytes:
        return b'I00\n' if self.protocol < 2 else b'\x89'

    def storage(self, key: str, numel: int, storage_type: str = 'FloatStorage') -> bytes:
        return self.tuple(self.str('storage'), self.global_('torch', storage_type),
                          self.str(key), self.str('cpu'), self.int(numel)) + b'Q'

    def tensor(self, storage: bytes, offset: int, size, stride) -> bytes:
        return self.call(self.global_('torch._utils', '_rebuild_tensor_v2'), storage,
                         self.int(offset), self.tuple(*map(self.int, size)),
                         self.tuple(*map(self.int, stride)), self.false(),
                         self.call(self.global_('collections', 'OrderedDict')))

    def dict(self, items: dict) -> bytes:
        if self.protocol == 0:  # DICT, then SETITEM for each item
            return b'(d' + b''.join(self.str(k) + v + b's' for k, v in items.items())
        return b'}(' + b''.join(self.str(k) + v for k, v in items.items()) + b'u'

    def dumps(self, body: bytes) -> bytes:
        if self.protocol >= 4:  # one frame around the whole body
            body = b'\x95' + struct.pack('<Q', len(body) + 1) + body
        return (b'\x80' + bytes([self.protocol]) if self.protocol >= 2 else b'') + body + b'.'


def _zip(data_pkl: bytes, storages: dict, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', compression) as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', 'little')
        for key, data in storages.items():
            archive.writestr(f'archive/data/{key}', data)
    return buffer.getvalue()


def _legacy(main_pkl: bytes, storages: list, keys=None) -> bytes:
    """torch.save's legacy layout; storages: [(key, declared numel, bytes)]."""
    head = b''.join(pickle.dumps(x, protocol=2) for x in (
        0x1950a86a20f9469cfc6c, 1001, {'protocol_version': 1001, 'little_endian': True}))
    keys = [key for key, _, _ in storages] if keys is None else keys
    return head + main_pkl + pickle.dumps(keys, protocol=2) + b''.join(
        struct.pack('<q', numel) + data for _, numel, data in storages)


def _patch_central_directory(raw: bytes, name: str, **fields: int) -> bytes:
    """A zip whose central directory entry for `name` says other things (crc, compressed,
    size) than its data: what a crafted zip does."""
    offsets = {'crc': 16, 'compressed': 20, 'size': 24}
    start = raw.index(b'PK\x01\x02')
    while True:
        name_length = struct.unpack_from('<H', raw, start + 28)[0]
        if raw[start + 46:start + 46 + name_length] == name.encode():
            break
        start = raw.index(b'PK\x01\x02', start + 4)
    raw = bytearray(raw)
    for field, value in fields.items():
        struct.pack_into('<I', raw, start + offsets[field], value)
    return bytes(raw)


_P = _Pickle(2)
_FLOATS = np.arange(4, dtype='<f4').tobytes()


def _one_tensor(offset=0, size=(4,), stride=(1,), numel=4, storage=None) -> bytes:
    storage = _P.storage('0', numel) if storage is None else storage
    return _P.dumps(_P.dict({'w': _P.tensor(storage, offset, size, stride)}))


def _zip_bomb(declared_numel: int, patch: dict) -> bytes:
    """A deflated storage member of _BOMB_BYTES zeros (~0.4 MB compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr('archive/data.pkl', _one_tensor(numel=declared_numel,
                                                         size=(declared_numel,)))
        with archive.open('archive/data/0', 'w') as member:
            for _ in range(_BOMB_BYTES >> 20):
                member.write(bytes(1 << 20))
    return _patch_central_directory(buffer.getvalue(), 'archive/data/0', **patch)


def _build_on(target: bytes, state: bytes) -> bytes:
    """A pickle that applies BUILD (setstate) with `state` to `target`, then holds a tensor."""
    return _P.dumps(target + state + b'b0' + _P.dict(
        {'w': _P.tensor(_P.storage('0', 4), 0, (4,), (1,))}))


# Each hostile file: (name, bytes, suffix, pattern its error must match).
def _hostile_files():
    p, t = _P, _P.tensor
    tensor_of = _P.call(_P.global_('torch._utils', '_rebuild_tensor_v2'), p.storage('0', 4),
                        p.int(0), p.tuple(p.int(4)), p.tuple(p.int(1)))
    # A stride-0 view of 4 floats, 2**20 long: as a storage, it would let a tensor walk 4 MiB
    # past the 16 bytes that exist.
    stride0_view = _P.call(_P.global_('torch._utils', '_rebuild_tensor_v2'), p.storage('0', 4),
                           p.int(0), p.tuple(p.int(1 << 20)), p.tuple(p.int(0)))
    slots = b'(N}' + p.str('__defaults__') + p.tuple(p.int(1)) + b'st'  # (None, {...})
    files = [
        # A tensor (view) as another tensor's storage, in both layouts.
        ('view_as_storage_zip', _zip(_one_tensor(size=(1 << 20,), storage=stride0_view),
                                     {'0': _FLOATS}), '.pth', 'names a _Tensor as its storage'),
        ('view_as_storage_legacy', _legacy(_one_tensor(size=(1 << 20,), storage=stride0_view),
                                           [('0', 4, _FLOATS)]), '.pth', 'as its storage'),
        ('int_as_storage', _zip(_one_tensor(storage=p.int(7)), {}), '.pth', 'names a int'),
        # Strides and offsets.
        ('negative_stride', _zip(_one_tensor(size=(2,), stride=(-1,)), {'0': _FLOATS}), '.pth',
         'malformed tensor stride'),
        ('negative_offset', _zip(_one_tensor(offset=-2, size=(2,)), {'0': _FLOATS}), '.pth',
         'malformed tensor offset'),
        ('huge_stride', _zip(_one_tensor(size=(2,), stride=(2**62,)), {'0': _FLOATS}), '.pth',
         'malformed tensor stride'),
        ('stride_past_end', _zip(_one_tensor(size=(2, 2), stride=(3, 1)), {'0': _FLOATS}),
         '.pth', 'reads past its storage'),
        ('offset_past_end', _zip(_one_tensor(offset=3, size=(2,)), {'0': _FLOATS}), '.pth',
         'reads past its storage'),
        ('huge_offset', _zip(_one_tensor(offset=2**47, size=(1,)), {'0': _FLOATS}), '.pth',
         'reads past its storage'),
        ('int64_overflow_offset', _zip(_one_tensor(offset=2**63 - 1), {'0': _FLOATS}), '.pth',
         'malformed tensor offset'),
        ('stride_zero_huge', _zip(_one_tensor(size=(2**40,), stride=(0,)), {'0': _FLOATS}),
         '.pth', 'would take 4398046511104 bytes from 16 bytes'),
        ('stride_zero_over_limit', _legacy(_one_tensor(size=(2**17, 2**10), stride=(0, 0)),
                                           [('0', 4, _FLOATS)]), '.pth', 'would take'),
        ('one_storage_many_names', _zip(p.dumps(p.dict(
            {f'w{i}': t(p.storage('0', 1 << 16), 0, (1 << 16,), (1,)) for i in range(64)})),
            {'0': bytes(1 << 18)}), '.pth', 'would take 16777216 bytes from 262144'),
        ('size_stride_lengths', _zip(_one_tensor(size=(2, 2), stride=(1,)), {'0': _FLOATS}),
         '.pth', 'differ in length'),
        ('too_many_dims', _zip(_one_tensor(size=(1,) * 40, stride=(1,) * 40), {'0': _FLOATS}),
         '.pth', 'malformed tensor size'),
        ('empty_but_enormous', _zip(_one_tensor(size=(0, 2**47, 2**47), stride=(1, 1, 1)),
                                    {'0': _FLOATS}), '.pth', 'is too large'),
        # Declared sizes larger than the data.
        ('zip_declares_more', _zip(_one_tensor(numel=10**12, size=(4,)), {'0': _FLOATS}),
         '.pth', 'holds 16 bytes; expected 4000000000000'),
        ('legacy_declares_more', _legacy(_one_tensor(numel=2**40, size=(4,)),
                                         [('0', 2**40, _FLOATS)]), '.pth', 'truncated'),
        ('legacy_numel_differs', _legacy(_one_tensor(), [('0', 3, _FLOATS)]), '.pth',
         'inconsistent with the pickle'),
        ('legacy_truncated', _legacy(_one_tensor(), [('0', 4, _FLOATS)])[:-3], '.pth',
         'truncated'),
        ('legacy_no_data', _legacy(_one_tensor(), [], keys=[]), '.pth', 'has no data'),
        ('legacy_unknown_key', _legacy(_one_tensor(), [('0', 4, _FLOATS), ('9', 4, _FLOATS)]),
         '.pth', "'9' is not"),
        ('pickle_bytes8_huge', b'\x80\x04\x8e' + struct.pack('<Q', 1 << 40) + b'abc.', '.pth',
         'not a readable weights file'),
        ('pickle_bytearray8_huge', _zip(b'\x80\x05\x96' + struct.pack('<Q', 1 << 40) + b'.',
                                        {}), '.pth', 'not a readable weights file'),
        ('pickle_frame_huge', _zip(b'\x80\x04\x95' + struct.pack('<Q', 1 << 40) + b'}.', {}),
         '.pth', 'not a readable weights file'),
        ('safetensors_header_huge', struct.pack('<Q', 1 << 40) + b'{}', '.safetensors',
         'does not fit'),
        ('safetensors_negative_shape', _safetensors({'w': {
            'dtype': 'F32', 'shape': [-1, 4], 'data_offsets': [0, 16]}}), '.safetensors',
         'malformed tensor shape'),
        ('safetensors_past_end', _safetensors({'w': {
            'dtype': 'F32', 'shape': [8], 'data_offsets': [0, 32]}}), '.safetensors',
         'inconsistent offsets'),
        # What pth's own safetensors reader let through before it used segjax.safetensors.
        *[(f'safetensors_{name}', raw, '.safetensors', pattern)
          for name, raw, pattern in _SAFETENSORS_ONLY_THE_STRONG_READER_REFUSES],
        # Compressed members that expand past their declared size.
        ('deflate_bomb_honest_header', _zip_bomb(4, {}), '.pth',
         'holds 402653184 bytes; expected 16'),
        ('deflate_bomb_header_lies', _zip_bomb(4, {'size': 16}), '.pth',
         'Bad CRC-32|not a readable'),
        ('stored_member_claims_more_than_file', _patch_central_directory(
            _zip(_one_tensor(), {'0': _FLOATS}), 'archive/data/0', compressed=10**9), '.pth',
         'add up to more than the file'),
        ('bzip2_member', _zip(_one_tensor(), {'0': _FLOATS}, zipfile.ZIP_BZIP2), '.pth',
         'uses zip compression 12'),
        # BUILD / SETSTATE on what a file can reach.
        ('build_on_storage_type', _zip(_build_on(p.global_('torch', 'FloatStorage'), p.dict(
            {'dtype': p.global_('torch', 'DoubleStorage')})), {'0': _FLOATS}), '.pth',
         'refusing to modify torch.FloatStorage'),
        ('build_slots_on_function', _zip(_build_on(
            p.global_('torch._utils', '_rebuild_tensor_v2'), slots), {'0': _FLOATS}), '.pth',
         'refusing to modify torch._utils._rebuild_tensor_v2'),
        ('build_on_ordered_dict_class', _zip(_build_on(
            p.global_('collections', 'OrderedDict'), slots), {'0': _FLOATS}), '.pth',
         'refusing to modify collections.OrderedDict'),
        ('build_on_storage', _zip(_build_on(p.storage('0', 4), p.dict({'numel': p.int(10**9)})),
                                  {'0': _FLOATS}), '.pth', 'refusing to modify storage 0'),
        ('build_on_tensor', _zip(_build_on(tensor_of, slots), {'0': _FLOATS}), '.pth',
         'refusing to modify tensor'),
        ('newobj_storage_type', _zip(p.dumps(p.global_('torch', 'FloatStorage') + b')\x81'),
                                     {}), '.pth', 'not a readable'),
        # Code: globals in every spelling.
        ('stack_global_os_system', _zip(b'\x80\x04' + _Pickle(4).str('os') + _Pickle(4).str(
            'system') + b'\x93' + _Pickle(4).str('true') + b'\x85R.', {}), '.pth',
         'refusing to load os.system'),
        ('inst_os_system', _zip(b'(S"true"\nios\nsystem\n.', {}), '.pth',
         'refusing to load os.system'),
        ('ext_code', _zip(b'\x80\x02\x82\x01.', {}), '.pth', 'not a readable'),
        ('out_of_band_buffer', _zip(b'\x80\x05\x97.', {}), '.pth', 'not a readable'),
        # Storage keys naming missing or `../` members, and other layouts.
        ('key_parent_dir', _zip(p.dumps(p.dict({'w': t(p.storage('../../data.pkl', 4), 0, (4,),
                                                       (1,))})), {}), '.pth', 'not a plain name'),
        ('key_empty', _zip(p.dumps(p.dict({'w': t(p.storage('', 4), 0, (4,), (1,))})), {}),
         '.pth', 'not a plain name'),
        ('key_not_a_string', _zip(p.dumps(p.dict({'w': t(
            p.tuple(p.str('storage'), p.global_('torch', 'FloatStorage'), p.int(0),
                    p.str('cpu'), p.int(4)) + b'Q', 0, (4,), (1,))})), {}), '.pth',
         'not a plain name'),
        ('key_missing_member', _zip(_one_tensor(), {'1': _FLOATS}), '.pth',
         "has no member 'archive/data/0'"),
        ('storage_redeclared', _zip(p.dumps(p.dict({
            'a': t(p.storage('0', 4), 0, (4,), (1,)),
            'b': t(p.storage('0', 2, 'DoubleStorage'), 0, (2,), (1,))})), {'0': _FLOATS}),
         '.pth', 'declared twice'),
        ('persistent_id_string', _zip(b'P0\n.', {}), '.pth', 'unsupported persistent id'),
        ('persistent_id_view', _zip(p.dumps(p.dict({'w': t(
            p.tuple(p.str('storage'), p.global_('torch', 'FloatStorage'), p.str('0'),
                    p.str('cpu'), p.int(4), p.tuple(p.str('1'), p.int(0), p.int(4))) + b'Q',
            0, (4,), (1,))})), {'0': _FLOATS}), '.pth', 'unsupported persistent id'),
        ('no_data_pkl', _zip_without_pickle(), '.pth', 'found 0 data.pkl'),
        ('byteorder_bogus', _patch_member(_zip(_one_tensor(), {'0': _FLOATS}), b'little',
                                          b'middle'), '.pth', "byte order 'middle'"),
        ('not_a_state_dict', _zip(p.dumps(p.int(3)), {}), '.pth', 'holds a int'),
        ('entry_not_a_tensor', _zip(p.dumps(p.dict({'w': p.int(3)})), {}), '.pth',
         "entry 'w' is a int"),
        ('no_stop', _zip(_one_tensor()[:-1], {'0': _FLOATS}), '.pth', 'not a readable'),
        ('legacy_bad_magic', pickle.dumps(12345, protocol=2) * 3, '.pth',
         'neither a safetensors nor a torch.save'),
        ('empty_file', b'', '.pth', 'not a readable'),
        ('random_bytes', random.Random(0).randbytes(4096), '.pth', 'not a readable'),
    ]
    files += [(f'runs_code_protocol_{protocol}', _zip(pickle.dumps(_RunsCode(), protocol), {}),
               '.pth', r'refusing to load (os|posix)\.system') for protocol in range(6)]
    return files


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('true',))


def _safetensors(header, data: bytes = _FLOATS, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + data


def _st_entry(shape=(4,), offsets=(0, 16)) -> dict:
    return {'dtype': 'F32', 'shape': list(shape), 'data_offsets': list(offsets)}


# (name, bytes, pattern): files a reader that checks each entry alone accepts, and the bounded
# reader refuses (aliased or overlapping data, holes, repeated names, bools as sizes).
_SAFETENSORS_ONLY_THE_STRONG_READER_REFUSES = [
    ('overlapping', _safetensors({'a': _st_entry((3,), (0, 12)), 'b': _st_entry((3,), (4, 16))}),
     "'b' at 4..16 overlaps the tensor before it"),
    ('aliasing', _safetensors({'a': _st_entry(), 'b': _st_entry()}), 'overlaps'),
    ('hole', _safetensors({'a': _st_entry((2,), (0, 8)), 'b': _st_entry((1,), (12, 16))}),
     'leaves a hole'),
    ('trailing_data', _safetensors({'w': _st_entry((2,), (0, 8))}), 'cover 8 of the 16'),
    ('duplicate_name', _safetensors(None, raw_header=(
        b'{"w": ' + json.dumps(_st_entry()).encode() + b', "w": '
        + json.dumps(_st_entry()).encode() + b'}')), 'appear twice'),
    ('bool_shape', _safetensors({'w': _st_entry(shape=(True, 4))}), 'malformed tensor shape'),
    ('extra_field', _safetensors({'w': {**_st_entry(), 'x': 1}}), "tensor 'w': expected"),
    ('metadata_not_strings', _safetensors({'__metadata__': {'a': 1}, 'w': _st_entry()}),
     '__metadata__ must map strings to strings'),
    ('header_past_file', struct.pack('<Q', 100) + b'{}', 'does not fit'),
]


def _zip_without_pickle() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as archive:
        archive.writestr('archive/data/0', _FLOATS)
    return buffer.getvalue()


def _patch_member(raw: bytes, old: bytes, new: bytes) -> bytes:
    """Same-length bytes replaced inside a stored member, with its CRCs made to match."""
    start = raw.index(old)
    patched = raw[:start] + new + raw[start + len(old):]
    crc = struct.pack('<I', zlib.crc32(new))
    return patched.replace(struct.pack('<I', zlib.crc32(old)), crc)


# ------------------------------------------------------------------- reading under a limit

_RUNNER = r'''
import json, resource, sys
import ml_dtypes, numpy
from segjax import pth

def address_space():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize'))

hard = resource.getrlimit(resource.RLIMIT_AS)[1]
soft = address_space() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (soft if hard < 0 else min(soft, hard), hard))
results = {}
for path in json.load(open(sys.argv[1])):
    try:
        state = pth.read_state_dict(path)
        results[path] = ['ok', {k: [list(v.shape), str(v.dtype), v.tolist() if v.size < 64
                                    else None] for k, v in state.items()}]
    except pth.PretrainedError as e:
        results[path] = [type(e).__name__, str(e)]
    except BaseException as e:  # MemoryError among them: a bound that did not hold
        results[path] = [type(e).__name__, repr(e)]
json.dump(results, sys.stdout)
'''


def _read_under_limit(directory, files: dict) -> dict:
    """{name: [outcome, detail]} of reading each file in a memory-limited subprocess."""
    paths = {}
    for name, (data, suffix) in files.items():
        paths[name] = str(directory / f'{name}{suffix}')
        with open(paths[name], 'wb') as f:
            f.write(data)
    (directory / 'paths.json').write_text(json.dumps(list(paths.values())))
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OPENBLAS_NUM_THREADS': '1', 'OMP_NUM_THREADS': '1'}
    out = subprocess.run([sys.executable, '-c', _RUNNER, str(directory / 'paths.json'),
                          str(_LIMIT_BYTES)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    return {name: results[path] for name, path in paths.items()}


_CASES = _hostile_files()


@pytest.fixture(scope='module')
def hostile_results(tmp_path_factory):
    files = {name: (data, suffix) for name, data, suffix, _ in _CASES}
    return _read_under_limit(tmp_path_factory.mktemp('hostile'), files)


@pytest.mark.parametrize('name, pattern', [(name, pattern) for name, _, _, pattern in _CASES])
def test_hostile_file_is_refused_within_the_memory_limit(hostile_results, name, pattern):
    import re

    outcome, detail = hostile_results[name]
    assert outcome in _REFUSED, (outcome, detail)
    assert re.search(pattern, detail), detail


def test_code_and_build_are_refused_as_unsafe(hostile_results):
    unsafe = {name for name, (outcome, _) in hostile_results.items()
              if outcome == 'UnsafePickleError'}
    assert {f'runs_code_protocol_{p}' for p in range(6)} <= unsafe
    assert {'stack_global_os_system', 'inst_os_system', 'build_on_storage_type',
            'build_slots_on_function', 'build_on_ordered_dict_class', 'build_on_storage',
            'build_on_tensor'} <= unsafe


def test_build_on_allowed_globals_changes_nothing_for_later_files(tmp_path):
    """The same process reads a BUILD-on-globals file, then a good one: the globals and the
    good file's values are as before."""
    p = _P
    slots = b'(N}' + p.str('__defaults__') + p.tuple(p.int(1)) + b'st'
    for target, state in [(p.global_('torch', 'FloatStorage'),
                           p.dict({'dtype': p.global_('torch', 'DoubleStorage')})),
                          (p.global_('torch', 'FloatStorage'), b'(N}' + p.str('dtype') +
                           p.global_('torch', 'DoubleStorage') + b'st'),
                          (p.global_('torch._utils', '_rebuild_tensor_v2'), slots)]:
        (tmp_path / 'evil.pth').write_bytes(_zip(_build_on(target, state), {'0': _FLOATS}))
        with pytest.raises(pth.UnsafePickleError, match='refusing to modify'):
            pth.read_state_dict(tmp_path / 'evil.pth')
    assert pth._ALLOWED_GLOBALS[('torch', 'FloatStorage')].dtype == np.float32
    assert pth._rebuild_tensor_v2.__defaults__ is None
    (tmp_path / 'good.pth').write_bytes(_zip(_one_tensor(), {'0': _FLOATS}))
    good = pth.read_state_dict(tmp_path / 'good.pth')
    np.testing.assert_array_equal(good['w'], np.arange(4, dtype=np.float32))
    assert good['w'].dtype == np.float32


@pytest.mark.parametrize('name, raw, pattern', _SAFETENSORS_ONLY_THE_STRONG_READER_REFUSES,
                         ids=[case[0] for case in _SAFETENSORS_ONLY_THE_STRONG_READER_REFUSES])
def test_pth_entry_point_refuses_safetensors_as_the_bounded_reader_does(tmp_path, name, raw,
                                                                         pattern):
    """`pth.read_state_dict` reads `.safetensors` through `segjax.safetensors`: the same
    refusal, with the same message naming the file, from either entry point."""
    from segjax.safetensors import read_safetensors

    path = tmp_path / f'{name}.safetensors'
    path.write_bytes(raw)
    with pytest.raises(pth.PretrainedError, match=pattern) as through_pth:
        pth.read_state_dict(path)
    with pytest.raises(pth.PretrainedError) as direct:
        read_safetensors(path)
    assert str(through_pth.value) == str(direct.value)
    assert str(path) in str(through_pth.value)


def test_pth_entry_point_reads_a_valid_safetensors_file(tmp_path):
    data = np.arange(6, dtype='<f4').tobytes() + np.array([7, -8], '<i8').tobytes()
    path = tmp_path / 'ok.safetensors'
    path.write_bytes(_safetensors({
        '__metadata__': {'format': 'pt'},
        'a': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]},
        'b': {'dtype': 'I64', 'shape': [2], 'data_offsets': [24, 40]}}, data))
    state = pth.read_state_dict(path)
    np.testing.assert_array_equal(state['a'], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(state['b'], np.array([7, -8], np.int64))
    assert state['a'].dtype == np.float32 and state['b'].dtype == np.int64


def test_a_lying_deflate_header_gives_only_the_declared_bytes(tmp_path):
    """A member whose header declares the 16 bytes the pickle wants (CRC of those) but whose
    stream inflates to 384 MiB: reading stops at 16 bytes."""
    raw = _zip_bomb(4, {'size': 16, 'crc': zlib.crc32(bytes(16))})
    results = _read_under_limit(tmp_path, {'lying_header': (raw, '.pth')})
    outcome, detail = results['lying_header']
    assert outcome == 'ok' and detail == {'w': [[4], 'float32', [0.0] * 4]}, (outcome, detail)


# --------------------------------------------------------------- legit files, all protocols

_VALUES = {'conv.weight': np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
           'bn.running_mean': np.array([1.5, -2.0, 3.25], np.float64),
           'steps': np.array(5, np.int64)}


def _legit(protocol: int, layout: str) -> bytes:
    """_VALUES in torch.save's layouts, written with one protocol's opcodes; `conv.weight` is
    stored transposed and read through strides (1, 2): a (2, 3) view of a (3, 2) buffer."""
    p = _Pickle(protocol)
    storages = {'0': _VALUES['conv.weight'].T.astype('<f4').tobytes(),
                '1': _VALUES['bn.running_mean'].astype('<f8').tobytes(),
                '2': _VALUES['steps'].astype('<i8').tobytes()}
    body = p.dict({
        'conv.weight': p.tensor(p.storage('0', 6), 0, (2, 3), (1, 2)),
        'bn.running_mean': p.tensor(p.storage('1', 3, 'DoubleStorage'), 0, (3,), (1,)),
        'steps': p.tensor(p.storage('2', 1, 'LongStorage'), 0, (), ())})
    wrapped = p.dumps(body)
    if layout == 'zip':
        return _zip(wrapped, storages)
    itemsizes = {'0': 4, '1': 8, '2': 8}
    return _legacy(wrapped, [(k, len(v) // itemsizes[k], v) for k, v in storages.items()])


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
@pytest.mark.parametrize('protocol', range(6))
def test_hand_written_files_of_every_protocol_load(tmp_path, protocol, layout):
    path = tmp_path / 'legit.pth'
    path.write_bytes(_legit(protocol, layout))
    state = pth.read_state_dict(path)
    assert sorted(state) == sorted(_VALUES)
    for name, value in _VALUES.items():
        np.testing.assert_array_equal(state[name], value)
        assert state[name].dtype == value.dtype and state[name].flags.c_contiguous


@pytest.mark.parametrize('zip_format', [True, False])
def test_torch_save_of_every_protocol(tmp_path, zip_format):
    """torch.save in protocols 1-5 loads with the values torch has; protocol 0 cannot hold a
    tensor (torch writes its persistent ids as text it cannot load itself) and is refused."""
    torch = pytest.importorskip('torch')
    state = {'a': torch.randn(3, 4), 'b': torch.randn(4, 3).t(), 'c': torch.arange(5)[1:4],
             'd': torch.ones(2, dtype=torch.float16), 'e': torch.zeros(1).expand(6)}
    for protocol in range(6):
        path = tmp_path / f'p{protocol}.pth'
        torch.save(state, path, pickle_protocol=protocol,
                   _use_new_zipfile_serialization=zip_format)
        if protocol == 0:
            with pytest.raises(pth.PretrainedError, match='unsupported persistent id'):
                pth.read_state_dict(path)
            continue
        loaded = pth.read_state_dict(path)
        assert sorted(loaded) == sorted(state)
        for name, value in state.items():
            np.testing.assert_array_equal(loaded[name], value.numpy())
            assert loaded[name].dtype == value.numpy().dtype


# ------------------------------------------------------------------------------- fuzzing

def _mutations(raw: bytes, count: int, seed: int):
    """Byte flips (1-4 bytes anywhere) and truncations of a valid file."""
    rng = random.Random(seed)
    for index in range(count):
        data = bytearray(raw)
        if index % 4 == 3:
            yield bytes(data[:rng.randrange(len(data))])
            continue
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        yield bytes(data)


def _fuzzed_files(kind: str, count: int = 400) -> dict:
    """Mutations of a valid file ('zip', 'legacy'), or of its pickle alone inside an intact zip
    ('zip pickle': the zip's CRCs would otherwise catch most of them)."""
    if kind == 'zip pickle':
        p = _Pickle(2)
        pkl = p.dumps(p.dict({'conv.weight': p.tensor(p.storage('0', 6), 0, (2, 3), (1, 2)),
                              'steps': p.tensor(p.storage('1', 1, 'LongStorage'), 0, (), ())}))
        storages = {'0': bytes(24), '1': bytes(8)}
        return {f'm{i}': (_zip(data, storages), '.pth')
                for i, data in enumerate(_mutations(pkl, count, seed=7))}
    raw = _legit(2, kind)
    return {f'm{i}': (data, '.pth') for i, data in enumerate(_mutations(raw, count, seed=13))}


@pytest.mark.parametrize('kind', ['zip', 'legacy', 'zip pickle'])
def test_fuzzed_files_load_or_are_refused(tmp_path, kind):
    results = _read_under_limit(tmp_path, _fuzzed_files(kind))
    outcomes = [outcome for outcome, _ in results.values()]
    assert set(outcomes) <= {'ok', *_REFUSED}, [r for r in results.values()
                                                  if r[0] not in ('ok', *_REFUSED)][:3]
    # Both happen: flips in tensor data (or unused bytes) load, flips in the structure do not.
    assert outcomes.count('ok') >= 3 and len(outcomes) - outcomes.count('ok') >= 250


_EXTREMES = (0, 1, 2, 3, 5, 8, 2**31 - 1, 2**32 + 1, 2**47, 2**48, 2**62, -1, -2**31)


def _random_tensor(rng: random.Random) -> dict:
    def pick() -> int:
        return rng.choice(_EXTREMES) if rng.random() < 0.25 else rng.randint(0, 6)

    ndim = rng.randint(0, 4)
    numel = rng.choice((rng.randint(0, 40), pick()))
    return {'numel': numel, 'offset': pick(), 'size': [pick() for _ in range(ndim)],
            'stride': [pick() for _ in range(ndim + (rng.random() < 0.05))],
            # The floats the file really holds: usually what the pickle declares.
            'data_numel': min(1 << 16, max(0, numel if rng.random() < 0.75
                                           else rng.randint(0, 40)))}


def _expected(t: dict) -> list | None:
    """The values a tensor must load as (nested lists), or None where it must be refused,
    from the rules alone: element (i, j, ...) is storage[offset + i*stride0 + j*stride1 ...]."""
    numbers = [t['numel'], t['offset'], *t['size'], *t['stride']]
    if not all(0 <= n < 2**48 for n in numbers) or len(t['size']) != len(t['stride']):
        return None
    if t['data_numel'] != t['numel'] or math.prod(t['size']) * 4 > 4 * t['numel'] * 4 + (
            1 << 20) or math.prod(n for n in t['size'] if n) * 4 >= 2**62:
        return None
    if 0 not in t['size'] and t['offset'] + 1 + sum(
            (n - 1) * s for n, s in zip(t['size'], t['stride'], strict=True)) > t['numel']:
        return None

    def element(index, dim):
        if dim == len(t['size']):
            return float(t['offset'] + index)
        return [element(index + i * t['stride'][dim], dim + 1) for i in range(t['size'][dim])]
    return element(0, 0)


def test_random_tensor_geometry_loads_exactly_when_the_rules_allow(tmp_path):
    """Random sizes, strides, offsets and storage lengths (extremes included): the reader
    accepts exactly the in-bounds ones and reads each element where the strides say."""
    rng, p = random.Random(3), _P
    tensors = [_random_tensor(rng) for _ in range(300)]
    files = {}
    for i, t in enumerate(tensors):
        data = np.arange(t['data_numel'], dtype='<f4').tobytes()
        files[f't{i}'] = (_zip(p.dumps(p.dict({'w': p.tensor(
            p.storage('0', t['numel']), t['offset'], t['size'], t['stride'])})),
            {'0': data}), '.pth')
    results = _read_under_limit(tmp_path, files)
    for i, t in enumerate(tensors):
        outcome, detail = results[f't{i}']
        expected = _expected(t)
        if expected is None:
            assert outcome in _REFUSED, (t, outcome, detail)
        else:
            assert outcome == 'ok', (t, outcome, detail)
            shape, dtype, values = detail['w']
            assert shape == t['size'] and dtype == 'float32'
            assert values is None or values == expected, t
    loaded = sum(results[f't{i}'][0] == 'ok' for i in range(len(tensors)))
    assert 30 <= loaded <= 270  # both kinds are exercised
