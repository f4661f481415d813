"""Published PyTorch weights into segjax models, without importing torch and without running
pickled code.

Reads state dicts from `.safetensors` files and from `.pth` files (torch.save's zip format and
the legacy pre-1.6 format): a `.pth` is a pickle, and weights come from strangers, so it is read
by a restricted unpickler that rebuilds tensors only. Any other global a file names
(`os.system`, `builtins.eval`, ...) is refused with `UnsafePickleError` before anything runs.

Two layouts load into the models of `segjax.models`:
  * ImageNet ResNets (torchvision's `resnet18/50/101`, timm's `resnet*` and `resnet*c`, mmcv's
    `resnet50_v1c`) into the 'backbone' of any ResNet-based model. The ImageNet classifier
    (`fc.*`) is left out unless the model has an `fc` (`ResNetClassifier`).
  * torchvision's segmentation checkpoints `fcn_resnet50/101` and `deeplabv3_resnet50/101` into
    `FCNResNet` / `DeepLabV3` (with `aux_head=True` when the file has `aux_classifier.*`).

Loading is all or nothing: source names that map to nothing, model parameters the file does not
provide and shapes that differ are collected and raised together in one `PretrainedError`.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np


class PretrainedError(ValueError):
    """A weights file that does not fit the model (or cannot be read)."""


class UnsafePickleError(PretrainedError):
    """A `.pth` file that asks the unpickler for something other than tensors."""


# ---------------------------------------------------------------------------------------------
# Reading state dicts.

_DTYPES = {  # torch storage / dtype names -> numpy dtypes
    'Double': np.float64, 'Float': np.float32, 'Half': np.float16,
    'BFloat16': ml_dtypes.bfloat16, 'Long': np.int64, 'Int': np.int32, 'Short': np.int16,
    'Char': np.int8, 'Byte': np.uint8, 'Bool': np.bool_,
}
_TORCH_DTYPES = {  # names of torch.dtype objects, as _rebuild_tensor_v3 pickles them
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'int32': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
}
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


class _StorageType:
    """Stands in for `torch.FloatStorage` & co.: only its element dtype matters here."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *unused: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 into numpy, bounds-checked (the file is untrusted)."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
        raise PretrainedError(f'malformed tensor: size {size}, stride {stride}, offset {offset}')
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise PretrainedError(f'tensor of size {size} reads past its storage ({storage.size})')
    # A read-only view; read_state_dict copies it (legacy files fill storages after the pickle).
    return np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
    # v3 pickles a byte storage and the element dtype separately.
    return _rebuild_tensor(storage.view(dtype.dtype), offset, size, stride)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'UntypedStorage'): _StorageType(np.uint8),
    **{('torch', f'{name}Storage'): _StorageType(dtype) for name, dtype in _DTYPES.items()},
    **{('torch', name): _StorageType(dtype) for name, dtype in _TORCH_DTYPES.items()},
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles containers of tensors; any other global is refused before it can be called.

    `load_storage(key, dtype, numel)` supplies the flat numpy storage a persistent id names.
    """

    def __init__(self, file, load_storage: Callable[[str, np.dtype, int], np.ndarray] | None):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f'refusing to load {module}.{name}: this file asks to import more than tensors '
            '(a checkpoint should hold only a state dict; it may be malicious). Allowed: '
            + ', '.join(sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS
                               if not isinstance(_ALLOWED_GLOBALS[(m, n)], _StorageType))))

    def persistent_load(self, pid: Any) -> np.ndarray:
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (self._load_storage and isinstance(pid, tuple) and len(pid) >= 5
                and pid[0] == 'storage' and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f'unsupported persistent id {pid!r:.100}')
        _, storage_type, key, _, numel = pid[:5]
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._load_storage(key, storage_type.dtype, int(numel))
        return self._storages[key]


def _read_torch_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith('data.pkl')]
        if len(pickles) != 1:
            raise PretrainedError(f'{path}: not a torch.save zip (found {pickles or "no"} '
                                  'data.pkl)')
        prefix = pickles[0][: -len('data.pkl')]
        byteorder = 'little'
        if prefix + 'byteorder' in names:
            byteorder = archive.read(prefix + 'byteorder').decode().strip()

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            data = np.frombuffer(archive.read(f'{prefix}data/{key}'),
                                 dtype.newbyteorder('<' if byteorder == 'little' else '>'))
            if data.size < numel:
                raise PretrainedError(f'{path}: storage {key} holds {data.size} < {numel} values')
            return data.astype(dtype)  # native byte order

        return _TensorUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _read_torch_legacy(path: str) -> Any:
    """torch.save's pre-1.6 format: magic, protocol and system-info pickles, the object pickle,
    the storage keys, then each storage as int64 numel + raw little-endian bytes."""
    with open(path, 'rb') as f:
        for _ in range(3):  # magic number, protocol version, sys info: plain data
            _TensorUnpickler(f, None).load()
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            # The data follows the pickle: tensors are views of this, filled in place below.
            storages[key] = np.zeros(numel, dtype)
            return storages[key]

        obj = _TensorUnpickler(f, load_storage).load()
        for key in _TensorUnpickler(f, None).load():
            (numel,) = struct.unpack('<q', f.read(8))
            storage = storages.get(str(key))
            if storage is None or numel != storage.size:
                raise PretrainedError(f'{path}: storage {key} is inconsistent with the pickle')
            data = np.frombuffer(f.read(numel * storage.itemsize),
                                 storage.dtype.newbyteorder('<'))
            if data.size != numel:
                raise PretrainedError(f'{path}: storage {key} is truncated')
            storage[:] = data
    return obj


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, 'rb') as f:
        (header_size,) = struct.unpack('<Q', f.read(8))
        if header_size > 100_000_000:
            raise PretrainedError(f'{path}: implausible safetensors header size {header_size}')
        header = json.loads(f.read(header_size))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        if info['dtype'] not in _SAFETENSORS_DTYPES:
            raise PretrainedError(f'{path}: {name} has unsupported dtype {info["dtype"]}')
        dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
        begin, end = info['data_offsets']
        shape = tuple(info['shape'])
        if not 0 <= begin <= end <= len(data) or end - begin != (
                int(np.prod(shape)) * dtype.itemsize):
            raise PretrainedError(f'{path}: {name} has inconsistent offsets {begin}..{end}')
        tensors[name] = np.frombuffer(data[begin:end], dtype).reshape(shape).astype(
            dtype.newbyteorder('='))
    return tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat {name: numpy array} state dict in a `.safetensors` or `.pth`/`.pt`/`.bin` file.

    A checkpoint that wraps its state dict (`{'state_dict': ...}` as mmcv saves, or
    `{'model': ...}`) is unwrapped; a DataParallel `module.` prefix is dropped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no weights file at {path!r}')
    with open(path, 'rb') as f:
        head = f.read(8)
    if path.endswith('.safetensors'):
        obj = _read_safetensors(path)
    elif head.startswith(b'PK'):
        obj = _read_torch_zip(path)
    elif head[:1] == b'\x80':
        obj = _read_torch_legacy(path)
    else:
        raise PretrainedError(f'{path}: neither a safetensors nor a torch.save file')
    for wrapper in ('state_dict', 'model'):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise PretrainedError(f'{path}: holds a {type(obj).__name__}, not a state dict')
    state = {}
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise PretrainedError(f'{path}: entry {name!r} is a {type(value).__name__}, '
                                  'not a tensor')
        state[name.removeprefix('module.')] = np.array(value)  # compact, owns its memory
    return state


# ---------------------------------------------------------------------------------------------
# Names: torch module paths -> segjax module paths ('/'-joined).

_STEM_V1C = {'stem.0': 'stem_conv1', 'stem.1': 'stem_bn1', 'stem.3': 'stem_conv2',
             'stem.4': 'stem_bn2', 'stem.6': 'stem_conv3', 'stem.7': 'stem_bn3'}
# timm's deep stem (resnet*c/d) is a Sequential `conv1` followed by `bn1`.
_STEM_TIMM = {'conv1.0': 'stem_conv1', 'conv1.1': 'stem_bn1', 'conv1.3': 'stem_conv2',
              'conv1.4': 'stem_bn2', 'conv1.6': 'stem_conv3', 'bn1': 'stem_bn3'}

_RESNET_RULES = (
    (r'conv1|bn1', r'\g<0>'),
    (r'layer(\d)\.(\d+)\.(conv|bn)(\d)', r'layer\1_\2/\3\4'),
    (r'layer(\d)\.(\d+)\.downsample\.0', r'layer\1_\2/downsample_conv'),
    (r'layer(\d)\.(\d+)\.downsample\.1', r'layer\1_\2/downsample_bn'),
)
_FCN_HEAD_RULES = ((r'0', 'conv'), (r'1', 'bn'), (r'4', 'classifier'))
_DEEPLABV3_RULES = (
    (r'0\.convs\.([0-3])\.0', r'aspp/branch\1/conv'),
    (r'0\.convs\.([0-3])\.1', r'aspp/branch\1/bn'),
    (r'0\.convs\.4\.1', 'aspp/pooling/conv'),
    (r'0\.convs\.4\.2', 'aspp/pooling/bn'),
    (r'0\.project\.0', 'aspp/project/conv'),
    (r'0\.project\.1', 'aspp/project/bn'),
    (r'1', 'bottleneck/conv'),
    (r'2', 'bottleneck/bn'),
    (r'4', 'classifier'),
)


def _apply_rules(name: str, rules: Iterable[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(f'^{pattern}$', replacement, name)
    return None


def _resnet_module(name: str, stem: Mapping[str, str]) -> str | None:
    return stem.get(name) or _apply_rules(name, _RESNET_RULES)


def torch_to_segjax_name(module: str, modules: Iterable[str]) -> str | None:
    """The segjax module path of a torch module path (e.g. 'backbone.layer1.0.conv1' ->
    'backbone/layer1_0/conv1'), or None; `modules` (every module in the file) tells layouts
    apart (timm's deep stem, DeepLabV3's head)."""
    modules = set(modules)
    stem = _STEM_TIMM if ('conv1.0' in modules or 'backbone.conv1.0' in modules) else _STEM_V1C
    if module.startswith('backbone.'):  # torchvision segmentation checkpoints
        inner = _resnet_module(module.removeprefix('backbone.'), stem)
        return None if inner is None else 'backbone/' + inner
    if module.startswith('aux_classifier.'):
        inner = _apply_rules(module.removeprefix('aux_classifier.'), _FCN_HEAD_RULES)
        return None if inner is None else 'aux_head/' + inner
    if module.startswith('classifier.'):
        deeplab = any(m.startswith('classifier.0.convs.') for m in modules)
        inner = _apply_rules(module.removeprefix('classifier.'),
                             _DEEPLABV3_RULES if deeplab else _FCN_HEAD_RULES)
        return None if inner is None else ('' if deeplab else 'head/') + inner
    if module == 'fc':  # an ImageNet classifier's head
        return 'fc'
    inner = _resnet_module(module, stem)  # an ImageNet ResNet: everything is the backbone
    return None if inner is None else 'backbone/' + inner


# ---------------------------------------------------------------------------------------------
# Values: torch layouts -> flax layouts.

def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """({(collection, 'module/path', leaf): (torch name, array)}, [names that map to nothing]).

    Convolutions OIHW -> HWIO, linear (out, in) -> (in, out); BatchNorm weight/bias -> params
    scale/bias, running_mean/var -> batch_stats mean/var; num_batches_tracked is dropped.
    """
    tensors = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
    modules = {k.rsplit('.', 1)[0] for k in tensors}
    norms = {k.rsplit('.', 1)[0] for k in tensors if k.endswith('.running_mean')}
    converted, unmapped = {}, []
    for name, value in tensors.items():
        module, leaf = name.rsplit('.', 1) if '.' in name else ('', name)
        target = torch_to_segjax_name(module, modules)
        if target is None:
            unmapped.append(name)
            continue
        if module in norms:
            collection, new_leaf = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                                    'running_mean': ('batch_stats', 'mean'),
                                    'running_var': ('batch_stats', 'var')}.get(leaf, (None, None))
        else:
            collection, new_leaf = {'weight': ('params', 'kernel'),
                                    'bias': ('params', 'bias')}.get(leaf, (None, None))
            if leaf == 'weight' and value.ndim == 4:
                value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            elif leaf == 'weight' and value.ndim == 2:
                value = value.T
        if collection is None:
            unmapped.append(name)
            continue
        converted[(collection, target, new_leaf)] = (name, np.asarray(value, np.float32))
    return converted, unmapped


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + '/'))
        else:
            flat[path] = value
    return flat


def _replace(tree: Mapping, values: Mapping[str, np.ndarray], prefix: str = '') -> dict:
    return {key: (_replace(value, values, f'{prefix}{key}/') if isinstance(value, Mapping)
                  else values.get(f'{prefix}{key}', value))
            for key, value in tree.items()}


def load_into(variables: Mapping, source: str | os.PathLike | Mapping[str, np.ndarray], *,
              skip: Iterable[str] = ()) -> dict:
    """`variables` ({'params', 'batch_stats'} of a segjax model) with the weights of `source`.

    `source` is a weights file (see `read_state_dict`) or a state dict. What must match:
      * an ImageNet ResNet (no `backbone.` names) fills all of the model's 'backbone' (and
        'fc' if the model has one); the other modules (heads) keep their values;
      * a torchvision segmentation checkpoint (`backbone.*`, `classifier.*`) fills the whole
        model; its `aux_classifier.*` needs a model with aux_head=True.
    `skip` lists torch name prefixes to leave out, whose parameters then keep their values:
    e.g. skip=('classifier.4.', 'aux_classifier.4.') to fine-tune a 21-class checkpoint on 19.

    Raises PretrainedError listing every unmapped name, missing parameter and shape mismatch;
    nothing is returned half-loaded. Returns new variables (float32 numpy leaves).
    """
    state = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else source
    skip = tuple(skip)
    converted, unmapped = convert_state_dict(state)
    targets = {c: _flatten(variables.get(c, {})) for c in ('params', 'batch_stats')}
    segmentation = any(name.startswith('backbone.') for name in state)
    if not segmentation and 'fc' not in variables.get('params', {}):
        # An ImageNet classifier has no place in a segmentation model: it is not an error.
        skip += ('fc.',)

    def scope(path: str) -> bool:
        return segmentation or path.startswith('backbone/') or path.startswith('fc/')

    loaded = {c: {} for c in targets}
    covered, not_in_model, mismatched = set(), [], []
    for (collection, module, leaf), (name, value) in converted.items():
        path = f'{module}/{leaf}'
        covered.add((collection, path))
        if name.startswith(skip):
            continue
        if path not in targets[collection]:
            not_in_model.append(f'{name} -> {collection}/{path}')
        elif tuple(targets[collection][path].shape) != value.shape:
            mismatched.append(f'{name} {value.shape} -> {collection}/{path} '
                              f'{tuple(targets[collection][path].shape)}')
        else:
            loaded[collection][path] = value
    unmapped = [name for name in unmapped if not name.startswith(skip)]
    missing = [f'{c}/{p}' for c, flat in targets.items() for p in flat
               if scope(p) and (c, p) not in covered]
    if not any(loaded.values()) and not (unmapped or not_in_model or mismatched or missing):
        missing.append('(the model has no ResNet "backbone" for these weights)')
    problems = [(f'{len(unmapped)} names in the file map to no segjax parameter', unmapped),
                (f'{len(not_in_model)} names map to parameters this model does not have',
                 not_in_model),
                (f'{len(mismatched)} shapes differ (file, converted to flax layout -> model)',
                 mismatched),
                (f'{len(missing)} model parameters are not in the file', missing)]
    if any(items for _, items in problems):
        source_name = source if isinstance(source, (str, os.PathLike)) else 'the state dict'
        lines = [f'cannot load {source_name} into this model; nothing was loaded:']
        for title, items in problems:
            if items:
                lines.append(f'  {title}:')
                lines.extend(f'    {item}' for item in items[:50])
                if len(items) > 50:
                    lines.append(f'    ... and {len(items) - 50} more')
        if any(item.startswith('aux_classifier.') for item in not_in_model):
            lines.append("  (build the model with aux_head=True or pass skip=('aux_classifier.',))")
        if mismatched:
            lines.append("  (to train a new classifier, leave it out: skip=('<name prefix>',))")
        raise PretrainedError('\n'.join(lines))
    return {**variables, **{c: _replace(variables[c], loaded[c]) for c in targets
                            if c in variables}}
