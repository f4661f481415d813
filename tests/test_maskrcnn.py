"""segjax.instance RoI heads, detection post-processing, mask pasting and the whole eval-mode
Mask R-CNN, against torchvision (a test-only oracle; these tests skip where it is missing)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    nchw,
    nhwc,
    numpy_state_dict,
    spread_scores,
    torch_maskrcnn_resnet18,
    variables_from_torch,
)

from segjax.instance import postprocess
from segjax.instance.boxes import box_iou, large_enough
from segjax.instance.maskrcnn import MaskRCNN
from segjax.instance.roi_align import multiscale_roi_align
from segjax.instance.roi_heads import (
    FastRCNNPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    TwoMLPHead,
)
from segjax.instance.torchvision_weights import (
    load_maskrcnn,
    load_roi_heads,
    torch_transposed_kernel,
)
from segjax.models.ops import ConvTranspose2x2
from segjax.pth import PretrainedError, read_state_dict


def random_boxes(rng: np.random.Generator, count: int, extent: float, max_size: float
                 ) -> np.ndarray:
    corner = rng.uniform(-0.1 * extent, extent, (count, 2))
    size = rng.uniform(1, max_size, (count, 2))
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# RoI heads.

def test_transposed_kernel_flip_matches_torch(tv):
    """torch's ConvTranspose2d weight [in, out, kh, kw] -> flax's kernel: the spatial flip."""
    torch, _ = tv
    layer = torch.nn.ConvTranspose2d(4, 3, 2, 2)
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 4)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(layer(torch.from_numpy(nchw(x))))
    params = {'kernel': torch_transposed_kernel(layer.weight.detach().numpy()),
              'bias': layer.bias.detach().numpy()}
    assert not np.allclose(params['kernel'], params['kernel'][::-1, ::-1])  # a flip matters
    for module in (ConvTranspose2x2(3), nn.ConvTranspose(3, (2, 2), strides=(2, 2))):
        ours = module.apply({'params': params}, jnp.asarray(x))
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def _torch_roi_heads(torch, channels, representation, num_classes, mask_width):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TorchPredictor
    from torchvision.models.detection.faster_rcnn import TwoMLPHead as TorchTwoMLP
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads as TorchMaskHeads
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor as TorchMaskPredictor
    modules = torch.nn.ModuleDict({
        'box_head': TorchTwoMLP(channels * 7 * 7, representation),
        'box_predictor': TorchPredictor(representation, num_classes),
        'mask_head': TorchMaskHeads(channels, [mask_width] * 4, 1),
        'mask_predictor': TorchMaskPredictor(mask_width, mask_width, num_classes)})
    with torch.no_grad():
        for name, parameter in modules.named_parameters():
            if name.endswith('bias'):
                parameter.normal_(0, 0.1)
    return modules.eval()


def _our_roi_heads(representation, num_classes, mask_width):
    return {'box_head': TwoMLPHead(representation),
            'box_predictor': FastRCNNPredictor(num_classes),
            'mask_head': MaskRCNNHeads((mask_width,) * 4),
            'mask_predictor': MaskRCNNPredictor(num_classes, mask_width)}


def test_roi_heads_match_torchvision(tv):
    """Box and mask heads on the same RoIs (pooled by MultiScaleRoIAlign from random FPN
    levels), weights through load_roi_heads: outputs to 1e-4."""
    torch, torchvision = tv
    channels, representation, num_classes, mask_width = 8, 32, 5, 12
    torch_heads = _torch_roi_heads(torch, channels, representation, num_classes, mask_width)
    rng = np.random.default_rng(1)
    image_size = (64, 96)
    features = [rng.normal(size=(2, 64 // s, 96 // s, channels)).astype(np.float32)
                for s in (4, 8, 16, 32)]
    given = random_boxes(rng, 2 * 10, 90, 70).reshape(2, 10, 4)
    torch_features = {str(i): torch.from_numpy(nchw(f)) for i, f in enumerate(features)}
    with torch.no_grad():
        box_pool = torchvision.ops.MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 2)
        mask_pool = torchvision.ops.MultiScaleRoIAlign(['0', '1', '2', '3'], 14, 2)
        boxes = [torch.from_numpy(b) for b in given]
        box_features = box_pool(torch_features, boxes, [image_size] * 2)
        mask_features = mask_pool(torch_features, boxes, [image_size] * 2)
        expected_logits, expected_deltas = torch_heads['box_predictor'](
            torch_heads['box_head'](box_features))
        expected_masks = torch_heads['mask_predictor'](torch_heads['mask_head'](mask_features))
        state = {f'roi_heads.{k}': v.numpy() for k, v in torch_heads.state_dict().items()}

    heads = _our_roi_heads(representation, num_classes, mask_width)
    # Jitted: eagerly, RoIAlign's many small ops each compile on their own (seconds).
    pool = jax.jit(multiscale_roi_align, static_argnums=(2, 3))
    pooled_boxes = pool([jnp.asarray(f) for f in features], jnp.asarray(given), image_size,
                        (7, 7))
    pooled_masks = pool([jnp.asarray(f) for f in features], jnp.asarray(given), image_size,
                        (14, 14))
    key = jax.random.key(0)
    hidden_shape = jax.ShapeDtypeStruct((2, 10, representation), jnp.float32)
    mask_shape = jax.ShapeDtypeStruct((2, 10, 14, 14, mask_width), jnp.float32)
    template = {'params': {
        'box_head': jax.eval_shape(heads['box_head'].init, key, pooled_boxes)['params'],
        'box_predictor': jax.eval_shape(heads['box_predictor'].init, key,
                                        hidden_shape)['params'],
        'mask_head': jax.eval_shape(heads['mask_head'].init, key, pooled_masks)['params'],
        'mask_predictor': jax.eval_shape(heads['mask_predictor'].init, key,
                                         mask_shape)['params']}}
    params = load_roi_heads(template, state)['params']

    def apply(name, x):
        return jax.jit(heads[name].apply)({'params': params[name]}, x)

    logits, deltas = apply('box_predictor', apply('box_head', pooled_boxes))
    assert deltas.shape == (2, 10, num_classes, 4)
    np.testing.assert_allclose(logits.reshape(20, -1), expected_logits.numpy(), atol=1e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(deltas.reshape(20, -1), expected_deltas.numpy(), atol=1e-4,
                               rtol=1e-4)
    masks = apply('mask_predictor', apply('mask_head', pooled_masks))
    assert masks.shape == (2, 10, 28, 28, num_classes)
    np.testing.assert_allclose(masks.reshape(20, 28, 28, -1), nhwc(expected_masks), atol=1e-4,
                               rtol=1e-4)

    # The published COCO file's older mask-head names (mask_fcn1..4) load the same weights.
    old_names = {re.sub(r'mask_head\.(\d)\.0\.', lambda m: f'mask_head.mask_fcn{int(m[1]) + 1}.',
                        k): v for k, v in state.items()}
    assert 'roi_heads.mask_head.mask_fcn4.weight' in old_names
    old = load_roi_heads(template, old_names)['params']
    np.testing.assert_array_equal(old['mask_head']['mask_fcn3']['kernel'],
                                  params['mask_head']['mask_fcn3']['kernel'])
    # An entry that maps to nothing and a missing one are both named.
    state['roi_heads.box_head.fc8.weight'] = state.pop('roi_heads.box_head.fc7.weight')
    with pytest.raises(PretrainedError, match=r'fc8\.weight(.|\n)*params/box_head/fc7/kernel'):
        load_roi_heads(template, state)


# --------------------------------------------------------------------------------------------
# Detection post-processing.

def _torch_postprocess(score_thresh, nms_thresh, detections):
    from torchvision.models.detection.roi_heads import RoIHeads
    return RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, nms_thresh,
                    detections)


@pytest.mark.parametrize('proposals_per_image, logit_scale, max_detections',
                         [(60, 2.0, 100), (300, 1.0, 100), (300, 3.0, 25)])
def test_detect_matches_torchvision(tv, proposals_per_image, logit_scale, max_detections):
    """Random box-head outputs on random proposals of two images of different sizes, padded
    with invalid proposals: the same detections, in the same order, as
    RoIHeads.postprocess_detections. (300, 1.0): over 1000 candidates, torchvision's per-class
    path; (60, 2.0): its coordinate-trick path; 25 detections: the cut."""
    torch, _ = tv
    rng = np.random.default_rng(2)
    num_classes, padded = 6, proposals_per_image + 7
    image_sizes = np.array([[64, 96], [50, 70]], np.int32)
    counts = [proposals_per_image, proposals_per_image - 9]
    proposals = random_boxes(rng, 2 * padded, 80, 40).reshape(2, padded, 4)
    # Clusters of near-identical proposals so that NMS has work to do.
    pairs = padded // 2 * 2
    proposals[:, 1:pairs:2] = proposals[:, 0:pairs:2] + rng.normal(
        0, 1.5, proposals[:, 1:pairs:2].shape)
    logits = (rng.normal(size=(2, padded, num_classes)) * logit_scale).astype(np.float32)
    deltas = rng.normal(0, 0.5, (2, padded, num_classes, 4)).astype(np.float32)
    valid = np.arange(padded)[None] < np.array(counts)[:, None]
    heads = _torch_postprocess(0.05, 0.5, max_detections)
    expected_boxes, expected_scores, expected_labels = heads.postprocess_detections(
        torch.from_numpy(np.concatenate([logits[b, :c] for b, c in enumerate(counts)])),
        torch.from_numpy(np.concatenate([deltas[b, :c].reshape(c, -1)
                                         for b, c in enumerate(counts)])),
        [torch.from_numpy(proposals[b, :c]) for b, c in enumerate(counts)],
        [tuple(s) for s in image_sizes.tolist()])

    run = jax.jit(jax.vmap(lambda *a: postprocess.detect(*a, max_detections=max_detections)))
    out = run(jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(proposals),
              jnp.asarray(valid), jnp.asarray(image_sizes))
    assert out['boxes'].shape == (2, max_detections, 4)
    for b in range(2):
        kept = np.asarray(out['valid'][b])
        count = len(expected_scores[b])
        assert count > 5 and kept.sum() == count and kept[:count].all()
        np.testing.assert_array_equal(np.asarray(out['labels'][b])[:count],
                                      expected_labels[b].numpy())
        np.testing.assert_allclose(np.asarray(out['scores'][b])[:count],
                                   expected_scores[b].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out['boxes'][b])[:count],
                                   expected_boxes[b].numpy(), rtol=1e-5, atol=1e-3)
        assert not np.asarray(out['boxes'][b])[count:].any()


def test_nms_per_class_by_hand():
    # Class 0: box 1 overlaps box 0 (IoU 0.81) and goes; class 1: box 0 is no candidate, so
    # the same box 1 stays there. Box 2 overlaps nothing.
    given = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40.]])
    boxes = jnp.stack([given, given])
    scores = jnp.array([[0.9, 0.8, 0.1], [0.9, 0.8, 0.7]])
    candidates = jnp.array([[True, True, True], [False, True, True]])
    keep = jax.jit(postprocess.nms_per_class, static_argnums=3)(boxes, scores, candidates, 0.5)
    assert keep.tolist() == [[True, False, True], [False, True, True]]


# --------------------------------------------------------------------------------------------
# Masks.

def test_class_masks_pick_the_label():
    logits = jnp.arange(2 * 3 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 2, 4) / 50
    labels = jnp.array([[1, 3, 0], [2, 2, 1]])
    chosen = postprocess.class_masks(logits, labels)
    np.testing.assert_allclose(chosen[0, 1], jax.nn.sigmoid(logits[0, 1, :, :, 3]))
    np.testing.assert_allclose(chosen[1, 0], jax.nn.sigmoid(logits[1, 0, :, :, 2]))


def test_paste_masks_match_torchvision(tv):
    """Boxes inside, at the image edges, tiny (one pixel) and larger than the image, on a
    canvas larger than the image: torchvision's paste_masks_in_image (image-sized), exactly
    up to float rounding, and zero outside the image."""
    torch, _ = tv
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    rng = np.random.default_rng(3)
    image_size, canvas = (45, 61), (64, 96)
    masks = rng.uniform(size=(9, 28, 28)).astype(np.float32)
    # Detections are clipped to the image (torchvision's paste fails on boxes wholly outside).
    boxes = np.clip(random_boxes(rng, 9, 60, 45), 0, [61, 45, 61, 45]).astype(np.float32)
    boxes[0] = [10.3, 12.7, 10.9, 13.1]
    boxes[1] = [-20.0, -5.5, 80.2, 70.0]
    boxes[2] = [40.0, 30.0, 70.0, 60.0]
    expected = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes),
                                    image_size)[:, 0].numpy()
    ours = jax.jit(postprocess.paste_masks_in_image, static_argnums=3)(
        jnp.asarray(masks), jnp.asarray(boxes), jnp.asarray(image_size), canvas)
    assert ours.shape == (9, *canvas)
    np.testing.assert_allclose(ours[:, :45, :61], expected, atol=1e-5)
    assert not np.asarray(ours)[:, 45:].any() and not np.asarray(ours)[:, :, 61:].any()


# --------------------------------------------------------------------------------------------
# The whole model.

def _heads_on(ours: MaskRCNN, params, levels, image_size):
    """{'box': boxes [1, R, 4] -> (class logits, deltas), 'mask': boxes -> mask logits}: the
    RoI heads of `ours` with `params` on given boxes over FPN `levels` (P2..P5)."""
    pool = jax.jit(multiscale_roi_align, static_argnums=(2, 3))

    def box(boxes):
        hidden = TwoMLPHead(ours.representation_size).apply(
            {'params': params['box_head']}, pool(levels, jnp.asarray(boxes), image_size, (7, 7)))
        return FastRCNNPredictor(ours.num_classes).apply({'params': params['box_predictor']},
                                                         hidden)

    def mask(boxes):
        hidden = MaskRCNNHeads(ours.mask_layers).apply(
            {'params': params['mask_head']}, pool(levels, jnp.asarray(boxes), image_size,
                                                  (14, 14)))
        return MaskRCNNPredictor(ours.num_classes, ours.mask_dim_reduced).apply(
            {'params': params['mask_predictor']}, hidden)

    return {'box': jax.jit(box), 'mask': jax.jit(mask)}


def _close(a, b, what):
    """Equal to 1e-4 of the reference's largest magnitude (at least 1)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    scale = max(np.abs(b).max(), 1.0)
    np.testing.assert_allclose(a / scale, b / scale, atol=1e-4, err_msg=what)


def _compare_with_torchvision(torch, torch_model, ours: MaskRCNN, state_dict, images):
    """Features, RPN head outputs, proposals, box and mask head outputs to 1e-4 and the final
    detections of `torch_model` (eval, its transform keeping each image's size) and `ours`
    on `images` ([H, W, 3] each, padded together to the largest)."""
    captured = {}
    hooks = [getattr(torch_model.roi_heads, name).register_forward_hook(
        lambda _m, _i, output, name=name: captured.__setitem__(name, output))
        for name in ('box_predictor', 'mask_predictor')]
    with torch.no_grad():
        torch_images = [torch.from_numpy(image.transpose(2, 0, 1)) for image in images]
        batch, _ = torch_model.transform(torch_images)
        assert batch.image_sizes == [image.shape[:2] for image in images]  # no resize
        features = torch_model.backbone(batch.tensors)
        rpn_logits, rpn_deltas = torch_model.rpn.head(list(features.values()))
        proposals, _ = torch_model.rpn(batch, features)
        expected = torch_model(torch_images)
    for hook in hooks:
        hook.remove()

    padded = jnp.asarray(nhwc(batch.tensors.numpy()))
    image_sizes = jnp.asarray(batch.image_sizes, jnp.int32)
    variables = variables_from_torch(ours, padded, state_dict)
    out, state = jax.jit(lambda v, x, s: ours.apply(
        v, x, s, capture_intermediates=True, mutable=['intermediates']))(variables, padded,
                                                                          image_sizes)
    inter = state['intermediates']
    levels = inter['backbone']['__call__'][0]
    for ours_name, torch_name in zip(('p2', 'p3', 'p4', 'p5', 'p6'), features, strict=True):
        _close(levels[ours_name], nhwc(features[torch_name]), ours_name)
    for level, (logits, deltas) in enumerate(inter['rpn']['__call__'][0]):
        _close(logits, nhwc(rpn_logits[level]), f'rpn logits {level}')
        _close(deltas, nhwc(rpn_deltas[level]), f'rpn deltas {level}')

    torch_class_logits, torch_box_deltas = (np.split(
        x.numpy(), np.cumsum([len(p) for p in proposals])[:-1]) for x in captured['box_predictor'])
    torch_mask_logits = np.split(nhwc(captured['mask_predictor']),
                                 np.cumsum([len(e['scores']) for e in expected])[:-1])
    boxes, _, valid = inter['proposals'][0]
    for b, (image, result) in enumerate(zip(images, expected, strict=True)):
        count = len(proposals[b])
        assert int(valid[b].sum()) == count and bool(valid[b, :count].all())
        # Deltas agree to 1e-4 of their range; decoded (exp of dw, dh) that is ~1e-2 px here.
        np.testing.assert_allclose(boxes[b, :count], proposals[b].numpy(), atol=1e-2)
        # The heads on torchvision's own RoIs (ours differ by float rounding, ~1e-2 px).
        heads = _heads_on(ours, variables['params'],
                          [levels[n][b:b + 1] for n in ('p2', 'p3', 'p4', 'p5')],
                          tuple(padded.shape[1:3]))
        class_logits, box_deltas = heads['box'](proposals[b].numpy()[None])
        _close(class_logits[0], torch_class_logits[b], f'class logits {b}')
        _close(box_deltas[0].reshape(count, -1), torch_box_deltas[b], f'box deltas {b}')
        detections = len(result['scores'])
        assert detections >= 5 and int(out['valid'][b].sum()) == detections
        _close(heads['mask'](result['boxes'].numpy()[None])[0], torch_mask_logits[b],
               f'mask logits {b}')

        ours_boxes = out['boxes'][b, :detections]
        iou = np.diag(np.asarray(box_iou(ours_boxes, jnp.asarray(result['boxes'].numpy()))))
        # IoU of slivers (random weights make some 0.02 px wide) is no measure: also corners.
        sized = np.asarray(large_enough(ours_boxes, 1.0))
        assert sized.sum() >= 3 and iou[sized].min() > 0.99, iou
        np.testing.assert_allclose(ours_boxes, result['boxes'].numpy(), atol=1e-2)
        np.testing.assert_array_equal(out['labels'][b, :detections], result['labels'].numpy())
        scores = np.asarray(out['scores'][b, :detections])
        np.testing.assert_allclose(scores, result['scores'].numpy(), atol=1e-4)
        height, width = image.shape[:2]
        probs = np.asarray(out['masks'][b, :detections])
        assert not probs[:, height:].any() and not probs[:, :, width:].any()
        torch_probs = result['masks'][:, 0].numpy()
        ours_masks, torch_masks = probs[:, :height, :width] > 0.5, torch_probs > 0.5
        assert ours_masks.any() and (ours_masks == torch_masks).mean() > 0.999
        print(f'image {b}: {count} proposals, {detections} detections ({sized.sum()} >= 1 px), '
              f'min IoU {iou[sized].min():.6f}, '
              f'max |score diff| {np.abs(scores - result["scores"].numpy()).max():.1e}, '
              f'mask pixels differing {(ours_masks != torch_masks).mean():.1e}, '
              f'max |prob diff| {np.abs(probs[:, :height, :width] - torch_probs).max():.1e}')


@pytest.mark.slow
@pytest.mark.long
def test_maskrcnn_resnet18_fpn_matches_torchvision(tv):
    """A torchvision MaskRCNN over a ResNet-18-FPN, 5 classes, a batch of a 64 x 96 and a
    64 x 80 image (its transform keeps the sizes, pads the second): every stage and the final
    detections."""
    torch, _ = tv
    torch.manual_seed(0)  # the same weights whichever tests ran before (ties depend on them)
    torch_model = torch_maskrcnn_resnet18(min_size=64, max_size=96, rpn_post_nms_top_n_test=200,
                                          box_detections_per_img=30).eval()
    spread_scores(torch, torch_model)
    state = numpy_state_dict(torch_model)
    ours = MaskRCNN(num_classes=5, depth=18, rpn_post_nms_top_n=200, detections_per_image=30)
    rng = np.random.default_rng(4)
    images = [rng.uniform(size=size).astype(np.float32) for size in [(64, 96, 3), (64, 80, 3)]]
    _compare_with_torchvision(torch, torch_model, ours, state, images)


@pytest.mark.slow
@pytest.mark.long
def test_maskrcnn_resnet50_fpn_matches_torchvision(tv, tmp_path):
    """torchvision's maskrcnn_resnet50_fpn (random init, scaled heads), saved to a .pth file and
    read by segjax's reader, on a 128 x 160 image."""
    torch, torchvision = tv
    torch.manual_seed(0)  # the same weights whichever tests ran before (ties depend on them)
    torch_model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=160).eval()
    spread_scores(torch, torch_model, feature_scale=0.003)
    torch.save(torch_model.state_dict(), tmp_path / 'maskrcnn.pth')
    state = read_state_dict(tmp_path / 'maskrcnn.pth')
    image = np.random.default_rng(5).uniform(size=(128, 160, 3)).astype(np.float32)
    _compare_with_torchvision(torch, torch_model, MaskRCNN(), state, [image])


def test_load_maskrcnn_names_every_problem(tv):
    state = numpy_state_dict(torch_maskrcnn_resnet18())
    ours = MaskRCNN(num_classes=5, depth=18)
    template = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    loaded = load_maskrcnn(template, state)
    np.testing.assert_array_equal(loaded['params']['rpn']['cls_logits']['bias'],
                                  state['rpn.head.cls_logits.bias'])
    assert loaded['batch_stats']['backbone']['body']['bn1']['var'].shape == (64,)
    del state['roi_heads.mask_predictor.conv5_mask.bias']
    state['transform.image_mean'] = np.zeros(3, np.float32)
    with pytest.raises(PretrainedError) as error:
        load_maskrcnn(template, state)
    assert 'transform.image_mean' in str(error.value)
    assert 'params/mask_predictor/conv5_mask/bias' in str(error.value)
