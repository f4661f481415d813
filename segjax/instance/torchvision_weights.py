"""torchvision detection state dicts (e.g. `maskrcnn_resnet50_fpn`'s) into segjax's instance
models: for now the ResNet-FPN backbone (`backbone.body.*`, `backbone.fpn.*`) and the RPN head
(`rpn.head.*`).

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
    problems += [f'{c}/{path}: not in the state dict (under {prefix!r})'
                 for c, flat in targets.items() for path in flat if path not in loaded[c]]
    if problems:
        shown = problems[:50] + ([f'... and {len(problems) - 50} more'] if len(problems) > 50
                                 else [])
        raise PretrainedError(f'cannot load {what}; nothing was loaded:\n  '
                              + '\n  '.join(shown))
    return {**variables, **{c: _nest(loaded[c]) for c in targets if c in variables}}


def load_resnet_fpn(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                    prefix: str = 'backbone.') -> dict:
    """`variables` of a `ResNetFPN` ({'params', 'batch_stats'}) filled from the entries of a
    torchvision detection `state_dict` under `prefix` (`body.*`: the ResNet, `fpn.*`: the FPN).
    Other entries (rpn, roi_heads) are ignored. Returns new variables of float32 numpy arrays.
    """
    body, entries, unmapped = {}, {}, []
    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        inner = name.removeprefix(prefix)
        if inner.startswith('body.'):
            body[inner.removeprefix('body.')] = np.asarray(value)
            continue
        entry = _fpn_entry(inner, np.asarray(value, np.float32))
        if entry is None:
            unmapped.append(name)
        else:
            entries[entry[0]] = (name, entry[1])
    # The body is an ImageNet ResNet layout, which segjax.pretrained maps under 'backbone/'.
    converted, body_unmapped = convert_state_dict(body)
    unmapped += [f'{prefix}body.{name}' for name in body_unmapped]
    for (collection, module, leaf), (name, value) in converted.items():
        module = 'body/' + module.removeprefix('backbone/')
        entries[(collection, module, leaf)] = (f'{prefix}body.{name}', value)

    return _fill(variables, entries, unmapped, 'the ResNet-FPN backbone', prefix)


_RPN_HEAD = re.compile(r'(conv\.0\.0|cls_logits|bbox_pred)\.(weight|bias)')


def load_rpn_head(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                  prefix: str = 'rpn.head.') -> dict:
    """`variables` of an `RPNHead` ({'params'}) from torchvision's `rpn.head.*` entries
    (conv.0.0 -> conv, cls_logits, bbox_pred). Other entries are ignored."""
    entries, unmapped = {}, []
    for name, value in state_dict.items():
        if not name.startswith(prefix):
            continue
        match = _RPN_HEAD.fullmatch(name.removeprefix(prefix))
        if match is None:
            unmapped.append(name)
            continue
        module, leaf = match.groups()
        value = np.asarray(value, np.float32)
        module = 'conv' if module.startswith('conv') else module
        if leaf == 'weight':
            entries[('params', module, 'kernel')] = (name, value.transpose(2, 3, 1, 0))
        else:
            entries[('params', module, 'bias')] = (name, value)
    return _fill(variables, entries, unmapped, 'the RPN head', prefix)
