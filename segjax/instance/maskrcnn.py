"""Mask R-CNN (He et al. 2017), eval mode, as torchvision's `maskrcnn_resnet50_fpn`.

`MaskRCNN` composes ResNet-FPN -> RPN head -> proposal selection -> 7x7 MultiScaleRoIAlign ->
box head -> detections (postprocess.detect) -> 14x14 MultiScaleRoIAlign of the detections ->
mask head -> each detection's class mask -> masks pasted into the image. Every shape is static:
proposals and detections are fixed-size arrays with validity masks.

Input: images [B, H, W, 3] normalised with ImageNet mean/std, padded to multiples of 32 (what
torchvision's GeneralizedRCNNTransform hands its backbone; resizing is the caller's), and each
image's unpadded (height, width). Weights: `torchvision_weights.load_maskrcnn`.

    model = MaskRCNN()
    variables = load_maskrcnn(jax.eval_shape(model.init, key, images), state_dict)
    out = jax.jit(model.apply)(variables, images, image_sizes)
    # out['boxes'] [B, 100, 4], 'scores', 'labels', 'valid', 'masks' [B, 100, H, W]

The training forward (matching, sampling, losses) is not here yet.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.instance import postprocess
from segjax.instance.anchors import anchors_for_levels, anchors_per_location
from segjax.instance.fpn import LEVELS, ResNetFPN
from segjax.instance.roi_align import multiscale_roi_align
from segjax.instance.roi_heads import (
    FastRCNNPredictor,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    TwoMLPHead,
)
from segjax.instance.rpn import RPNHead, flatten_levels, select_proposals

# MultiScaleRoIAlign pools from P2..P5 only (P6 feeds the RPN).
ROI_LEVELS = LEVELS[:4]
COCO_NUM_CLASSES = 91  # torchvision's COCO category ids 0..90, 0 = background


class MaskRCNN(nn.Module):
    """Eval-mode Mask R-CNN. Defaults: torchvision's maskrcnn_resnet50_fpn test settings.

    __call__(images [B, H, W, 3], image_sizes [B, 2] int (default: H, W for all)) ->
    {'boxes' [B, D, 4], 'scores' [B, D], 'labels' [B, D] int32, 'valid' [B, D] bool,
     'mask_probs' [B, D, 28, 28], and 'masks' [B, D, H, W] if `paste_masks`}, D =
    detections_per_image, rows by decreasing score. The proposals (boxes, scores, valid) are
    sown into the 'intermediates' collection.

    The RoI pooling scales are inferred from the padded size H where torchvision uses the
    largest unpadded height of the batch: the same scales while padding adds under 41%.
    """

    num_classes: int = COCO_NUM_CLASSES
    depth: int = 50
    fpn_channels: int = 256
    representation_size: int = 1024
    mask_layers: tuple[int, ...] = (256, 256, 256, 256)
    mask_dim_reduced: int = 256
    rpn_pre_nms_top_n: int = 1000
    rpn_post_nms_top_n: int = 1000
    rpn_nms_threshold: float = 0.7
    rpn_score_threshold: float = 0.0
    box_score_threshold: float = postprocess.SCORE_THRESHOLD
    box_nms_threshold: float = postprocess.NMS_THRESHOLD
    detections_per_image: int = postprocess.DETECTIONS_PER_IMAGE
    paste_masks: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array,
                 image_sizes: jax.Array | None = None) -> dict[str, jax.Array]:
        batch, height, width = images.shape[:3]
        if height % 32 or width % 32:
            raise ValueError(f'MaskRCNN: image size {(height, width)} must be padded to '
                             f'multiples of 32 (as torchvision\'s size_divisible=32)')
        if image_sizes is None:
            image_sizes = jnp.tile(jnp.asarray([[height, width]], jnp.int32), (batch, 1))
        levels = ResNetFPN(self.depth, fpn_channels=self.fpn_channels, dtype=self.dtype,
                           name='backbone')(images)
        pyramid = [levels[name] for name in LEVELS]

        per_cell = anchors_per_location()
        grids = [tuple(level.shape[1:3]) for level in pyramid]
        objectness, deltas = flatten_levels(
            RPNHead(per_cell[0], dtype=self.dtype, name='rpn')(pyramid))
        proposals, proposal_scores, proposal_valid = select_proposals(
            objectness, deltas, jnp.asarray(anchors_for_levels((height, width), grids)),
            tuple(h * w * a for (h, w), a in zip(grids, per_cell, strict=True)), image_sizes,
            pre_nms_top_n=self.rpn_pre_nms_top_n, post_nms_top_n=self.rpn_post_nms_top_n,
            nms_threshold=self.rpn_nms_threshold, score_threshold=self.rpn_score_threshold)
        self.sow('intermediates', 'proposals', (proposals, proposal_scores, proposal_valid))

        pool = functools.partial(multiscale_roi_align, [levels[n] for n in ROI_LEVELS],
                                 image_size=(height, width), sampling_ratio=2)
        box_features = TwoMLPHead(self.representation_size, dtype=self.dtype,
                                  name='box_head')(pool(proposals, output_size=(7, 7)))
        class_logits, box_deltas = FastRCNNPredictor(self.num_classes, dtype=self.dtype,
                                                     name='box_predictor')(box_features)
        detect = functools.partial(
            postprocess.detect, score_threshold=self.box_score_threshold,
            nms_threshold=self.box_nms_threshold, max_detections=self.detections_per_image)
        out = jax.vmap(detect)(class_logits, box_deltas, proposals, proposal_valid, image_sizes)

        mask_features = MaskRCNNHeads(self.mask_layers, dtype=self.dtype, name='mask_head')(
            pool(out['boxes'], output_size=(14, 14)))
        mask_logits = MaskRCNNPredictor(self.num_classes, self.mask_dim_reduced,
                                        dtype=self.dtype, name='mask_predictor')(mask_features)
        out['mask_probs'] = postprocess.class_masks(mask_logits, out['labels'])
        if self.paste_masks:
            out['masks'] = jax.vmap(postprocess.paste_masks_in_image, in_axes=(0, 0, 0, None))(
                out['mask_probs'], out['boxes'], image_sizes, (height, width))
        return out


MaskRCNNResNet50FPN = functools.partial(MaskRCNN, depth=50)
