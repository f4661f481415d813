"""segjax.instance: box coder, IoU, NMS, anchors, RoIAlign and the ResNet-FPN backbone, checked
by hand and against torchvision (a test-only oracle; those tests skip where it is missing)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.instance import anchors, boxes, fpn, nms, roi_align
from segjax.instance.rpn import RPNHead, flatten_levels, select_proposals
from segjax.instance.torchvision_weights import load_resnet_fpn, load_rpn_head
from segjax.pth import PretrainedError, read_state_dict


def random_boxes(rng: np.random.Generator, count: int, extent: float = 60.0,
                 max_size: float = 25.0) -> np.ndarray:
    corner = rng.uniform(0, extent, (count, 2))
    size = rng.uniform(0, max_size, (count, 2))
    return np.concatenate([corner, corner + size], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Boxes.

def test_box_coder_by_hand_and_round_trip():
    reference = jnp.array([[0.0, 0.0, 10.0, 20.0]])
    target = jnp.array([[5.0, 10.0, 25.0, 30.0]])  # centre (15, 20) vs (5, 10); size 20 x 20
    deltas = boxes.encode_boxes(target, reference, (10.0, 10.0, 5.0, 5.0))
    expected = [10 * 10 / 10, 10 * 10 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]
    np.testing.assert_allclose(deltas[0], expected, rtol=1e-6)
    decoded = jax.jit(boxes.decode_boxes, static_argnums=2)(deltas, reference,
                                                           (10.0, 10.0, 5.0, 5.0))
    np.testing.assert_allclose(decoded, target, rtol=1e-6, atol=1e-5)
    # dw is capped at log(1000 / 16) before exp.
    wild = boxes.decode_boxes(jnp.array([[0.0, 0.0, 100.0, 0.0]]), reference)
    np.testing.assert_allclose(wild[0, 2] - wild[0, 0], 10 * 1000 / 16, rtol=1e-5)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(tv, weights):
    torch, _ = tv
    from torchvision.models.detection._utils import BoxCoder
    rng = np.random.default_rng(0)
    references = random_boxes(rng, 50) + np.float32([0, 0, 1, 1])  # no zero-size references
    targets = random_boxes(rng, 50) + np.float32([0, 0, 1, 1])
    coder = BoxCoder(weights)
    expected = coder.encode_single(torch.from_numpy(targets), torch.from_numpy(references))
    deltas = boxes.encode_boxes(jnp.asarray(targets), jnp.asarray(references), weights)
    np.testing.assert_allclose(deltas, expected.numpy(), rtol=1e-5, atol=1e-5)
    # Decoding random deltas, some past the exp clip.
    codes = rng.normal(0, 3, (50, 4)).astype(np.float32)
    codes[:5, 2:] = 40.0
    expected = coder.decode_single(torch.from_numpy(codes), torch.from_numpy(references))
    decoded = boxes.decode_boxes(jnp.asarray(codes), jnp.asarray(references), weights)
    np.testing.assert_allclose(decoded, expected.numpy(), rtol=1e-5, atol=1e-3)


def test_iou_clip_and_small_boxes_match_torchvision(tv):
    torch, torchvision = tv
    ops = torchvision.ops
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 30), random_boxes(rng, 20)
    np.testing.assert_allclose(boxes.box_iou(jnp.asarray(a), jnp.asarray(b)),
                               ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(),
                               rtol=1e-6, atol=1e-7)
    wide = random_boxes(rng, 30, extent=80) - 10
    clipped = jax.jit(boxes.clip_boxes_to_image)(jnp.asarray(wide), 48, 64)
    np.testing.assert_array_equal(
        clipped, ops.clip_boxes_to_image(torch.from_numpy(wide), (48, 64)).numpy())
    keep = ops.remove_small_boxes(torch.from_numpy(a), 8.0).numpy()
    np.testing.assert_array_equal(np.flatnonzero(boxes.large_enough(jnp.asarray(a), 8.0)), keep)


# --------------------------------------------------------------------------------------------
# NMS (jitted: an eager fori_loop dispatches every step).

_nms = jax.jit(nms.nms, static_argnums=2, static_argnames='max_output')
_batched_nms = jax.jit(nms.batched_nms, static_argnums=3, static_argnames='max_output')

def test_nms_by_hand():
    # Box 1 overlaps box 0 (IoU 0.81) and goes; box 2 overlaps box 1 only, so it stays.
    given = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [10, 10, 20, 20], [0, 0, 10, 10.]])
    scores = jnp.array([0.9, 0.8, 0.7, 0.95])
    valid = jnp.array([True, True, True, False])  # the best box is padding: it suppresses nothing
    indices, kept = _nms(given, scores, 0.5, valid=valid, max_output=4)
    assert indices.tolist() == [0, 2, 0, 0] and kept.tolist() == [True, True, False, False]
    indices, kept = _nms(given, scores, 0.5, valid=valid, max_output=1)
    assert indices.tolist() == [0] and kept.tolist() == [True]
    # Two ties: the lower index wins, as a stable sort.
    indices, kept = _nms(given[:1].repeat(2, 0), jnp.array([0.5, 0.5]), 0.5)
    assert indices[kept].tolist() == [0]


def _nms_problem(rng, count=300):
    given = random_boxes(rng, count)
    given[10:30] = given[:20]  # duplicates
    given[30:35, 2:] = given[30:35, :2]  # zero-area boxes
    scores = rng.integers(0, 40, count).astype(np.float32) / 40  # many ties
    valid = rng.uniform(size=count) > 0.2
    return given, scores, valid


@pytest.mark.parametrize('threshold', [0.3, 0.7])
def test_nms_matches_torchvision(tv, threshold):
    torch, torchvision = tv
    given, scores, valid = _nms_problem(np.random.default_rng(2))
    indices, kept = _nms(jnp.asarray(given), jnp.asarray(scores), threshold,
                        valid=jnp.asarray(valid), max_output=300)
    subset = np.flatnonzero(valid)
    expected = subset[torchvision.ops.nms(torch.from_numpy(given[subset]),
                                          torch.from_numpy(scores[subset]), threshold).numpy()]
    assert 20 < len(expected) < len(subset)
    np.testing.assert_array_equal(np.asarray(indices)[np.asarray(kept)], expected)
    # A smaller output keeps the best ones.
    indices, kept = _nms(jnp.asarray(given), jnp.asarray(scores), threshold,
                        valid=jnp.asarray(valid), max_output=20)
    np.testing.assert_array_equal(np.asarray(indices), expected[:20])
    assert bool(kept.all())


def test_batched_nms_matches_torchvision(tv):
    torch, torchvision = tv
    rng = np.random.default_rng(3)
    given, scores, valid = _nms_problem(rng)
    given[~valid] = 1e4  # padding far away must not change the class offset
    classes = rng.integers(0, 4, len(given))
    indices, kept = _batched_nms(jnp.asarray(given), jnp.asarray(scores),
                                    jnp.asarray(classes), 0.5, valid=jnp.asarray(valid))
    subset = np.flatnonzero(valid)
    expected = subset[torchvision.ops.batched_nms(
        torch.from_numpy(given[subset]), torch.from_numpy(scores[subset]),
        torch.from_numpy(classes[subset]), 0.5).numpy()]
    np.testing.assert_array_equal(np.asarray(indices)[np.asarray(kept)], expected)
    # Per class, the same as NMS on that class alone.
    single, single_kept = _nms(jnp.asarray(given), jnp.asarray(scores), 0.5,
                                  valid=jnp.asarray(valid & (classes == 1)))
    np.testing.assert_array_equal(np.asarray(single)[np.asarray(single_kept)],
                                  [i for i in expected if classes[i] == 1])


# --------------------------------------------------------------------------------------------
# Anchors.

def test_cell_anchors_by_hand():
    # size 32, ratios (h / w) 0.5, 1, 2: w = 32 / sqrt(r), h = 32 * sqrt(r), halved and rounded.
    np.testing.assert_array_equal(anchors.cell_anchors((32,), (0.5, 1.0, 2.0)),
                                  [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])


def test_anchors_match_torchvision(tv):
    torch, _ = tv
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    image_size = (64, 96)
    grids = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    generator = AnchorGenerator(anchors.FPN_SIZES, anchors.FPN_ASPECT_RATIOS)
    images = ImageList(torch.zeros(2, 3, *image_size), [image_size, (60, 90)])
    expected = generator(images, [torch.zeros(2, 8, h, w) for h, w in grids])
    ours = anchors.anchors_for_levels(image_size, grids)
    assert ours.dtype == np.float32 and ours.shape == (3 * sum(h * w for h, w in grids), 4)
    for per_image in expected:
        np.testing.assert_array_equal(ours, per_image.numpy())
    assert anchors.anchors_per_location() == generator.num_anchors_per_location()


# --------------------------------------------------------------------------------------------
# RoIAlign.

def _torch_rois(torch, given: np.ndarray):
    """[B, R, 4] -> torchvision's [B * R, 5] (image index first)."""
    batch, count = given.shape[:2]
    index = np.repeat(np.arange(batch, dtype=np.float32), count)[:, None]
    return torch.from_numpy(np.concatenate([index, given.reshape(-1, 4)], axis=1))


@pytest.mark.parametrize('aligned', [False, True])
@pytest.mark.parametrize('sampling_ratio', [1, 2, 3, -1])
def test_roi_align_matches_torchvision(tv, aligned, sampling_ratio):
    torch, torchvision = tv
    rng = np.random.default_rng(4)
    features = rng.normal(size=(2, 11, 14, 3)).astype(np.float32)
    # In image coordinates at spatial scale 1/4: a 44 x 56 image; boxes partly (or wholly)
    # outside it, tiny and degenerate ones.
    given = random_boxes(rng, 2 * 12, extent=70, max_size=40).reshape(2, 12, 4) - 10
    given[0, 0] = [5, 5, 5.5, 5.2]
    given[1, 1] = [20, 20, 20, 20]
    given[1, 2] = [-40, -40, -30, -30]
    kwargs = dict(spatial_scale=0.25, sampling_ratio=sampling_ratio, aligned=aligned)
    expected = torchvision.ops.roi_align(
        torch.from_numpy(features.transpose(0, 3, 1, 2)), _torch_rois(torch, given), (5, 4),
        **kwargs).numpy().transpose(0, 2, 3, 1)
    run = jax.jit(roi_align.roi_align, static_argnums=2,
                  static_argnames=('spatial_scale', 'sampling_ratio', 'aligned', 'max_grid'))
    ours = run(jnp.asarray(features), jnp.asarray(given), (5, 4), max_grid=4, **kwargs)
    assert ours.shape == (2, 12, 5, 4, 3)
    np.testing.assert_allclose(ours.reshape(-1, 5, 4, 3), expected, atol=1e-5, rtol=1e-5)


def test_roi_align_adaptive_needs_a_bound():
    with pytest.raises(ValueError, match='max_grid'):
        roi_align.roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), (2, 2))


def test_fpn_levels_by_hand():
    # sqrt(area) 224 -> level 4 (index 2 from k_min 2); 112 -> 3; 448 -> 5; tiny -> 2; huge -> 5.
    sides = jnp.array([224.0, 112.0, 448.0, 4.0, 5000.0, 0.0])
    given = jnp.stack([jnp.zeros(6), jnp.zeros(6), sides, sides], axis=1)
    assert roi_align.fpn_levels(given, 2, 5).tolist() == [2, 1, 3, 0, 3, 0]


def test_multiscale_roi_align_matches_torchvision(tv):
    torch, torchvision = tv
    rng = np.random.default_rng(5)
    image_size = (64, 96)  # levels at strides 4, 8, 16, 32
    features = [rng.normal(size=(2, 64 // s, 96 // s, 4)).astype(np.float32)
                for s in (4, 8, 16, 32)]
    # Square-ish sides around the level boundaries 112, 224, 448 (levels 2, 3, 4, 5).
    sizes = rng.choice([6.0, 60.0, 150.0, 300.0, 600.0], (2, 16, 1)) * rng.uniform(
        0.8, 1.25, (2, 16, 2))
    corner = rng.uniform(-10, 80, (2, 16, 2))
    given = np.concatenate([corner, corner + sizes], axis=-1).astype(np.float32)
    pooler = torchvision.ops.MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 2)
    torch_features = {str(i): torch.from_numpy(f.transpose(0, 3, 1, 2))
                      for i, f in enumerate(features)}
    torch_boxes = [torch.from_numpy(b) for b in given]
    expected = pooler(torch_features, torch_boxes, [image_size, (60, 90)])
    levels = pooler.map_levels(torch_boxes).numpy()
    assert len(set(levels.tolist())) == 4  # every level is exercised
    np.testing.assert_array_equal(
        roi_align.fpn_levels(jnp.asarray(given), 2, 5).reshape(-1), levels)
    assert roi_align.infer_level_scales([f.shape[1:3] for f in features], image_size) == \
        pooler.scales
    ours = jax.jit(roi_align.multiscale_roi_align, static_argnums=(2, 3))(
        [jnp.asarray(f) for f in features], jnp.asarray(given), image_size, (7, 7))
    np.testing.assert_allclose(ours.reshape(-1, 7, 7, 4),
                               expected.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# ResNet-FPN backbone.

def test_upsample_nearest_matches_torch(tv):
    torch, _ = tv
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 3, 5, 2)
    for size in [(6, 10), (7, 9), (3, 5)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode='nearest')
        np.testing.assert_array_equal(fpn.upsample_nearest(jnp.asarray(x), *size),
                                      expected.numpy().transpose(0, 2, 3, 1))


def _randomise_frozen_norms(torch, module):
    """FrozenBatchNorm2d starts as the identity; random statistics make the test see them."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for norm in module.modules():
        if isinstance(norm, FrozenBatchNorm2d):
            channels = norm.weight.shape[0]
            norm.weight.copy_(torch.rand(channels) + 0.5)
            norm.bias.copy_(torch.randn(channels) * 0.1)
            norm.running_mean.copy_(torch.randn(channels) * 0.1)
            norm.running_var.copy_(torch.rand(channels) + 0.5)


def _check_backbone(torch, torch_backbone, model, state_dict, image):
    expected = torch_backbone(torch.from_numpy(image.transpose(0, 3, 1, 2)))
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(image))
    variables = load_resnet_fpn(template, state_dict)
    ours = jax.jit(model.apply)(variables, jnp.asarray(image))
    for ours_name, torch_name in zip(fpn.LEVELS, ['0', '1', '2', '3', 'pool'], strict=True):
        reference = expected[torch_name].numpy().transpose(0, 2, 3, 1)
        assert ours[ours_name].shape == reference.shape, ours_name
        scale = np.abs(reference).max()
        np.testing.assert_allclose(ours[ours_name] / scale, reference / scale, atol=1e-4,
                                   err_msg=ours_name)
    return variables


def test_small_resnet_fpn_matches_torchvision(tv):
    """A ResNet-18-FPN: the code paths of ResNet-50's, with BasicBlocks."""
    torch, torchvision = tv
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d
    resnet = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    torch_backbone = _resnet_fpn_extractor(resnet, 3).eval()
    with torch.no_grad():
        _randomise_frozen_norms(torch, torch_backbone)
        for name, parameter in torch_backbone.fpn.named_parameters():
            if name.endswith('bias'):
                parameter.normal_(0, 0.1)
        state_dict = {f'backbone.{k}': v.numpy() for k, v in torch_backbone.state_dict().items()}
        image = np.random.default_rng(6).normal(size=(1, 64, 96, 3)).astype(np.float32)
        model = fpn.ResNetFPN(depth=18)
        variables = _check_backbone(torch, torch_backbone, model, state_dict, image)
    # Trainable parameters: the same count as torchvision's requires_grad ones.
    mask = fpn.trainable_mask(variables['params'])
    trainable = sum(np.size(p) for p, m in zip(jax.tree.leaves(variables['params']),
                                               jax.tree.leaves(mask), strict=True) if m)
    assert trainable == sum(p.numel() for p in torch_backbone.parameters() if p.requires_grad)


def test_resnet_fpn_loading_errors_name_the_problem(tv):
    torch, torchvision = tv
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d
    resnet = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    state = {f'backbone.{k}': v.numpy()
             for k, v in _resnet_fpn_extractor(resnet, 3).state_dict().items()}
    template = jax.eval_shape(fpn.ResNetFPN(depth=18, fpn_channels=16).init,
                              jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(PretrainedError, match=r'backbone\.fpn\.inner_blocks\.0\.0\.weight'):
        load_resnet_fpn(template, state)
    template = jax.eval_shape(fpn.ResNetFPN(depth=18).init,
                              jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    del state['backbone.body.layer2.0.bn1.running_var']
    with pytest.raises(PretrainedError, match=r'batch_stats/body/layer2_0/bn1/var'):
        load_resnet_fpn(template, state)


@pytest.mark.slow
@pytest.mark.long
def test_maskrcnn_resnet50_fpn_backbone_matches_torchvision(tv, tmp_path):
    """The backbone of torchvision's maskrcnn_resnet50_fpn (random init, random frozen-norm
    statistics), through a .pth file read by segjax's reader."""
    torch, torchvision = tv
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        _randomise_frozen_norms(torch, model.backbone)
        torch.save(model.state_dict(), tmp_path / 'maskrcnn.pth')
        state_dict = read_state_dict(tmp_path / 'maskrcnn.pth')
        image = np.random.default_rng(7).normal(size=(1, 64, 96, 3)).astype(np.float32)
        _check_backbone(torch, model.backbone, fpn.ResNet50FPN(), state_dict, image)


# --------------------------------------------------------------------------------------------
# RPN.

@pytest.mark.parametrize('pre_nms_top_n, post_nms_top_n', [(1000, 1000), (100, 60)])
def test_rpn_matches_torchvision(tv, pre_nms_top_n, post_nms_top_n):
    """Head outputs and eval-mode proposals of torchvision's RegionProposalNetwork, with
    scaled random weights so that scores and boxes spread out."""
    torch, _ = tv
    from torchvision.models.detection import rpn as torch_rpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    channels, image_size = 16, (64, 96)
    image_sizes = [image_size, (60, 90)]
    grids = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    head = torch_rpn.RPNHead(channels, 3)
    network = torch_rpn.RegionProposalNetwork(
        AnchorGenerator(anchors.FPN_SIZES, anchors.FPN_ASPECT_RATIOS), head, 0.7, 0.3, 256, 0.5,
        dict(training=2000, testing=pre_nms_top_n), dict(training=2000, testing=post_nms_top_n),
        0.7).eval()
    rng = np.random.default_rng(8)
    features = [rng.normal(size=(2, h, w, channels)).astype(np.float32) for h, w in grids]
    with torch.no_grad():
        head.cls_logits.weight.mul_(50)
        head.bbox_pred.weight.mul_(20)
        head.conv[0][0].bias.normal_(0, 0.1)
        torch_features = {str(i): torch.from_numpy(f.transpose(0, 3, 1, 2))
                          for i, f in enumerate(features)}
        images = ImageList(torch.zeros(2, 3, *image_size), image_sizes)
        expected_boxes, _ = network(images, torch_features)
        expected_logits, expected_deltas = head(list(torch_features.values()))
        state = {f'rpn.head.{k}': v.numpy() for k, v in head.state_dict().items()}

    model = RPNHead(3)
    variables = load_rpn_head(jax.eval_shape(model.init, jax.random.key(0), features), state)
    outputs = jax.jit(model.apply)(variables, features)
    for (logits, deltas), torch_logits, torch_deltas in zip(outputs, expected_logits,
                                                            expected_deltas, strict=True):
        np.testing.assert_allclose(logits, torch_logits.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(deltas, torch_deltas.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-4, rtol=1e-4)

    objectness, deltas = flatten_levels(outputs)
    level_sizes = [h * w * 3 for h, w in grids]
    select = jax.jit(select_proposals, static_argnums=3,
                     static_argnames=('pre_nms_top_n', 'post_nms_top_n'))
    boxes, scores, valid = select(
        objectness, deltas, jnp.asarray(anchors.anchors_for_levels(image_size, grids)),
        tuple(level_sizes), jnp.asarray(image_sizes), pre_nms_top_n=pre_nms_top_n,
        post_nms_top_n=post_nms_top_n)
    assert boxes.shape == (2, post_nms_top_n, 4)
    for image, expected in enumerate(expected_boxes):
        ours = np.asarray(boxes[image])[np.asarray(valid[image])]
        assert ours.shape == expected.shape and len(ours) > 10
        np.testing.assert_allclose(ours, expected.numpy(), atol=1e-3, rtol=1e-5)
        kept_scores = np.asarray(scores[image])[np.asarray(valid[image])]
        assert np.all(np.diff(kept_scores) <= 0)
