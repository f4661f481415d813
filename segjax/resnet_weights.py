"""ResNet weights from torchvision / timm / mmcv state dicts into segjax's ResNet-based models.

The ResNet half of `segjax.pretrained` (which dispatches here): torch module names <-> segjax
paths, torch layouts -> flax layouts, and the all-or-nothing loader `load_resnet_into`. Its own
module so that loaders built on it (`segjax.instance.torchvision_weights`) and the dispatcher
that reaches them do not import each other.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from segjax.pth import PretrainedError

# ---------------------------------------------------------------------------------------------
# Names: torch module paths <-> segjax module paths ('/'-joined). Each rule is a pair of
# templates (torch, segjax) in which {i}, {j}, ... stand for the same number on both sides.

_STEM_V1C = (('stem.0', 'stem_conv1'), ('stem.1', 'stem_bn1'), ('stem.3', 'stem_conv2'),
             ('stem.4', 'stem_bn2'), ('stem.6', 'stem_conv3'), ('stem.7', 'stem_bn3'))
# timm's deep stem (resnet*c/d) is a Sequential `conv1` followed by `bn1`.
_STEM_TIMM = (('conv1.0', 'stem_conv1'), ('conv1.1', 'stem_bn1'), ('conv1.3', 'stem_conv2'),
              ('conv1.4', 'stem_bn2'), ('conv1.6', 'stem_conv3'), ('bn1', 'stem_bn3'))
_RESNET = (
    ('conv1', 'conv1'), ('bn1', 'bn1'),
    ('layer{i}.{j}.conv{k}', 'layer{i}_{j}/conv{k}'), ('layer{i}.{j}.bn{k}', 'layer{i}_{j}/bn{k}'),
    ('layer{i}.{j}.downsample.0', 'layer{i}_{j}/downsample_conv'),
    ('layer{i}.{j}.downsample.1', 'layer{i}_{j}/downsample_bn'),
)
_FCN_HEAD = (('0', 'conv'), ('1', 'bn'), ('4', 'classifier'))
_DEEPLABV3_HEAD = (
    ('0.convs.4.1', 'aspp/pooling/conv'), ('0.convs.4.2', 'aspp/pooling/bn'),
    ('0.convs.{b}.0', 'aspp/branch{b}/conv'), ('0.convs.{b}.1', 'aspp/branch{b}/bn'),
    ('0.project.0', 'aspp/project/conv'), ('0.project.1', 'aspp/project/bn'),
    ('1', 'bottleneck/conv'), ('2', 'bottleneck/bn'), ('4', 'classifier'),
)
# (collection, flax leaf) -> torch leaf; BatchNorm's weight is flax's scale.
_TORCH_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                 ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                 ('batch_stats', 'var'): 'running_var'}


@functools.cache
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r'\\\{(\w)\\\}', lambda m: f'(?P<{m[1]}>\\d+)',
                             re.escape(template)))


def _translate(name: str, rules: Iterable[tuple[str, str]], *, to_segjax: bool) -> str | None:
    for torch_template, segjax_template in rules:
        source, target = ((torch_template, segjax_template) if to_segjax
                          else (segjax_template, torch_template))
        match = _pattern(source).fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def _sections(modules: set[str]) -> tuple[tuple[str, str, tuple], ...]:
    """(torch prefix, segjax prefix, rules) of each part of a file; the catch-all '' last."""
    stem = _STEM_TIMM if {'conv1.0', 'backbone.conv1.0'} & modules else _STEM_V1C
    resnet = stem + _RESNET
    deeplab = any(m.startswith('classifier.0.convs.') for m in modules)
    return (('backbone.', 'backbone/', resnet),  # torchvision segmentation checkpoints
            ('aux_classifier.', 'aux_head/', _FCN_HEAD),
            ('classifier.', '', _DEEPLABV3_HEAD) if deeplab else
            ('classifier.', 'head/', _FCN_HEAD),
            # An ImageNet ResNet: everything but its classifier `fc` is the backbone.
            ('', '', (('fc', 'fc'),) + tuple((t, 'backbone/' + s) for t, s in resnet)))


def torch_to_segjax_name(module: str, modules: Iterable[str]) -> str | None:
    """The segjax module path of a torch module path (e.g. 'backbone.layer1.0.conv1' ->
    'backbone/layer1_0/conv1'), or None; `modules` (every module in the file) tells layouts
    apart (timm's deep stem, DeepLabV3's head)."""
    for torch_prefix, segjax_prefix, rules in _sections(set(modules)):
        if module.startswith(torch_prefix):
            inner = _translate(module.removeprefix(torch_prefix), rules, to_segjax=True)
            return None if inner is None else segjax_prefix + inner
    return None


def segjax_to_torch_name(path: str, modules: Iterable[str]) -> str | None:
    """The inverse of `torch_to_segjax_name`, in the layout of a file whose modules are
    `modules` (a segmentation checkpoint's backbone is under `backbone.`, an ImageNet one's not).
    """
    modules = set(modules)
    # The backbone is either under `backbone.` or at the top level, never both.
    unused = '' if any(m.startswith('backbone.') for m in modules) else 'backbone.'
    for torch_prefix, segjax_prefix, rules in _sections(modules):
        if torch_prefix != unused and path.startswith(segjax_prefix):
            inner = _translate(path.removeprefix(segjax_prefix), rules, to_segjax=False)
            if inner is not None:
                return torch_prefix + inner
    return None


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


def load_problems(unmapped: list[str], not_in_model: list[str], mismatched: list[str],
                  missing: list[str]) -> list[tuple[str, list[str]]]:
    """The four kinds of problem every all-or-nothing loader reports, titled with their counts."""
    return [(f'{len(unmapped)} names in the file map to no segjax parameter', unmapped),
            (f'{len(not_in_model)} names map to parameters this model does not have',
             not_in_model),
            (f'{len(mismatched)} shapes differ (file, converted to flax layout -> model)',
             mismatched),
            (f'{len(missing)} model parameters are not in the file', missing)]


def problem_lines(problems: list[tuple[str, list[str]]], shown: int = 50) -> list[str]:
    """The error message's lines for `load_problems`: each non-empty kind, its first `shown`."""
    lines = []
    for title, items in problems:
        if items:
            lines.append(f'  {title}:')
            lines.extend(f'    {item}' for item in items[:shown])
            if len(items) > shown:
                lines.append(f'    ... and {len(items) - shown} more')
    return lines


def load_resnet_into(variables: Mapping, state: Mapping[str, np.ndarray], *,
                     skip: Iterable[str] = (), source_name: str = 'the state dict') -> dict:
    """`variables` with an ImageNet ResNet's or a torchvision segmentation checkpoint's
    weights: the ResNet half of `load_into` (see there), for a state dict already read."""
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
    covered, not_in_model, mismatched, mismatched_paths = set(), [], [], []
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
            mismatched_paths.append(path)
        else:
            loaded[collection][path] = value
    unmapped = [name for name in unmapped if not name.startswith(skip)]
    modules = {name.rsplit('.', 1)[0] for name in state}
    missing = [f'{c}/{p} (file name: {_torch_name(c, p, modules) or "none"})'
               for c, flat in targets.items() for p in flat
               if scope(p) and (c, p) not in covered]
    if not any(loaded.values()) and not (unmapped or not_in_model or mismatched or missing):
        missing.append('(the model has no ResNet "backbone" for these weights)')
    problems = load_problems(unmapped, not_in_model, mismatched, missing)
    if not any(items for _, items in problems):
        return {**variables, **{c: _replace(variables[c], loaded[c]) for c in targets
                                if c in variables}}
    lines = [f'cannot load {source_name} into this model; nothing was loaded:']
    file_resnet = _resnet_layout({f'{module}/{leaf}': value.shape for (c, module, leaf), (_, value)
                                  in converted.items() if c == 'params'})
    model_resnet = _resnet_layout({p: tuple(v.shape) for p, v in targets['params'].items()})
    backbone_differs = None not in (file_resnet, model_resnet) and file_resnet != model_resnet
    if backbone_differs:  # then every list below follows from it: show only their starts
        blocks, bottleneck, width, deep_stem = file_resnet
        lines.append(f'  the file holds {_describe_resnet(file_resnet)} but the model\'s '
                     f'backbone is {_describe_resnet(model_resnet)}: build the model with '
                     f'depth={_resnet_depth(blocks, bottleneck)}, base_width={width}, '
                     f'deep_stem={deep_stem} (or use weights of its architecture)')
    shown = 5 if backbone_differs else 50
    lines += problem_lines(problems, shown)
    if any(item.startswith('aux_classifier.') for item in not_in_model):
        lines.append("  (build the model with aux_head=True or pass skip=('aux_classifier.',))")
    if not backbone_differs and any(not p.startswith('backbone/') for p in mismatched_paths):
        lines.append("  (to train a new classifier, leave it out: skip=('<name prefix>',))")
    raise PretrainedError('\n'.join(lines))


def _torch_name(collection: str, path: str, modules: set[str]) -> str | None:
    """The name a file whose modules are `modules` would give the segjax parameter `path`."""
    module, leaf = path.rsplit('/', 1)
    torch_module = segjax_to_torch_name(module, modules)
    torch_leaf = _TORCH_LEAVES.get((collection, leaf))
    return None if torch_module is None or torch_leaf is None else f'{torch_module}.{torch_leaf}'


def _resnet_layout(kernels: Mapping[str, tuple]) -> tuple | None:
    """(blocks per stage, bottleneck?, base width, deep stem?) of the ResNet whose
    'backbone/...' parameter shapes (flax layout: output channels last) are given, or None."""
    blocks = tuple(len({m[1] for path in kernels
                        if (m := re.match(rf'backbone/layer{stage}_(\d+)/', path))})
                   for stage in range(1, 5))
    first = kernels.get('backbone/layer1_0/conv1/kernel')
    if first is None or 0 in blocks:
        return None
    return (blocks, 'backbone/layer1_0/conv3/kernel' in kernels, first[-1],
            'backbone/stem_conv1/kernel' in kernels)


def _resnet_depth(blocks: tuple[int, ...], bottleneck: bool) -> int:
    return 2 + sum(blocks) * (3 if bottleneck else 2)  # the stem, the blocks' convs and fc


def _describe_resnet(layout: tuple) -> str:
    blocks, bottleneck, width, deep_stem = layout
    return (f'a ResNet-{_resnet_depth(blocks, bottleneck)} '
            f'({"bottleneck" if bottleneck else "basic"} blocks {"-".join(map(str, blocks))}, '
            f'base_width {width}{", deep stem" if deep_stem else ""})')
