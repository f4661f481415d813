"""Published PyTorch weights into segjax models, without importing torch and without running
pickled code.

Files are read by `read_weights`: `.safetensors` by `segjax.safetensors`, `.pth`/`.bin` by
`segjax.pth.read_state_dict` (a restricted unpickler that treats every file as hostile). These
layouts load into the models of `segjax.models`:
  * ImageNet ResNets (torchvision's `resnet18/50/101`, timm's `resnet*` and `resnet*c`, mmcv's
    `resnet50_v1c`) into the 'backbone' of any ResNet-based model. The ImageNet classifier
    (`fc.*`) is left out unless the model has an `fc` (`ResNetClassifier`).
  * torchvision's segmentation checkpoints `fcn_resnet50/101` and `deeplabv3_resnet50/101` into
    `FCNResNet` / `DeepLabV3` (with `aux_head=True` when the file has `aux_classifier.*`).
  * Hugging Face `transformers`' SegFormer checkpoints into `segjax.models.segformer.SegFormer`:
    `nvidia/segformer-b*-finetuned-*` (`segformer.*` and `decode_head.*`) fill the whole model,
    `nvidia/mit-b*` ImageNet encoders only its 'backbone' (their `classifier.*` is left out).
    The hub's names and those of transformers >= 5's in-memory modules are both understood
    (`load_segformer_into`); `.safetensors` files are read by `segjax.safetensors`.
  * Hugging Face `transformers`' ViTModel / ViTForImageClassification (`google/vit-*`),
    Dinov2Model and Dinov2WithRegistersModel (`facebook/dinov2-*`) into the 'backbone' of
    `segjax.models.vit.ViTLinear` / `segjax.models.segmenter.Segmenter` or into a bare
    `segjax.models.vit.VisionTransformer` (`load_vit_into`).
  * ImageNet ResNets and torchvision's `maskrcnn_resnet50_fpn` checkpoints into
    `segjax.instance.maskrcnn.MaskRCNN` (`segjax.instance.torchvision_weights`).

Loading is all or nothing: source names that map to nothing, model parameters the file does not
provide and shapes that differ are collected and raised together in one `PretrainedError`; a
backbone of another depth or width is named as such first.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from segjax.instance import torchvision_weights
from segjax.pth import PretrainedError, read_state_dict
from segjax.resnet_weights import (  # noqa: F401  (re-exported: the ResNet half of this API)
    _flatten,
    _replace,
    _translate,
    convert_state_dict,
    load_problems,
    load_resnet_into,
    problem_lines,
    segjax_to_torch_name,
    torch_to_segjax_name,
)
from segjax.safetensors import read_safetensors


def load_into(variables: Mapping, source: str | os.PathLike | Mapping[str, np.ndarray], *,
              skip: Iterable[str] = ()) -> dict:
    """`variables` ({'params', 'batch_stats'} of a segjax model) with the weights of `source`.

    `source` is a weights file (see `read_weights`) or a state dict. What must match:
      * an ImageNet ResNet (no `backbone.` names) fills all of the model's 'backbone' (and
        'fc' if the model has one); the other modules (heads) keep their values;
      * a torchvision segmentation checkpoint (`backbone.*`, `classifier.*`) fills the whole
        model; its `aux_classifier.*` needs a model with aux_head=True.
      * a Hugging Face SegFormer checkpoint (`segformer.*`): see `load_segformer_into`.
      * a Hugging Face ViT / DINOv2 checkpoint (`embeddings.patch_embeddings.*`): see
        `load_vit_into`.
      * into a `segjax.instance.maskrcnn.MaskRCNN`: an ImageNet ResNet fills its
        'backbone/body', a torchvision Mask R-CNN checkpoint (`backbone.body.*`, `rpn.head.*`,
        `roi_heads.*`) the whole model: see `segjax.instance.torchvision_weights
        .load_into_maskrcnn` (COCO's 91 outputs are remapped for an 81-class model).
    `skip` lists torch name prefixes to leave out, whose parameters then keep their values:
    e.g. skip=('classifier.4.', 'aux_classifier.4.') to fine-tune a 21-class checkpoint on 19.

    Raises PretrainedError listing every unmapped name, missing parameter (by segjax's and the
    file's names) and shape mismatch, led by the depth/width of both backbones when those
    differ; nothing is returned half-loaded. Returns new variables (float32 numpy leaves).
    """
    state = read_weights(source) if isinstance(source, (str, os.PathLike)) else source
    skip = tuple(skip)
    if is_segformer(state):
        return load_segformer_into(variables, state, skip=skip, source_name=_source_name(source))
    if is_vit(state):
        return load_vit_into(variables, state, skip=skip, source_name=_source_name(source))
    if (torchvision_weights.is_torchvision_detection(state)
            or torchvision_weights.has_resnet_fpn_backbone(variables)):
        return torchvision_weights.load_into_maskrcnn(variables, state, skip=skip,
                                                      source_name=_source_name(source))
    return load_resnet_into(variables, state, skip=skip, source_name=_source_name(source))



def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict in a weights file: `.safetensors` through `segjax.safetensors` (header
    bounded and checked before any tensor is read), anything else through
    `segjax.pth.read_state_dict`. Raises FileNotFoundError or PretrainedError."""
    if os.fspath(path).endswith('.safetensors'):
        return read_safetensors(path)
    return read_state_dict(path)


def _source_name(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else 'the state dict'


# ---------------------------------------------------------------------------------------------
# Hugging Face SegFormer: transformers' module paths <-> segjax.models.segformer's.

# The names on the hub (transformers < 5 modules; transformers >= 5 still saves them).
_SEGFORMER_HUB = (
    ('encoder.patch_embeddings.{i}.proj', 'backbone/patch_embed{i}'),
    ('encoder.patch_embeddings.{i}.layer_norm', 'backbone/patch_embed{i}_norm'),
    ('encoder.block.{i}.{j}.layer_norm_1', 'backbone/block{i}_{j}/norm1'),
    ('encoder.block.{i}.{j}.attention.self.query', 'backbone/block{i}_{j}/attention/query'),
    ('encoder.block.{i}.{j}.attention.self.key', 'backbone/block{i}_{j}/attention/key'),
    ('encoder.block.{i}.{j}.attention.self.value', 'backbone/block{i}_{j}/attention/value'),
    ('encoder.block.{i}.{j}.attention.self.sr', 'backbone/block{i}_{j}/attention/sr'),
    ('encoder.block.{i}.{j}.attention.self.layer_norm', 'backbone/block{i}_{j}/attention/sr_norm'),
    ('encoder.block.{i}.{j}.attention.output.dense', 'backbone/block{i}_{j}/attention/out'),
    ('encoder.block.{i}.{j}.layer_norm_2', 'backbone/block{i}_{j}/norm2'),
    ('encoder.block.{i}.{j}.mlp.dense1', 'backbone/block{i}_{j}/mlp/fc1'),
    ('encoder.block.{i}.{j}.mlp.dwconv.dwconv', 'backbone/block{i}_{j}/mlp/dwconv'),
    ('encoder.block.{i}.{j}.mlp.dense2', 'backbone/block{i}_{j}/mlp/fc2'),
    ('encoder.layer_norm.{i}', 'backbone/norm{i}'),
    ('decode_head.linear_c.{i}.proj', 'decode_head/linear_c{i}'),
)
# transformers >= 5's module names (what `model.state_dict()` gives there).
_SEGFORMER_V5 = (
    ('stages.{i}.patch_embeddings.proj', 'backbone/patch_embed{i}'),
    ('stages.{i}.patch_embeddings.layer_norm', 'backbone/patch_embed{i}_norm'),
    ('stages.{i}.blocks.{j}.layernorm_before', 'backbone/block{i}_{j}/norm1'),
    ('stages.{i}.blocks.{j}.attention.q_proj', 'backbone/block{i}_{j}/attention/query'),
    ('stages.{i}.blocks.{j}.attention.k_proj', 'backbone/block{i}_{j}/attention/key'),
    ('stages.{i}.blocks.{j}.attention.v_proj', 'backbone/block{i}_{j}/attention/value'),
    ('stages.{i}.blocks.{j}.attention.sequence_reduction.sequence_reduction',
     'backbone/block{i}_{j}/attention/sr'),
    ('stages.{i}.blocks.{j}.attention.sequence_reduction.layer_norm',
     'backbone/block{i}_{j}/attention/sr_norm'),
    ('stages.{i}.blocks.{j}.attention.o_proj', 'backbone/block{i}_{j}/attention/out'),
    ('stages.{i}.blocks.{j}.layernorm_after', 'backbone/block{i}_{j}/norm2'),
    ('stages.{i}.blocks.{j}.mlp.fc1', 'backbone/block{i}_{j}/mlp/fc1'),
    ('stages.{i}.blocks.{j}.mlp.dwconv.dwconv', 'backbone/block{i}_{j}/mlp/dwconv'),
    ('stages.{i}.blocks.{j}.mlp.fc2', 'backbone/block{i}_{j}/mlp/fc2'),
    ('stages.{i}.layer_norm', 'backbone/norm{i}'),
    ('decode_head.linear_projections.{i}.proj', 'decode_head/linear_c{i}'),
)
_SEGFORMER_HEAD = (('decode_head.linear_fuse', 'decode_head/linear_fuse'),
                   ('decode_head.batch_norm', 'decode_head/bn'),
                   ('decode_head.classifier', 'decode_head/classifier'))
_SEGFORMER_RULES = _SEGFORMER_HUB + _SEGFORMER_V5 + _SEGFORMER_HEAD


def is_segformer(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a transformers SegFormer (SegformerForSemanticSegmentation,
    SegformerForImageClassification or SegformerModel)."""
    return any(name.startswith(('segformer.', 'decode_head.linear_')) for name in state)


def segformer_to_segjax_name(module: str) -> str | None:
    """The segjax path of a transformers SegFormer module, e.g.
    'segformer.encoder.block.1.0.attention.self.query' -> 'backbone/block1_0/attention/query';
    None for modules segjax has no place for (an ImageNet `classifier`)."""
    return _translate(module.removeprefix('segformer.'), _SEGFORMER_RULES, to_segjax=True)


def _segformer_leaf(module: str, leaf: str, value: np.ndarray,
                    batch_norms: set[str]) -> tuple[str, str, np.ndarray] | None:
    """(collection, flax leaf, value in flax layout) of one tensor, or None if unknown."""
    if module in batch_norms:
        collection_leaf = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                           'running_mean': ('batch_stats', 'mean'),
                           'running_var': ('batch_stats', 'var')}.get(leaf)
        return None if collection_leaf is None else (*collection_leaf, value)
    if leaf == 'bias':
        return 'params', 'bias', value
    if leaf != 'weight':
        return None
    if value.ndim == 1:  # LayerNorm
        return 'params', 'scale', value
    # Linear (out, in) -> (in, out); convolution OIHW -> HWIO.
    return 'params', 'kernel', value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def load_segformer_into(variables: Mapping, state: Mapping[str, np.ndarray], *,
                        skip: Iterable[str] = (), source_name: str = 'the state dict') -> dict:
    """`variables` of a `segjax.models.segformer.SegFormer` with a transformers SegFormer
    state dict's weights.

    A full checkpoint (`decode_head.*` present) fills the whole model; an encoder checkpoint
    (`nvidia/mit-b*`) fills the 'backbone' and leaves the decoder as it was, its ImageNet
    `classifier.*` dropped. `skip` lists file name prefixes to leave out (their parameters keep
    their values): skip=('decode_head.classifier.',) fine-tunes a 150-class ADE20K model on
    another number of classes. All or nothing: unmapped names, parameters the model lacks or
    the file lacks, and shape mismatches (another MiT size) are raised together as one
    PretrainedError naming file and model names. Returns new variables (float32 numpy leaves).
    """
    skip = tuple(skip)
    tensors = {name: value for name, value in state.items()
               if not name.endswith('num_batches_tracked') and not name.startswith(skip)}
    decoder = any(name.startswith('decode_head.') for name in state)
    if not decoder:  # an ImageNet encoder: its classifier has no place in a segmentation model
        tensors = {n: v for n, v in tensors.items() if not n.startswith('classifier.')}
    batch_norms = {n.rsplit('.', 1)[0] for n in tensors if n.endswith('.running_mean')}
    targets = {c: _flatten(variables.get(c, {})) for c in ('params', 'batch_stats')}
    loaded = {c: {} for c in targets}
    sources, unmapped, not_in_model, mismatched = {}, [], [], []
    for name, value in tensors.items():
        module, leaf = name.rsplit('.', 1) if '.' in name else ('', name)
        target = segformer_to_segjax_name(module)
        converted = None if target is None else _segformer_leaf(
            module, leaf, np.asarray(value, np.float32), batch_norms)
        if converted is None:
            unmapped.append(name)
            continue
        collection, new_leaf, value = converted
        path = f'{target}/{new_leaf}'
        sources[(collection, path)] = name
        if path not in targets[collection]:
            not_in_model.append(f'{name} -> {collection}/{path}')
        elif tuple(targets[collection][path].shape) != value.shape:
            mismatched.append(f'{name} {value.shape} -> {collection}/{path} '
                              f'{tuple(targets[collection][path].shape)}')
        else:
            loaded[collection][path] = value
    skipped = {segformer_to_segjax_name(n.rsplit('.', 1)[0]) for n in state if n.startswith(skip)}
    missing = [f'{c}/{p}' for c, flat in targets.items() for p in flat
               if (c, p) not in sources and (decoder or p.startswith('backbone/'))
               and p.rsplit('/', 1)[0] not in skipped]
    problems = [(f'{len(unmapped)} names in the file map to no segjax parameter', unmapped),
                (f'{len(not_in_model)} names map to parameters this model does not have '
                 '(another MiT variant?)', not_in_model),
                (f'{len(mismatched)} shapes differ (file, converted to flax layout -> model)',
                 mismatched),
                (f'{len(missing)} model parameters are not in the file', missing)]
    if not any(items for _, items in problems):
        return {**variables, **{c: _replace(variables[c], loaded[c]) for c in targets
                                if c in variables}}
    lines = [f'cannot load {source_name} (a transformers SegFormer) into this model; nothing '
             'was loaded:']
    file_mit = _mit_layout(dict(_converted_kernels(tensors)))
    model_mit = _mit_layout({p: tuple(v.shape) for p, v in targets['params'].items()})
    if file_mit != model_mit and None not in (file_mit, model_mit):
        lines.append(f'  the file holds {_describe_mit(file_mit)} but the model is '
                     f'{_describe_mit(model_mit)}: build the model with hidden_sizes='
                     f'{file_mit[0]}, depths={file_mit[1]} (e.g. segformer.SegFormerB0..B5) '
                     'or use weights of its size')
    lines += problem_lines(problems)
    if any(item.startswith('decode_head.classifier.') for item in mismatched):
        lines.append("  (another number of classes: to train a new classifier, leave the file's "
                     "out with skip=('decode_head.classifier.',))")
    raise PretrainedError('\n'.join(lines))


def _converted_kernels(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, tuple]]:
    """('segjax/module/path/kernel', flax-layout shape) of a SegFormer file's 2-D+ weights."""
    kernels = []
    for name, value in tensors.items():
        module, leaf = name.rsplit('.', 1) if '.' in name else ('', name)
        target = segformer_to_segjax_name(module)
        if target is not None and leaf == 'weight' and value.ndim >= 2:
            shape = value.shape[::-1] if value.ndim == 2 else tuple(np.shape(value)[i]
                                                                     for i in (2, 3, 1, 0))
            kernels.append((f'{target}/kernel', shape))
    return kernels


def _mit_layout(kernels: Mapping[str, tuple]) -> tuple | None:
    """(hidden sizes, blocks per stage) of the MiT whose 'backbone/...' kernels (flax layout)
    are given, or None."""
    hidden = tuple(kernels[f'backbone/patch_embed{i}/kernel'][-1] for i in range(4)
                   if f'backbone/patch_embed{i}/kernel' in kernels)
    depths = tuple(len({m[1] for path in kernels
                        if (m := re.match(rf'backbone/block{stage}_(\d+)/', path))})
                   for stage in range(4))
    return (hidden, depths) if len(hidden) == 4 and 0 not in depths else None


def _describe_mit(layout: tuple) -> str:
    hidden, depths = layout
    return f'a MiT with hidden sizes {hidden} and {"-".join(map(str, depths))} blocks'


# ---------------------------------------------------------------------------------------------
# Hugging Face ViT / DINOv2: transformers' names <-> segjax.models.vit.VisionTransformer's.

# Tensor names relative to the encoder: hub names (ViT: query/intermediate/output, DINOv2:
# norm1/mlp) and transformers >= 5's in-memory names (q_proj ..., ViT's `layers.{i}`).
_VIT_RULES = (
    ('embeddings.cls_token', 'cls_token'),
    ('embeddings.position_embeddings', 'pos_embed'),
    ('embeddings.register_tokens', 'register_tokens'),
    ('embeddings.patch_embeddings.projection.weight', 'patch_embed_kernel'),
    ('embeddings.patch_embeddings.projection.bias', 'patch_embed_bias'),
    ('encoder.layer.{i}.attention.attention.query.{w}', 'block{i}/attention/query/{w}'),
    ('encoder.layer.{i}.attention.attention.key.{w}', 'block{i}/attention/key/{w}'),
    ('encoder.layer.{i}.attention.attention.value.{w}', 'block{i}/attention/value/{w}'),
    ('encoder.layer.{i}.attention.output.dense.{w}', 'block{i}/attention/out/{w}'),
    ('encoder.layer.{i}.layernorm_before.{w}', 'block{i}/norm1/{w}'),
    ('encoder.layer.{i}.layernorm_after.{w}', 'block{i}/norm2/{w}'),
    ('encoder.layer.{i}.intermediate.dense.{w}', 'block{i}/fc1/{w}'),
    ('encoder.layer.{i}.output.dense.{w}', 'block{i}/fc2/{w}'),
    ('{layers}.{i}.attention.q_proj.{w}', 'block{i}/attention/query/{w}'),
    ('{layers}.{i}.attention.k_proj.{w}', 'block{i}/attention/key/{w}'),
    ('{layers}.{i}.attention.v_proj.{w}', 'block{i}/attention/value/{w}'),
    ('{layers}.{i}.attention.o_proj.{w}', 'block{i}/attention/out/{w}'),
    ('{layers}.{i}.layernorm_before.{w}', 'block{i}/norm1/{w}'),
    ('{layers}.{i}.layernorm_after.{w}', 'block{i}/norm2/{w}'),
    ('{layers}.{i}.norm1.{w}', 'block{i}/norm1/{w}'),
    ('{layers}.{i}.norm2.{w}', 'block{i}/norm2/{w}'),
    ('{layers}.{i}.mlp.fc1.{w}', 'block{i}/fc1/{w}'),
    ('{layers}.{i}.mlp.fc2.{w}', 'block{i}/fc2/{w}'),
    ('{layers}.{i}.layer_scale1.lambda1', 'block{i}/layer_scale1'),
    ('{layers}.{i}.layer_scale2.lambda1', 'block{i}/layer_scale2'),
    ('layernorm.{w}', 'norm/{w}'),
)
# What a segmentation model has no place for: DINOv2's masked-image-modelling token, ViT's
# pooler and an ImageNet classifier.
_VIT_UNUSED = ('embeddings.mask_token', 'pooler.', 'classifier.')


@functools.cache
def _vit_patterns() -> tuple[tuple[re.Pattern, str], ...]:
    compiled = []
    for source, target in _VIT_RULES:
        regex = re.escape(source).replace(r'\{i\}', r'(?P<i>\d+)').replace(
            r'\{w\}', r'(?P<w>weight|bias)').replace(r'\{layers\}', r'(?:encoder\.layer|layers)')
        compiled.append((re.compile(regex), target))
    return tuple(compiled)


def is_vit(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a transformers ViT or DINOv2 (optionally under `vit.` or
    `dinov2.`, as the *ForImageClassification models save it)."""
    return any(_strip_vit_prefix(name) == 'embeddings.patch_embeddings.projection.weight'
               for name in state)


def _strip_vit_prefix(name: str) -> str:
    return name.removeprefix('vit.').removeprefix('dinov2.')


def vit_to_segjax_path(name: str) -> str | None:
    """The encoder-relative segjax parameter path of a transformers ViT/DINOv2 tensor, e.g.
    'encoder.layer.3.attention.attention.query.weight' -> 'block3/attention/query/kernel';
    None for names with no place (see _VIT_UNUSED) or unknown."""
    name = _strip_vit_prefix(name)
    for pattern, target in _vit_patterns():
        match = pattern.fullmatch(name)
        if match:
            groups = match.groupdict()
            leaf = groups.get('w')
            if leaf == 'weight':  # a Linear's weight is flax's kernel, a LayerNorm's its scale
                module = target.rsplit('/', 1)[0]
                leaf = 'scale' if re.search(r'(^|/)norm\d?$', module) else 'kernel'
            return target.format(i=groups.get('i'), w=leaf)
    return None


def _vit_value(path: str, value: np.ndarray) -> np.ndarray:
    """A tensor in flax layout: linear (out, in) -> (in, out), patch conv OIHW -> HWIO."""
    if path == 'patch_embed_kernel' and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if path.endswith('/kernel') and value.ndim == 2:
        return value.T
    return value


def _describe_vit(shapes: Mapping[str, tuple]) -> str:
    """'a ViT with hidden size 384, 12 blocks, 14x14 patches, a 37x37 position grid,
    4 registers' from encoder-relative parameter shapes (flax layout)."""
    parts = []
    if 'patch_embed_kernel' in shapes:
        kernel = shapes['patch_embed_kernel']
        parts += [f'hidden size {kernel[-1]}', f'{kernel[0]}x{kernel[1]} patches']
    blocks = {m[1] for p in shapes if (m := re.match(r'block(\d+)/', p))}
    parts.append(f'{len(blocks)} blocks')
    if 'pos_embed' in shapes:
        grid = math.isqrt(shapes['pos_embed'][1] - 1)
        parts.append(f'a {grid}x{grid} position grid')
    registers = shapes.get('register_tokens', (0, 0))[1]
    parts.append(f'{registers} register tokens')
    parts.append('LayerScale' if 'block0/layer_scale1' in shapes else 'no LayerScale')
    return 'a ViT with ' + ', '.join(parts)


def load_vit_into(variables: Mapping, state: Mapping[str, np.ndarray], *,
                  skip: Iterable[str] = (), source_name: str = 'the state dict') -> dict:
    """`variables` of a `segjax.models.vit.VisionTransformer` (or of a model with one as its
    'backbone': ViTLinear, Segmenter) with a transformers ViT/DINOv2 state dict's weights.

    Fills the encoder only; heads keep their values. DINOv2's `mask_token`, ViT's `pooler.*` and
    an ImageNet `classifier.*` are left out, as are names starting with a `skip` prefix (their
    parameters keep their values). All or nothing: unmapped names, parameters the model lacks
    or the file lacks, and shape mismatches are raised together as one PretrainedError naming
    the file's and the model's names and shapes, led by both encoders' sizes when they differ.
    Returns new variables (float32 numpy leaves).
    """
    skip = tuple(skip)
    params = _flatten(variables.get('params', {}))
    prefix = 'backbone/' if any(p.startswith('backbone/') for p in params) else ''
    targets = {p.removeprefix(prefix): v for p, v in params.items() if p.startswith(prefix)}
    loaded, covered, unmapped, not_in_model, mismatched, file_shapes = {}, set(), [], [], [], {}
    for name, value in state.items():
        if _strip_vit_prefix(name).startswith(_VIT_UNUSED):
            continue
        path = vit_to_segjax_path(name)
        if path is None:
            if not name.startswith(skip):
                unmapped.append(name)
            continue
        value = _vit_value(path, np.asarray(value, np.float32))
        file_shapes[path] = value.shape
        covered.add(path)
        if name.startswith(skip):
            continue
        if path not in targets:
            not_in_model.append(f'{name} {value.shape} -> params/{prefix}{path}')
        elif tuple(targets[path].shape) != value.shape:
            mismatched.append(f'{name} {value.shape} -> params/{prefix}{path} '
                              f'{tuple(targets[path].shape)}')
        else:
            loaded[prefix + path] = value
    missing = [f'params/{prefix}{p} {tuple(v.shape)}' for p, v in targets.items()
               if p not in covered]
    problems = load_problems(unmapped, not_in_model, mismatched, missing)
    if not any(items for _, items in problems):
        return {**variables, 'params': _replace(variables['params'], loaded)}
    lines = [f'cannot load {source_name} (a transformers ViT/DINOv2) into this model; nothing '
             'was loaded:']
    model_shapes = {p: tuple(v.shape) for p, v in targets.items()}
    if file_shapes and _describe_vit(file_shapes) != _describe_vit(model_shapes):
        lines.append(f'  the file holds {_describe_vit(file_shapes)} but the model\'s encoder '
                     f'is {_describe_vit(model_shapes)}: build it with the matching vit.* '
                     'variant (e.g. vit.ViTB16, vit.DINOv2S14, vit.DINOv2B14Reg)')
    lines += problem_lines(problems)
    raise PretrainedError('\n'.join(lines))
