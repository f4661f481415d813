"""`config.pretrained` for Mask R-CNN: segjax.pretrained.load_into with an ImageNet ResNet
(the backbone's ResNet) or a whole torchvision Mask R-CNN checkpoint (every module; COCO's 91
category-id outputs cut to segjax.data.coco's 81 labels). torch/torchvision build the files
(test-only oracles: skipped where absent); every tensor is random so equal means mapped."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import TINY_MASKRCNN

from segjax import pretrained
from segjax.data import coco
from segjax.instance.maskrcnn import MaskRCNN
from segjax.instance.torchvision_weights import load_maskrcnn, select_classes
from segjax.pth import PretrainedError


def flat(variables) -> dict:
    return traverse_util.flatten_dict(variables, sep='/')


def random_like(state: dict, seed: int) -> dict:
    """The state dict's names and shapes with random float32 values (integer buffers kept)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=v.shape).astype(np.float32) if v.dtype.is_floating_point
                else v.numpy()) for k, v in state.items()}


@functools.cache
def variable_shapes(num_classes: int):
    model = MaskRCNN(num_classes=num_classes, **TINY_MASKRCNN)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def random_variables(num_classes: int, seed: int) -> dict:
    """A TINY_MASKRCNN's variable tree with random values: what a freshly initialised state
    holds."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        variable_shapes(num_classes))


def torch_tiny_maskrcnn(num_classes: int):
    """torchvision's MaskRCNN with TINY_MASKRCNN's shapes: ResNet-18 + a 16-channel FPN, a
    32-wide box head, one 16-channel mask layer."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchMaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.misc import FrozenBatchNorm2d
    resnet = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(resnet, {f'layer{i}': str(i - 1) for i in range(1, 5)},
                               [64, 128, 256, 512], TINY_MASKRCNN['fpn_channels'])
    channels, width = TINY_MASKRCNN['fpn_channels'], TINY_MASKRCNN['representation_size']
    return TorchMaskRCNN(
        backbone, num_classes=None, box_head=TwoMLPHead(channels * 7 * 7, width),
        box_predictor=FastRCNNPredictor(width, num_classes),
        mask_head=MaskRCNNHeads(channels, TINY_MASKRCNN['mask_layers'], 1),
        mask_predictor=MaskRCNNPredictor(TINY_MASKRCNN['mask_layers'][-1],
                                         TINY_MASKRCNN['mask_dim_reduced'], num_classes))


@pytest.fixture(scope='module')
def coco_checkpoint(tv):
    """A torchvision Mask R-CNN state dict with COCO's 91 outputs, random values."""
    return random_like(torch_tiny_maskrcnn(91).state_dict(), seed=1)


def imagenet_resnet_expected(state: dict) -> dict:
    """{'collection/backbone/body/...': array}: where a torchvision ImageNet ResNet's tensors
    belong in a MaskRCNN, written out here independently of segjax's name rules."""
    expected = {}
    for name, value in state.items():
        if name.startswith('fc.') or name.endswith('num_batches_tracked'):
            continue
        module, leaf = name.rsplit('.', 1)
        module = re.sub(r'^layer(\d)\.(\d+)\.', r'layer\1_\2/', module)
        module = module.replace('downsample.0', 'downsample_conv').replace(
            'downsample.1', 'downsample_bn')
        if 'bn' in module.rsplit('/', 1)[-1]:
            collection, leaf = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                                'running_mean': ('batch_stats', 'mean'),
                                'running_var': ('batch_stats', 'var')}[leaf]
        else:  # the ResNet's convolutions have no bias
            collection, leaf, value = 'params', 'kernel', value.transpose(2, 3, 1, 0)
        expected[f'{collection}/backbone/body/{module}/{leaf}'] = value
    return expected


# ---------------------------------------------------------------------------------------------
# The class remap.

def test_select_classes_by_hand():
    """5 file classes cut to (0, 3, 1): rows 0, 3, 1; bbox_pred's rows in groups of 4."""
    state = {
        'roi_heads.box_predictor.cls_score.weight': np.arange(10.0).reshape(5, 2),
        'roi_heads.box_predictor.cls_score.bias': np.array([10.0, 11, 12, 13, 14]),
        'roi_heads.box_predictor.bbox_pred.weight': np.arange(20.0).reshape(20, 1),
        'roi_heads.box_predictor.bbox_pred.bias': np.arange(100.0, 120.0),
        'roi_heads.mask_predictor.mask_fcn_logits.weight': np.arange(5.0).reshape(5, 1, 1, 1),
        'roi_heads.mask_predictor.mask_fcn_logits.bias': np.array([-0.0, -1, -2, -3, -4]),
        'roi_heads.box_head.fc6.weight': np.ones((2, 3)),
    }
    cut = select_classes(state, (0, 3, 1))
    np.testing.assert_array_equal(cut['roi_heads.box_predictor.cls_score.weight'],
                                  [[0, 1], [6, 7], [2, 3]])
    np.testing.assert_array_equal(cut['roi_heads.box_predictor.cls_score.bias'], [10, 13, 11])
    np.testing.assert_array_equal(cut['roi_heads.box_predictor.bbox_pred.weight'][:, 0],
                                  [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7])
    np.testing.assert_array_equal(cut['roi_heads.box_predictor.bbox_pred.bias'],
                                  [100, 101, 102, 103, 112, 113, 114, 115, 104, 105, 106, 107])
    np.testing.assert_array_equal(
        cut['roi_heads.mask_predictor.mask_fcn_logits.weight'].reshape(-1), [0, 3, 1])
    np.testing.assert_array_equal(cut['roi_heads.mask_predictor.mask_fcn_logits.bias'],
                                  [0, -3, -1])
    assert cut['roi_heads.box_head.fc6.weight'] is state['roi_heads.box_head.fc6.weight']
    assert state['roi_heads.box_predictor.cls_score.bias'].shape == (5,)  # the input untouched


def test_coco_ids_of_some_labels():
    """segjax.data.coco's label -> torchvision's output, checked against COCO's category list:
    person is id 1, stop sign 13 (id 12 is unused), toothbrush 90."""
    assert coco.CLASS_NAMES[0] == 'person' and coco.COCO_CATEGORY_IDS[0] == 1
    assert coco.CLASS_NAMES[11] == 'stop sign' and coco.COCO_CATEGORY_IDS[11] == 13
    assert coco.CLASS_NAMES[79] == 'toothbrush' and coco.COCO_CATEGORY_IDS[79] == 90
    assert len(coco.COCO_CATEGORY_IDS) == 80 and coco.NUM_CLASSES == 81


# ---------------------------------------------------------------------------------------------
# (a) an ImageNet ResNet: the backbone's ResNet only.

def test_imagenet_resnet_fills_the_backbone_body_only(tv, tmp_path):
    torch, torchvision = tv
    state = random_like(torchvision.models.resnet18().state_dict(), seed=2)
    path = tmp_path / 'resnet18.pth'
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    before = random_variables(6, seed=3)

    loaded = flat(pretrained.load_into(before, path))

    expected = imagenet_resnet_expected(state)
    body = {p for p in loaded if '/backbone/body/' in p}
    assert body == set(expected)  # every ResNet leaf given, nothing else under body
    for path_, value in expected.items():
        np.testing.assert_array_equal(loaded[path_], value, err_msg=path_)
    unchanged = set(loaded) - body
    assert any(p.startswith('params/backbone/fpn/') for p in unchanged)
    assert {'params/rpn/conv/kernel', 'params/box_predictor/cls_score/kernel',
            'params/mask_predictor/conv5_mask/kernel'} <= unchanged
    for path_ in unchanged:  # FPN, RPN and RoI heads keep their initial values
        np.testing.assert_array_equal(loaded[path_], flat(before)[path_], err_msg=path_)


def test_another_resnet_names_the_file_depths_and_real_paths(tv, tmp_path):
    torch, torchvision = tv
    path = tmp_path / 'resnet34.pth'
    torch.save(torchvision.models.resnet34().state_dict(), path)
    variables = random_variables(6, seed=4)
    with pytest.raises(PretrainedError) as error:
        pretrained.load_into(variables, path)
    message = str(error.value)
    assert message.startswith(f"cannot load {path} into this Mask R-CNN's ResNet "
                              '(backbone/body); nothing was loaded'), message
    assert 'ResNet-34' in message and 'ResNet-18' in message
    assert 'params/backbone/body/layer1_2/conv1/kernel' in message  # the model's own paths
    assert not re.search(r'(params|batch_stats)/backbone/(?!body/)', message)


# ---------------------------------------------------------------------------------------------
# (b) a whole torchvision Mask R-CNN.

def test_coco_checkpoint_into_81_classes_takes_the_category_rows(coco_checkpoint):
    state = coco_checkpoint
    loaded = pretrained.load_into(random_variables(81, seed=5), state)
    params = loaded['params']
    score = state['roi_heads.box_predictor.cls_score.weight']  # [91, 32]
    deltas = state['roi_heads.box_predictor.bbox_pred.weight']  # [364, 32]
    masks = state['roi_heads.mask_predictor.mask_fcn_logits.weight']  # [91, 16, 1, 1]
    # By hand: label 0 background <- output 0, 1 person <- 1, 12 stop sign <- 13,
    # 80 toothbrush <- 90.
    for label, category in ((0, 0), (1, 1), (12, 13), (80, 90)):
        np.testing.assert_array_equal(params['box_predictor']['cls_score']['kernel'][:, label],
                                      score[category])
        np.testing.assert_array_equal(
            params['box_predictor']['bbox_pred']['kernel'][:, 4 * label:4 * label + 4],
            deltas[4 * category:4 * category + 4].T)
        np.testing.assert_array_equal(
            params['mask_predictor']['mask_fcn_logits']['kernel'][0, 0, :, label],
            masks[category, :, 0, 0])
    rows = np.array([0, *coco.COCO_CATEGORY_IDS])
    np.testing.assert_array_equal(params['box_predictor']['cls_score']['bias'],
                                  state['roi_heads.box_predictor.cls_score.bias'][rows])
    np.testing.assert_array_equal(
        params['box_predictor']['bbox_pred']['bias'].reshape(81, 4),
        state['roi_heads.box_predictor.bbox_pred.bias'].reshape(91, 4)[rows])
    np.testing.assert_array_equal(params['mask_predictor']['mask_fcn_logits']['bias'],
                                  state['roi_heads.mask_predictor.mask_fcn_logits.bias'][rows])

    # Everything else is the checkpoint's, as a 91-class model loads it (load_maskrcnn is
    # checked against torchvision's forward in test_maskrcnn.py).
    as_is = flat(load_maskrcnn(random_variables(91, seed=6), state))
    assert flat(pretrained.load_into(random_variables(91, seed=7), state)).keys() == \
        as_is.keys()
    ours = flat(loaded)
    predictors = ('params/box_predictor/', 'params/mask_predictor/mask_fcn_logits/')
    assert ours.keys() == as_is.keys()
    for path_, value in as_is.items():
        if not path_.startswith(predictors):
            np.testing.assert_array_equal(ours[path_], value, err_msg=path_)
    np.testing.assert_array_equal(  # a spot check of the conversion itself
        ours['params/rpn/conv/kernel'], state['rpn.head.conv.0.0.weight'].transpose(2, 3, 1, 0))


def test_old_rpn_names_load_the_same(coco_checkpoint):
    """Files saved before torchvision's RPNHead v2 (the published COCO weights) name its conv
    rpn.head.conv.*."""
    old = {k.replace('rpn.head.conv.0.0.', 'rpn.head.conv.'): v
           for k, v in coco_checkpoint.items()}
    assert 'rpn.head.conv.weight' in old
    variables = random_variables(91, seed=8)
    a = flat(pretrained.load_into(variables, coco_checkpoint))
    b = flat(pretrained.load_into(variables, old))
    for path_ in a:
        np.testing.assert_array_equal(a[path_], b[path_], err_msg=path_)


def test_other_class_counts_are_a_clear_error(tv, coco_checkpoint, tmp_path):
    torch, _ = tv
    path = tmp_path / 'maskrcnn_coco.pth'
    torch.save({k: torch.from_numpy(v) for k, v in coco_checkpoint.items()}, path)
    variables = random_variables(6, seed=9)
    with pytest.raises(PretrainedError) as error:
        pretrained.load_into(variables, path)
    message = str(error.value)
    assert message.startswith(f'cannot load {path} into this Mask R-CNN'), message
    assert 'have 91 classes' in message and 'the model has 6' in message
    # Leaving the predictors out trains new ones; everything else loads.
    skip = ('roi_heads.box_predictor.', 'roi_heads.mask_predictor.mask_fcn_logits.')
    loaded = flat(pretrained.load_into(variables, path, skip=skip))
    before = flat(variables)
    np.testing.assert_array_equal(loaded['params/box_predictor/cls_score/kernel'],
                                  before['params/box_predictor/cls_score/kernel'])
    np.testing.assert_array_equal(loaded['params/box_head/fc6/kernel'],
                                  coco_checkpoint['roi_heads.box_head.fc6.weight'].T)


def test_detection_checkpoint_into_a_semantic_model_is_refused(coco_checkpoint):
    variables = {'params': {'backbone': {'conv1': {'kernel': np.zeros((7, 7, 3, 64))}}}}
    with pytest.raises(PretrainedError, match='torchvision detection checkpoint.*MaskRCNN'):
        pretrained.load_into(variables, coco_checkpoint)


def test_missing_tensors_name_the_file(tv, coco_checkpoint, tmp_path):
    torch, _ = tv
    path = tmp_path / 'partial.pth'
    state = {k: torch.from_numpy(v) for k, v in coco_checkpoint.items()
             if not k.startswith('roi_heads.mask_head.')}
    torch.save(state, path)
    variables = random_variables(91, seed=10)
    with pytest.raises(PretrainedError) as error:
        pretrained.load_into(variables, path)
    message = str(error.value)
    assert message.startswith(f'cannot load {path} into Mask R-CNN; nothing was loaded')
    assert 'params/mask_head/mask_fcn1/kernel: not in the state dict' in message


# ---------------------------------------------------------------------------------------------
# Through the command line.

@pytest.mark.slow  # three CLI runs of the synthetic Mask R-CNN: minutes
def test_config_pretrained_in_train_runs(tv, tmp_path, e2e_data):
    from helpers import restored_state
    from test_end_to_end import run_cli
    from test_instance_trainer import EXPERIMENT, SMOKE_OVERRIDES

    from segjax.data import synthetic
    torch, torchvision = tv
    overrides = [*SMOKE_OVERRIDES, f'--config.data.data_dir={e2e_data}',
                 '--config.trainer.trainable_backbone_layers=3']  # conv1, layer1 frozen

    # (a) An ImageNet ResNet-18 .pth: 2 steps; the frozen parts still hold the file's values.
    # torchvision's initialisation (finite activations), BatchNorm statistics drawn at random.
    rng = np.random.default_rng(11)
    state = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
    for name in [n for n in state if n.endswith('.running_var')]:
        module = name.removesuffix('.running_var')
        channels = state[name].shape[0]
        state[f'{module}.weight'] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state[f'{module}.bias'] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[f'{module}.running_mean'] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[name] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    weights = tmp_path / 'resnet18.pth'
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, weights)
    run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', tmp_path / 'run', *overrides,
            '--config.num_steps=2', f'--config.pretrained={weights}')
    trained = restored_state(EXPERIMENT, tmp_path / 'run', [*overrides, '--config.num_steps=2'])
    assert int(trained.step) == 2
    ours = flat({'params': trained.params, 'batch_stats': trained.batch_stats})
    expected = imagenet_resnet_expected(state)
    frozen = [p for p in expected
              if p.startswith('batch_stats/') or '/body/conv1/' in p or '/body/layer1_' in p]
    assert len(frozen) > 20
    for path_ in frozen:  # BatchNorm statistics, conv1 and layer1 never train
        np.testing.assert_array_equal(ours[path_], expected[path_], err_msg=path_)
    moved = 'params/backbone/body/layer4_1/conv2/kernel'
    assert np.abs(ours[moved] - expected[moved]).max() > 0  # layer4 trained from the file

    # A file of another ResNet: one line on stderr naming it, exit 1.
    other = tmp_path / 'resnet34.pth'
    torch.save(torchvision.models.resnet34().state_dict(), other)
    run = run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', tmp_path / 'bad',
                  *overrides, '--config.num_steps=2', f'--config.pretrained={other}',
                  check=False)
    assert run.returncode == 1, run.stderr[-2000:]
    assert f'segjax.train: error: cannot load {other} into this Mask R-CNN' in run.stderr

    # (b) A whole torchvision Mask R-CNN, evaluated without training (--config.num_steps=0).
    detector = tmp_path / 'maskrcnn.pth'
    torch.save(torch_tiny_maskrcnn(len(synthetic.CLASS_NAMES)).state_dict(), detector)
    run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', tmp_path / 'eval', *overrides,
            '--config.num_steps=0', f'--config.pretrained={detector}')
    metrics = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    assert metrics['step'] == 0 and {'bbox/AP', 'segm/AP'} <= set(metrics)

    # segjax.evaluate on a workdir without checkpoints evaluates config.pretrained directly.
    run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', tmp_path / 'direct',
            *overrides, f'--config.pretrained={detector}')
    evaluated = json.loads((tmp_path / 'direct' / 'eval' / 'metrics.json').read_text())
    for key in ('bbox/AP', 'bbox/AP50', 'segm/AP', 'segm/AP50'):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-9), key
    # Without either: one line saying what to give.
    run = run_cli('segjax.evaluate', '--config', EXPERIMENT, '--workdir', tmp_path / 'empty',
                  *overrides, check=False)
    assert run.returncode == 1 and '--config.pretrained=<weights file>' in run.stderr
