"""segjax.pretrained: safe reading of .pth/.safetensors, name/layout mapping, clear errors, and
numerical parity with torchvision (torch is a test-only oracle: those tests skip without it)."""

import io
import json
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import pretrained, pth
from segjax.models import deeplab, fcn, resnet


def _zeros_like_variables(model, shape=(1, 64, 64, 3)) -> dict:
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def _write_safetensors(path, tensors: dict) -> None:
    """The safetensors format by hand: u64 header length, JSON header, raw little-endian data."""
    codes = {np.dtype(np.float32): 'F32', np.dtype(np.int64): 'I64'}
    header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
    for name, value in tensors.items():
        value = np.ascontiguousarray(value)
        header[name] = {'dtype': codes[value.dtype], 'shape': list(value.shape),
                        'data_offsets': [offset, offset + value.nbytes]}
        blobs.append(value.tobytes())
        offset += value.nbytes
    text = json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def _torchvision_state_dict(variables: dict, prefix: str = '') -> dict:
    """A segjax ResNet's variables under torchvision's names and layouts (the inverse map)."""
    state = {}
    for collection in ('params', 'batch_stats'):
        flat = {'/'.join(k.key for k in path): np.asarray(v) for path, v in
                jax.tree_util.tree_leaves_with_path(variables[collection]['backbone'])}
        for path, value in flat.items():
            module, leaf = path.rsplit('/', 1)
            module = (module.replace('/', '.').replace('_', '.').replace('downsample.conv',
                      'downsample.0').replace('downsample.bn', 'downsample.1'))
            if leaf == 'kernel':
                state[f'{prefix}{module}.weight'] = value.transpose(3, 2, 0, 1)
            else:
                torch_leaf = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                              'var': 'running_var'}[leaf]
                state[f'{prefix}{module}.{torch_leaf}'] = value
            if leaf == 'var':
                state[f'{prefix}{module}.num_batches_tracked'] = np.array(7, np.int64)
    return state


def _random_variables(model, shape=(1, 32, 32, 3), seed=1) -> dict:
    # numpy draws rather than model.init: initialising a ResNet takes seconds to compile.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                        _zeros_like_variables(model, shape))


def _tiny_deeplab(**kwargs):
    return deeplab.DeepLabV3(num_classes=3, depth=18, base_width=8, channels=8, **kwargs)


# ------------------------------------------------------------------------------- safety

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: call os.system on load
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_refuses_a_pth_that_tries_to_run_code(tmp_path, layout):
    marker = tmp_path / 'pwned'
    payload = pickle.dumps({'conv1.weight': _RunsCode(marker)}, protocol=2)
    path = tmp_path / 'evil.pth'
    if layout == 'zip':  # torch.save's zip layout: <name>/data.pkl + <name>/data/<key>
        with zipfile.ZipFile(path, 'w') as archive:
            archive.writestr('evil/data.pkl', payload)
            archive.writestr('evil/version', '3\n')
    else:  # the legacy layout starts with a pickle too
        path.write_bytes(payload)
    with pytest.raises(pth.UnsafePickleError, match=r'refusing to load (posix|os)\.system'):
        pretrained.read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize('module', [b'builtins', b'__builtin__'])
def test_refuses_other_globals_by_their_python3_names(tmp_path, module):
    # GLOBAL '<module> eval' by hand, protocol 2; Python 2's `__builtin__` (what pickle.dumps
    # writes for protocols <= 2) is named as Python 3 spells it, which is what a user searches.
    path = tmp_path / 'eval.pth'
    path.write_bytes(b"\x80\x02c" + module + b"\neval\nX\x03\x00\x00\x001+1\x85R.")
    with pytest.raises(pth.UnsafePickleError, match=r'refusing to load builtins\.eval:'):
        pretrained.read_state_dict(path)
    assert pickle.dumps(eval, protocol=2) == b'\x80\x02c__builtin__\neval\nq\x00.'


# ------------------------------------------------------------------------ names and errors

@pytest.mark.parametrize('torch_name, segjax_name', [
    ('conv1', 'backbone/conv1'),
    ('layer3.5.conv2', 'backbone/layer3_5/conv2'),
    ('layer1.0.downsample.1', 'backbone/layer1_0/downsample_bn'),
    ('stem.6', 'backbone/stem_conv3'),  # mmcv / mmsegmentation ResNetV1c
    ('backbone.layer4.2.bn3', 'backbone/layer4_2/bn3'),
    ('classifier.0.convs.4.1', 'aspp/pooling/conv'),  # torchvision DeepLabV3 (below: its head)
    ('aux_classifier.4', 'aux_head/classifier'),
    ('fc', 'fc'),
    ('layer1.0.relu', None),
])
def test_torch_names(torch_name, segjax_name):
    modules = {'classifier.0.convs.0.0'} if 'classifier' in torch_name else set()
    assert pretrained.torch_to_segjax_name(torch_name, modules | {torch_name}) == segjax_name


def test_timm_deep_stem_names():
    modules = {'conv1.0', 'conv1.1', 'conv1.3', 'conv1.4', 'conv1.6', 'bn1'}
    assert pretrained.torch_to_segjax_name('conv1.4', modules) == 'backbone/stem_bn2'
    assert pretrained.torch_to_segjax_name('bn1', modules) == 'backbone/stem_bn3'


def test_safetensors_imagenet_backbone_round_trip(tmp_path):
    """An ImageNet ResNet file fills the backbone exactly; heads keep their values; fc is
    left out because a segmentation model has none."""
    model = _tiny_deeplab()
    source = _random_variables(model)
    state = _torchvision_state_dict(source)
    state['fc.weight'], state['fc.bias'] = np.ones((10, 64), np.float32), np.ones(10, np.float32)
    _write_safetensors(tmp_path / 'r18.safetensors', state)

    target = _zeros_like_variables(model, (1, 32, 32, 3))
    loaded = pretrained.load_into(target, tmp_path / 'r18.safetensors')
    for collection in ('params', 'batch_stats'):
        jax.tree.map(np.testing.assert_array_equal, loaded[collection]['backbone'],
                     source[collection]['backbone'])
    jax.tree.map(np.testing.assert_array_equal, loaded['params']['aspp'],
                 target['params']['aspp'])


def test_errors_list_every_problem_and_load_nothing():
    model = _tiny_deeplab()
    target = _zeros_like_variables(model, (1, 32, 32, 3))
    source = _random_variables(model)
    state = _torchvision_state_dict(source)
    del state['layer2.1.conv1.weight']  # missing
    state['layer4.0.conv2.weight'] = np.zeros((64, 64, 5, 5), np.float32)  # wrong shape
    state['layer1.0.se.fc1.weight'] = np.zeros((4, 16, 1, 1), np.float32)  # maps to nothing
    with pytest.raises(pretrained.PretrainedError) as error:
        pretrained.load_into(target, state)
    message = str(error.value)
    assert 'nothing was loaded' in message
    assert 'layer1.0.se.fc1.weight' in message
    assert 'params/backbone/layer2_1/conv1/kernel' in message
    assert 'layer4.0.conv2.weight (5, 5, 64, 64) -> params/backbone/layer4_0/conv2/kernel ' \
           '(3, 3, 64, 64)' in message
    # A segmentation checkpoint's aux head needs a model with one.
    seg_state = {'backbone.' + k: v for k, v in _torchvision_state_dict(source).items()}
    seg_state['aux_classifier.4.bias'] = np.zeros(3, np.float32)
    with pytest.raises(pretrained.PretrainedError, match='aux_head=True'):
        pretrained.load_into(target, seg_state)


def test_a_backbone_of_another_depth_or_width_is_named_as_such():
    """A ResNet-18 of width 8 into a ResNet-10 of width 4: one headline naming both and the
    settings that fit, not 100 shape mismatches ending in a hint about classifiers."""
    source = _torchvision_state_dict(_random_variables(_tiny_deeplab()))
    target = _zeros_like_variables(deeplab.DeepLabV3(num_classes=3, depth=10, base_width=4,
                                                     channels=8), (1, 32, 32, 3))
    with pytest.raises(pretrained.PretrainedError) as error:
        pretrained.load_into(target, source)
    message = str(error.value)
    assert ("the file holds a ResNet-18 (basic blocks 2-2-2-2, base_width 8) but the model's "
            "backbone is a ResNet-10 (basic blocks 1-1-1-1, base_width 4): build the model with "
            "depth=18, base_width=8, deep_stem=False") in message
    assert 'skip=' not in message
    assert '... and' in message and len(message.splitlines()) < 40
    # A file that fits but lacks parameters names them as the file would.
    del source['layer2.1.bn1.running_var'], source['layer3.0.downsample.0.weight']
    target = _zeros_like_variables(_tiny_deeplab(), (1, 32, 32, 3))
    with pytest.raises(pretrained.PretrainedError) as error:
        pretrained.load_into(target, source)
    assert ('batch_stats/backbone/layer2_1/bn1/var (file name: layer2.1.bn1.running_var)'
            in str(error.value))
    assert ('params/backbone/layer3_0/downsample_conv/kernel (file name: '
            'layer3.0.downsample.0.weight)' in str(error.value))
    assert 'the file holds' not in str(error.value)


@pytest.mark.parametrize('torch_module', [
    'backbone.layer2.1.downsample.1', 'backbone.conv1.4', 'classifier.0.convs.4.2',
    'classifier.0.convs.3.0', 'classifier.0.project.1', 'aux_classifier.1'])
def test_names_map_back_to_the_files_names(torch_module):
    modules = {'backbone.conv1.0', 'classifier.0.convs.0.0', torch_module}
    path = pretrained.torch_to_segjax_name(torch_module, modules)
    assert path is not None and pretrained.segjax_to_torch_name(path, modules) == torch_module


def test_a_model_without_a_resnet_backbone_is_an_error():
    from segjax.models import segnet
    target = _zeros_like_variables(segnet.SegNet(num_classes=3, base_width=4), (1, 32, 32, 3))
    with pytest.raises(pretrained.PretrainedError, match='does not have'):
        pretrained.load_into(target, {'conv1.weight': np.zeros((4, 3, 7, 7), np.float32)})


# ------------------------------------------------------------------ torchvision as an oracle

def _randomized(model):
    """A torchvision model with random BatchNorm statistics and affine parameters (so a
    mix-up of mean/var or scale/bias shows), in eval mode; residual branches are damped as in a
    trained ResNet so the logits stay O(1) and float32 round-off stays far below 1e-4."""
    import torch

    generator = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            if name.endswith('bn3'):
                module.weight.data *= 0.2
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5
    return model.eval()


def _torch_logits(model, images: np.ndarray):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    if isinstance(out, dict):
        return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}
    return out.numpy()


def _assert_parity(reference, ours):
    assert np.std(reference) > 0.05  # a meaningful comparison, not of two constants
    assert float(np.abs(np.asarray(ours) - reference).max()) < 1e-4


def test_resnet50_matches_torchvision(tmp_path):
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    reference = _randomized(torchvision.models.resnet50())
    torch.save(reference.state_dict(), tmp_path / 'resnet50.pth')  # the zip format
    images = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)

    model = resnet.ResNetClassifier(depth=50)
    variables = pretrained.load_into(_zeros_like_variables(model), tmp_path / 'resnet50.pth')
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    _assert_parity(_torch_logits(reference, images), ours)


def test_fcn_resnet50_matches_torchvision(tmp_path):
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    reference = _randomized(torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=False))
    path = tmp_path / 'fcn.pth'
    torch.save({'state_dict': reference.state_dict()}, path, _use_new_zipfile_serialization=False)
    # Not a multiple of the stride: torch's padding/ceil arithmetic and the non-integer
    # bilinear upsampling (align_corners=False = jax.image.resize 'bilinear') must agree.
    images = np.random.default_rng(0).normal(size=(1, 57, 75, 3)).astype(np.float32)

    model = fcn.FCNResNet50(num_classes=21)
    variables = pretrained.load_into(_zeros_like_variables(model, images.shape), path)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert ours.shape == (1, 57, 75, 21)
    _assert_parity(_torch_logits(reference, images)['out'], ours)


def test_deeplabv3_resnet50_with_aux_matches_torchvision(tmp_path):
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    reference = _randomized(torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, aux_loss=True))
    _write_safetensors(tmp_path / 'deeplab.safetensors',
                       {k: v.numpy() for k, v in reference.state_dict().items()})
    images = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)

    model = deeplab.DeepLabV3ResNet50(num_classes=21, aux_head=True)
    variables = pretrained.load_into(_zeros_like_variables(model),
                                     tmp_path / 'deeplab.safetensors')
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    expected = _torch_logits(reference, images)
    _assert_parity(expected['out'], ours['logits'])
    _assert_parity(expected['aux'], ours['aux'])


def test_reads_what_torch_save_writes(tmp_path):
    torch = pytest.importorskip('torch')
    state = {'a': torch.randn(2, 3), 'b': torch.randn(3, 2).t(),  # a non-contiguous view
             'c': torch.arange(6, dtype=torch.bfloat16)[1:5], 'n': torch.tensor(5),
             'p': torch.nn.Parameter(torch.ones(2))}
    for zip_format in (True, False):
        buffer = io.BytesIO()
        torch.save({'model': {'module.' + k: v for k, v in state.items()}}, buffer,
                   _use_new_zipfile_serialization=zip_format)
        path = tmp_path / f'state_{zip_format}.pth'
        path.write_bytes(buffer.getvalue())
        loaded = pretrained.read_state_dict(path)
        assert sorted(loaded) == sorted(state)
        for name, value in state.items():
            np.testing.assert_array_equal(loaded[name], value.detach().float().numpy())
        assert loaded['n'].dtype == np.int64 and loaded['b'].shape == (2, 3)


@pytest.mark.slow  # a whole run or several processes: CI's slow line
def test_config_pretrained_loads_the_backbone_of_a_training_run(tmp_path, e2e_data):
    from test_end_to_end import ROOT, run_cli, tiny_overrides

    from segjax import config as config_lib
    from segjax import experiment, sharding

    experiment_file = os.path.join(ROOT, 'experiments', 'fcn_resnet_synthetic.py')
    model = fcn.FCNResNet(num_classes=8, depth=18, base_width=4, output_stride=8, aux_head=True)
    weights = _random_variables(model)
    _write_safetensors(tmp_path / 'r18.safetensors', _torchvision_state_dict(weights))
    overrides = tiny_overrides(e2e_data, num_steps=1, **{
        'model.base_width': 4, 'model.depth': 18, 'optimizer.lr': 0.0,
        'pretrained': str(tmp_path / 'r18.safetensors')})
    run_cli('segjax.train', '--config', experiment_file, '--workdir', tmp_path / 'run',
            *overrides)
    config = config_lib.load(experiment_file, [o[len('--config.'):] for o in overrides])
    _, state = experiment.restore_state(config, str(tmp_path / 'run'), sharding.make_mesh())
    # Learning rate 0: after one step the backbone still holds exactly the file's weights.
    for got, want in zip(jax.tree.leaves(state.params['backbone']),
                         jax.tree.leaves(weights['params']['backbone']), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    # A workdir without checkpoints: segjax.evaluate / predict's state is the file's weights.
    _, direct = experiment.restore_state(config, str(tmp_path / 'empty'), sharding.make_mesh())
    assert int(direct.step) == 0
    for got, want in zip(jax.tree.leaves(direct.params['backbone']),
                         jax.tree.leaves(weights['params']['backbone']), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    missing = run_cli('segjax.train', '--config', experiment_file, '--workdir', tmp_path / 'x',
                      *overrides[:-1], f'--config.pretrained={tmp_path / "nope.pth"}',
                      check=False)
    assert missing.returncode != 0 and 'nope.pth' in missing.stderr
    assert 'Traceback' not in missing.stderr
