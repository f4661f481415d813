"""torchvision detection state dicts (e.g. `maskrcnn_resnet50_fpn`'s) into segjax's instance
models: the ResNet-FPN backbone (`backbone.body.*`, `backbone.fpn.*`), the RPN head
(`rpn.head.*`), the RoI heads (`roi_heads.*`) and the whole Mask R-CNN (`load_maskrcnn`).
`load_into_maskrcnn` is what `segjax.pretrained.load_into` (and so `config.pretrained`) calls
for a Mask R-CNN: an ImageNet ResNet fills its backbone's ResNet, a torchvision checkpoint the
whole model, with COCO's 91 category-id outputs cut to segjax.data.coco's 81 labels
(`select_classes`).

Values convert as in `segjax.pretrained` (OIHW -> HWIO, FrozenBatchNorm2d weight/bias ->
params scale/bias, running_mean/var -> batch_stats mean/var). Loading is all or nothing: names
under the prefix that map to nothing, parameters the file lacks and shape mismatches are raised
together in one `PretrainedError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from segjax import resnet_weights
from segjax.pth import PretrainedError
from segjax.resnet_weights import _flatten, convert_state_dict

_FPN_BLOCK = re.compile(r'fpn\.(inner|layer)_blocks\.(\d+)\.0\.(weight|bias)')


def _fpn_entry(name: str, value: np.ndarray) -> tuple[tuple[str, str, str], np.ndarray] | None:
    match = _FPN_BLOCK.fullmatch(name)
    if match is None:
        return None
    kind, index, leaf = match.groups()
    if leaf == 'weight':
        return ('params', f'fpn/{kind}{index}', 'kernel'), value.transpose(2, 3, 1, 0)
    return ('params', f'fpn/{kind}{index}', 'bias'), value


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
          prefix: str, *, keep: Iterable[tuple[str, str]] = (),
          source_name: str = 'the state dict') -> dict:
    """`variables` with every leaf replaced from `entries` ({(collection, module, leaf):
    (torch name, array)}) but those of `keep` ((collection, path) pairs, which keep their
    values), or PretrainedError naming every problem."""
    targets = {c: _flatten(variables.get(c, {})) for c in ('params', 'batch_stats')}
    loaded = {c: {p: v for (kc, p) in keep if kc == c and (v := targets[c].get(p)) is not None}
              for c in targets}
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
        raise PretrainedError(f'cannot load {source_name} into {what}; nothing was loaded:'
                              '\n  ' + '\n  '.join(shown))
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


# rpn.head.conv is the layout of files saved before torchvision's RPNHead v2 (the published COCO
# weights), conv.0.0 the newer one.
_RPN_HEAD = re.compile(r'(conv\.0\.0|conv|cls_logits|bbox_pred)\.(weight|bias)')


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


def load_maskrcnn(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                  skip: Iterable[str] = (), source_name: str = 'the state dict') -> dict:
    """`variables` of a `segjax.instance.maskrcnn.MaskRCNN` from a whole torchvision
    `maskrcnn_resnet50_fpn` state dict (backbone.*, rpn.head.*, roi_heads.*): every entry must
    map and every parameter must be given, else one PretrainedError lists every problem.
    Entries whose names start with a `skip` prefix are left out; the parameters they would
    fill keep their values (e.g. skip=('roi_heads.box_predictor.',
    'roi_heads.mask_predictor.mask_fcn_logits.') to train new predictors)."""
    skip = tuple(skip)
    entries: Entries = {}
    unmapped = [name for name in state_dict
                if not name.startswith(('backbone.', 'rpn.head.', 'roi_heads.', *skip))]
    for make, prefix, root in ((_resnet_fpn_entries, 'backbone.', 'backbone/'),
                               (_rpn_head_entries, 'rpn.head.', 'rpn/'),
                               (_roi_heads_entries, 'roi_heads.', '')):
        part, part_unmapped = make(state_dict, prefix)
        unmapped += [name for name in part_unmapped if not name.startswith(skip)]
        entries.update({(c, root + module, leaf): value
                        for (c, module, leaf), value in part.items()})
    kept = {(c, f'{module}/{leaf}') for (c, module, leaf), (name, _) in entries.items()
            if name.startswith(skip)}
    entries = {key: value for key, value in entries.items() if not value[0].startswith(skip)}
    return _fill(variables, entries, unmapped, 'Mask R-CNN', '', keep=kept,
                 source_name=source_name)


# ---------------------------------------------------------------------------------------------
# `config.pretrained` for a Mask R-CNN (through segjax.pretrained.load_into).

_DETECTION_PREFIXES = ('backbone.body.', 'backbone.fpn.', 'rpn.head.', 'roi_heads.')
# The class-indexed outputs of torchvision's box and mask predictors: (name, rows per class).
_CLASS_ROWS = (('roi_heads.box_predictor.cls_score.weight', 1),
               ('roi_heads.box_predictor.cls_score.bias', 1),
               ('roi_heads.box_predictor.bbox_pred.weight', 4),  # (dx, dy, dw, dh) per class
               ('roi_heads.box_predictor.bbox_pred.bias', 4),
               ('roi_heads.mask_predictor.mask_fcn_logits.weight', 1),
               ('roi_heads.mask_predictor.mask_fcn_logits.bias', 1))
_CLASS_SCORE = 'roi_heads.box_predictor.cls_score.weight'


def is_torchvision_detection(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether a state dict is a torchvision detection model's (backbone.body.*, rpn.head.*,
    roi_heads.*, ...), not an ImageNet classifier's or a segmentation model's."""
    return any(name.startswith(_DETECTION_PREFIXES) for name in state_dict)


def has_resnet_fpn_backbone(variables: Mapping) -> bool:
    """Whether `variables` are a model's whose 'backbone' is a `ResNetFPN` (a MaskRCNN's)."""
    backbone = variables.get('params', {}).get('backbone', {})
    return isinstance(backbone, Mapping) and 'body' in backbone and 'fpn' in backbone


def select_classes(state_dict: Mapping[str, np.ndarray], classes: Sequence[int]) -> dict:
    """`state_dict` with its box and mask predictors' outputs cut to `classes`: output k of the
    result is the file's output classes[k] (cls_score rows, bbox_pred's 4 rows of that class,
    mask_fcn_logits output channels); every other entry is passed through as it is.

    With classes = (0, *segjax.data.coco.COCO_CATEGORY_IDS), torchvision's 91 outputs indexed
    by COCO category id become segjax.data.coco's 81 contiguous labels (0 = background).
    """
    classes = np.asarray(classes, np.int64)
    selected = dict(state_dict)
    for name, per_class in _CLASS_ROWS:
        if name in selected:
            rows = (classes[:, None] * per_class + np.arange(per_class)).reshape(-1)
            selected[name] = np.asarray(selected[name])[rows]
    return selected


def _num_classes(variables: Mapping) -> int | None:
    kernel = variables.get('params', {}).get('box_predictor', {}).get('cls_score', {}).get(
        'kernel')
    return None if kernel is None else int(kernel.shape[-1])


def _with_model_classes(variables: Mapping, state_dict: Mapping[str, np.ndarray],
                        skip: tuple[str, ...], source_name: str) -> Mapping[str, np.ndarray]:
    """`state_dict` with as many predictor outputs as the model has classes: the same, or
    COCO's 91 category ids cut to segjax.data.coco's 81 labels; any other count is an error."""
    model_classes = _num_classes(variables)
    if (_CLASS_SCORE not in state_dict or _CLASS_SCORE.startswith(skip)
            or model_classes is None):
        return state_dict  # load_maskrcnn names what is missing
    file_classes = int(np.shape(state_dict[_CLASS_SCORE])[0])
    if file_classes == model_classes:
        return state_dict
    # Only here: segjax.data.coco imports tensorflow_datasets, maskrcnn flax.
    from segjax.data import coco
    from segjax.instance.maskrcnn import COCO_NUM_CLASSES
    if (file_classes, model_classes) == (COCO_NUM_CLASSES, coco.NUM_CLASSES):
        return select_classes(state_dict, (0, *coco.COCO_CATEGORY_IDS))
    raise PretrainedError(
        f'cannot load {source_name} into this Mask R-CNN; nothing was loaded: the file\'s box '
        f'and mask predictors have {file_classes} classes ({_CLASS_SCORE} is '
        f'{tuple(np.shape(state_dict[_CLASS_SCORE]))}) but the model has {model_classes} '
        f'(config.data.num_classes). Only {COCO_NUM_CLASSES} '
        f'(torchvision\'s COCO category ids) -> {coco.NUM_CLASSES} (segjax.data.coco\'s labels) '
        'is remapped; build the model with the file\'s count, or train new predictors with '
        "segjax.pretrained.load_into(..., skip=('roi_heads.box_predictor.', "
        "'roi_heads.mask_predictor.mask_fcn_logits.'))")


def _load_resnet_body(variables: Mapping, state_dict: Mapping[str, np.ndarray],
                      skip: tuple[str, ...], source_name: str) -> dict:
    """An ImageNet ResNet into the ResNet of the model's ResNetFPN ('backbone/body'), through
    segjax.resnet_weights' ResNet loader (its checks, its messages); everything else keeps its
    values."""
    def body(collection: str) -> dict:
        return {'backbone': variables.get(collection, {}).get('backbone', {}).get('body', {})}

    try:
        loaded = resnet_weights.load_resnet_into(
            {'params': body('params'), 'batch_stats': body('batch_stats')}, state_dict,
            skip=skip, source_name=source_name)
    except PretrainedError as error:
        # That loader saw the ResNet as the model's 'backbone': name the real paths.
        message = re.sub(r'\b(params|batch_stats)/backbone/', r'\1/backbone/body/', str(error))
        raise PretrainedError(message.replace(
            'into this model;', "into this Mask R-CNN's ResNet (backbone/body);", 1)) from None
    out = dict(variables)
    for collection in ('params', 'batch_stats'):
        if collection in variables:
            backbone = variables[collection]['backbone']
            out[collection] = {**variables[collection], 'backbone': {
                **backbone, 'body': loaded[collection]['backbone']}}
    return out


def load_into_maskrcnn(variables: Mapping, state_dict: Mapping[str, np.ndarray], *,
                       skip: Iterable[str] = (), source_name: str = 'the state dict') -> dict:
    """`variables` of a `segjax.instance.maskrcnn.MaskRCNN` with a state dict's weights:

      * an ImageNet ResNet (torchvision's `resnet50`: conv1.*, bn1.*, layer1-4.*, fc.*) fills
        the ResNet of the backbone ('backbone/body'; `fc.*` left out); the FPN, RPN and RoI
        heads keep their values. The start of torchvision's COCO recipe.
      * a torchvision Mask R-CNN checkpoint (backbone.body.*, backbone.fpn.*, rpn.head.*,
        roi_heads.*) fills the whole model (`load_maskrcnn`). torchvision's COCO weights have
        91 outputs indexed by COCO category id: into an 81-class model (segjax.data.coco's
        labels) they are cut and reordered by `select_classes`; any other class-count mismatch
        is an error naming both counts.
    `skip`: name prefixes to leave out, as in `segjax.pretrained.load_into`. All or nothing:
    one PretrainedError names the file and every problem. Returns new variables.
    """
    skip = tuple(skip)
    if not has_resnet_fpn_backbone(variables):
        raise PretrainedError(
            f'cannot load {source_name} into this model: it is a torchvision detection '
            f'checkpoint ({", ".join(p + "*" for p in _DETECTION_PREFIXES)}), which loads into '
            'a segjax.instance.maskrcnn.MaskRCNN, and this model has no ResNet-FPN backbone '
            '(params/backbone/body and params/backbone/fpn)')
    if not is_torchvision_detection(state_dict):
        return _load_resnet_body(variables, state_dict, skip, source_name)
    state_dict = _with_model_classes(variables, state_dict, skip, source_name)
    return load_maskrcnn(variables, state_dict, skip=skip, source_name=source_name)
