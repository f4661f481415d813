"""torchvision detection state dicts (e.g. `maskrcnn_resnet50_fpn`'s) into segjax's instance
models: the ResNet-FPN backbone (`backbone.body.*`, `backbone.fpn.*`), the RPN head
(`rpn.head.*`), the RoI heads (`roi_heads.*`) and the whole Mask R-CNN (`load_maskrcnn`).

Values convert as in `segjax.pretrained` (OIHW -> HWIO, FrozenBatchNorm2d weight/bias ->
params scale/bias, running_mean/var -> batch_stats mean/var). Loading is all or nothing: names
under the prefix that map to nothing, parameters the file lacks and shape mismatches are raised
together in one `PretrainedError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from segjax.pretrained import convert_state_dict
from segjax.pth import PretrainedError

_FPN_BLOCK = re.compile(r'fpn\.(inner|layer)_blocks\.(\d+)\.0\.(weight|bias)')


def _fpn_entry(name: str, value: np.ndarray) -> tuple[tuple[str, str, str], np.ndarray] | None:
    match = _FPN_BLOCK.fullmatch(name)
    if match is None:
        return None
    kind, index, leaf = match.groups()
    if leaf == 'weight':
        return ('params', f'fpn/{kind}{index}', 'kernel'), value.transpose(2, 3, 1, 0)
    return ('params', f'fpn/{kind}{index}', 'bias'), value


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f'{prefix}{key}/'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _nest(flat: Mapping[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split('/')
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _fill(variables: Mapping, entries: Mapping, unmapped: list[str], what: str,
          prefix: str) -> dict:
    """`variables` with every leaf replaced from `entries` ({(collection, module, leaf):
    (torch name, array)}), or PretrainedError naming every problem."""
    targets = {c: _flatten(variables.get(c, {})) for c in ('params', 'batch_stats')}
    loaded = {c: {} for c in targets}
    problems = [f'{name}: maps to no parameter of {what}' for name in unmapped]
    for (collection, module, leaf), (name, value) in entries.items():
        path = f'{module}/{leaf}'
        target = targets[collection].get(path)
        if target is None:
            problems.append(f'{name}: maps to {collection}/{path}, which the model lacks')
        elif tuple(target.shape) != value.shape:
            problems.append(f'{name}: shape {value.shape} (flax layout) but the model\'s '
                            f'{collection}/{path} is {tuple(target.shape)}')
        else:
            loaded[collection][path] = value
    where = f' (under {prefix!r})' if prefix else ''
    problems += [f'{c}/{path}: not in the state dict{where}'
                 for c, flat in targets.items() for path in flat if path not in loaded[c]]
    if problems:
        shown = problems[:50] + ([f'... and {len(problems) - 50} more'] if len(problems) > 50
                                 else [])
        raise PretrainedError(f'cannot load {what}; nothing was loaded:\n  '
                              + '\n  '.join(shown))
    return {**variables, **{c: _nest(loaded[c]) for c in targets if c in variables}}


# Entries: {(collection, 'module/path', leaf): (torch name, flax-layout array)}.
Entries = dict[tuple[str, str, str], tuple[str, np.ndarray]]


def _under(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name.removeprefix(prefix): np.asarray(value) for name, value in state_dict.items()
            if name.startswith(prefix)}


def _resnet_fpn_entries(state_dict: Mapping[str, np.ndarray],
                        prefix: str) -> tuple[Entries, list[str]]:
    body, entries, unmapped = {}, {}, []
    for inner, value in _under(state_dict, prefix).items():
        if inner.startswith('body.'):
            body[inner.removeprefix('body.')] = value
            continue
        entry = _fpn_entry(inner, value.astype(np.float32))
        if entry is None:
            unmapped.append(prefix + inner)
        else:
            entries[entry[0]] = (prefix + inner, entry[1])
    # The body is an ImageNet ResNet layout, which segjax.pretrained maps under 'backbone/'.
    converted, body_unmapped = convert_state_dict(body)
    unmapped += [f'{prefix}body.{name}' for name in body_unmapped]
    for (collection, module, leaf), (name, value) in converted.items():
        module = 'body/' + module.removeprefix('backbone/')
        entries[(collection, module, leaf)] = (f'{prefix}body.{name}', value)
    return entries, unmapped


def load_resnet_fpn(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                    prefix: str = 'backbone.') -> dict:
    """`variables` of a `ResNetFPN` ({'params', 'batch_stats'}) filled from the entries of a
    torchvision detection `state_dict` under `prefix` (`body.*`: the ResNet, `fpn.*`: the FPN).
    Other entries (rpn, roi_heads) are ignored. Returns new variables of float32 numpy arrays.
    """
    entries, unmapped = _resnet_fpn_entries(state_dict, prefix)
    return _fill(variables, entries, unmapped, 'the ResNet-FPN backbone', prefix)


_RPN_HEAD = re.compile(r'(conv\.0\.0|cls_logits|bbox_pred)\.(weight|bias)')


def _rpn_head_entries(state_dict: Mapping[str, np.ndarray],
                      prefix: str) -> tuple[Entries, list[str]]:
    entries, unmapped = {}, []
    for inner, value in _under(state_dict, prefix).items():
        match = _RPN_HEAD.fullmatch(inner)
        if match is None:
            unmapped.append(prefix + inner)
            continue
        module, leaf = match.groups()
        value = value.astype(np.float32)
        module = 'conv' if module.startswith('conv') else module
        if leaf == 'weight':
            entries[('params', module, 'kernel')] = (prefix + inner, value.transpose(2, 3, 1, 0))
        else:
            entries[('params', module, 'bias')] = (prefix + inner, value)
    return entries, unmapped


def load_rpn_head(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                  prefix: str = 'rpn.head.') -> dict:
    """`variables` of an `RPNHead` ({'params'}) from torchvision's `rpn.head.*` entries
    (conv.0.0 -> conv, cls_logits, bbox_pred). Other entries are ignored."""
    entries, unmapped = _rpn_head_entries(state_dict, prefix)
    return _fill(variables, entries, unmapped, 'the RPN head', prefix)


# roi_heads.* names -> (module path, kind). mask_head.mask_fcn{i} is the layout of files saved
# before torchvision's MaskRCNNHeads v2 (e.g. the published COCO weights), {i-1}.0 the newer one.
_ROI_HEADS = (
    (re.compile(r'box_head\.(fc6|fc7)'), lambda m: f'box_head/{m[1]}', 'linear'),
    (re.compile(r'box_predictor\.(cls_score|bbox_pred)'), lambda m: f'box_predictor/{m[1]}',
     'linear'),
    (re.compile(r'mask_head\.(\d+)\.0'), lambda m: f'mask_head/mask_fcn{int(m[1]) + 1}', 'conv'),
    (re.compile(r'mask_head\.mask_fcn(\d+)'), lambda m: f'mask_head/mask_fcn{m[1]}', 'conv'),
    (re.compile(r'mask_predictor\.conv5_mask'), lambda m: 'mask_predictor/conv5_mask',
     'transposed'),
    (re.compile(r'mask_predictor\.mask_fcn_logits'), lambda m: 'mask_predictor/mask_fcn_logits',
     'conv'),
)


def torch_transposed_kernel(weight: np.ndarray) -> np.ndarray:
    """nn.ConvTranspose2d weight [in, out, kh, kw] -> flax nn.ConvTranspose kernel
    [kh, kw, in, out]. Flax (transpose_kernel=False) correlates the dilated input with its
    kernel; torch's transposed conv is the gradient of a correlation, i.e. a correlation with
    the spatially flipped kernel, hence the flip."""
    return weight.transpose(2, 3, 0, 1)[::-1, ::-1].copy()


def _roi_heads_entries(state_dict: Mapping[str, np.ndarray],
                       prefix: str) -> tuple[Entries, list[str]]:
    entries, unmapped = {}, []
    for inner, value in _under(state_dict, prefix).items():
        module_name, _, leaf = inner.rpartition('.')
        rule = next(((path(m), kind) for pattern, path, kind in _ROI_HEADS
                     if (m := pattern.fullmatch(module_name))), None)
        if rule is None or leaf not in ('weight', 'bias'):
            unmapped.append(prefix + inner)
            continue
        module, kind = rule
        value = value.astype(np.float32)
        if leaf == 'bias':
            entries[('params', module, 'bias')] = (prefix + inner, value)
            continue
        kernel = {'linear': lambda w: w.T, 'conv': lambda w: w.transpose(2, 3, 1, 0),
                  'transposed': torch_transposed_kernel}[kind](value)
        entries[('params', module, 'kernel')] = (prefix + inner, kernel)
    return entries, unmapped


def load_roi_heads(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                   prefix: str = 'roi_heads.') -> dict:
    """`variables` ({'params': {'box_head', 'box_predictor', 'mask_head', 'mask_predictor'}},
    the modules of `segjax.instance.roi_heads`) from torchvision's `roi_heads.*` entries.
    Linear (out, in) -> (in, out), conv OIHW -> HWIO, conv5_mask via `torch_transposed_kernel`.
    """
    entries, unmapped = _roi_heads_entries(state_dict, prefix)
    return _fill(variables, entries, unmapped, 'the RoI heads', prefix)


def load_maskrcnn(variables: Mapping, state_dict: Mapping[str, np.ndarray]) -> dict:
    """`variables` of a `segjax.instance.maskrcnn.MaskRCNN` from a whole torchvision
    `maskrcnn_resnet50_fpn` state dict (backbone.*, rpn.head.*, roi_heads.*): every entry must
    map and every parameter must be given, else one PretrainedError lists every problem."""
    entries: Entries = {}
    unmapped = [name for name in state_dict
                if not name.startswith(('backbone.', 'rpn.head.', 'roi_heads.'))]
    for make, prefix, root in ((_resnet_fpn_entries, 'backbone.', 'backbone/'),
                               (_rpn_head_entries, 'rpn.head.', 'rpn/'),
                               (_roi_heads_entries, 'roi_heads.', '')):
        part, part_unmapped = make(state_dict, prefix)
        unmapped += part_unmapped
        entries.update({(c, root + module, leaf): value
                        for (c, module, leaf), value in part.items()})
    return _fill(variables, entries, unmapped, 'Mask R-CNN', '')
