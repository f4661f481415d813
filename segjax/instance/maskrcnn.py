"""Mask R-CNN (He et al. 2017) as torchvision's maskrcnn_resnet50_fpn: inference, training losses.

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

Training: `train_losses(model, variables, images, image_sizes, targets, rng)` returns the five
losses of torchvision's training forward (RPN and RoI matching, balanced sampling with
jax.random, losses: segjax.instance.losses); targets are padded to G instances per image.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from segjax.instance import losses, postprocess
from segjax.instance.anchors import anchors_for_levels, anchors_per_location
from segjax.instance.fpn import LEVELS, ResNetFPN
from segjax.instance.matching import first_indices, sample_balanced
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
    """Mask R-CNN. Defaults: torchvision's maskrcnn_resnet50_fpn settings.

    __call__(images [B, H, W, 3], image_sizes [B, 2] int (default: H, W for all)) ->
    {'boxes' [B, D, 4], 'scores' [B, D], 'labels' [B, D] int32, 'valid' [B, D] bool,
     'mask_probs' [B, D, 28, 28], and 'masks' [B, D, H, W] if `paste_masks`}, D =
    detections_per_image, rows by decreasing score. The proposals (boxes, scores, valid) are
    sown into the 'intermediates' collection.

    With `targets` (see `train_losses`), it returns torchvision's five training losses instead,
    drawing its samples from the 'sampling' rng.

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
    # Training (torchvision's defaults).
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_fg_iou_threshold: float = 0.7
    rpn_bg_iou_threshold: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_fg_iou_threshold: float = 0.5
    box_bg_iou_threshold: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, image_sizes: jax.Array | None = None,
                 targets: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        batch, height, width = images.shape[:3]
        if height % 32 or width % 32:
            raise ValueError(f'MaskRCNN: image size {(height, width)} must be padded to '
                             f'multiples of 32 (as torchvision\'s size_divisible=32)')
        if image_sizes is None:
            image_sizes = jnp.tile(jnp.asarray([[height, width]], jnp.int32), (batch, 1))
        training = targets is not None
        levels = ResNetFPN(self.depth, fpn_channels=self.fpn_channels, dtype=self.dtype,
                           name='backbone')(images)
        pyramid = [levels[name] for name in LEVELS]

        per_cell = anchors_per_location()
        grids = [tuple(level.shape[1:3]) for level in pyramid]
        objectness, deltas = flatten_levels(
            RPNHead(per_cell[0], dtype=self.dtype, name='rpn')(pyramid))
        anchors = jnp.asarray(anchors_for_levels((height, width), grids))
        # Proposals carry no gradient (torchvision detaches the deltas and objectness).
        proposals, proposal_scores, proposal_valid = select_proposals(
            lax.stop_gradient(objectness), lax.stop_gradient(deltas), anchors,
            tuple(h * w * a for (h, w), a in zip(grids, per_cell, strict=True)), image_sizes,
            pre_nms_top_n=self.rpn_pre_nms_top_n_train if training else self.rpn_pre_nms_top_n,
            post_nms_top_n=(self.rpn_post_nms_top_n_train if training
                            else self.rpn_post_nms_top_n),
            nms_threshold=self.rpn_nms_threshold, score_threshold=self.rpn_score_threshold)
        self.sow('intermediates', 'proposals', (proposals, proposal_scores, proposal_valid))

        pool = functools.partial(multiscale_roi_align, [levels[n] for n in ROI_LEVELS],
                                 image_size=(height, width), sampling_ratio=2)
        box_head = TwoMLPHead(self.representation_size, dtype=self.dtype, name='box_head')
        box_predictor = FastRCNNPredictor(self.num_classes, dtype=self.dtype,
                                          name='box_predictor')
        mask_head = MaskRCNNHeads(self.mask_layers, dtype=self.dtype, name='mask_head')
        mask_predictor = MaskRCNNPredictor(self.num_classes, self.mask_dim_reduced,
                                           dtype=self.dtype, name='mask_predictor')

        def box_branch(boxes):
            return box_predictor(box_head(pool(boxes, output_size=(7, 7))))

        def mask_branch(boxes):
            return mask_predictor(mask_head(pool(boxes, output_size=(14, 14))))

        if training:
            out = self._rpn_losses(objectness, deltas, anchors, targets)
            out.update(self._roi_losses(proposals, proposal_valid, image_sizes, targets,
                                        box_branch, mask_branch))
            return out

        class_logits, box_deltas = box_branch(proposals)
        detect = functools.partial(
            postprocess.detect, score_threshold=self.box_score_threshold,
            nms_threshold=self.box_nms_threshold, max_detections=self.detections_per_image)
        out = jax.vmap(detect)(class_logits, box_deltas, proposals, proposal_valid, image_sizes)
        out['mask_probs'] = postprocess.class_masks(mask_branch(out['boxes']), out['labels'])
        if self.paste_masks:
            out['masks'] = jax.vmap(postprocess.paste_masks_in_image, in_axes=(0, 0, 0, None))(
                out['mask_probs'], out['boxes'], image_sizes, (height, width))
        return out

    def _sample(self, labels: jax.Array, batch_size_per_image: int,
                positive_fraction: float) -> tuple[jax.Array, jax.Array]:
        """Balanced (positive, negative) masks [B, N], one 'sampling' key per image."""
        keys = jax.random.split(self.make_rng('sampling'), labels.shape[0])
        sample = functools.partial(sample_balanced, batch_size_per_image=batch_size_per_image,
                                   positive_fraction=positive_fraction)
        return jax.vmap(sample)(keys, labels)

    def _rpn_losses(self, objectness, deltas, anchors, targets) -> dict[str, jax.Array]:
        assign = functools.partial(losses.rpn_targets, high_threshold=self.rpn_fg_iou_threshold,
                                   low_threshold=self.rpn_bg_iou_threshold)
        labels, regression = jax.vmap(assign, in_axes=(None, 0, 0))(
            anchors, targets['boxes'], targets['valid'])
        positive, negative = self._sample(labels, self.rpn_batch_size_per_image,
                                          self.rpn_positive_fraction)
        return losses.rpn_loss(objectness, deltas, labels, regression, positive, negative)

    def _roi_losses(self, proposals, proposal_valid, image_sizes, targets, box_branch,
                    mask_branch) -> dict[str, jax.Array]:
        """fastrcnn_loss on the sampled RoIs, maskrcnn_loss on their positives; both sets are
        gathered into fixed-size arrays (the sampler's caps) so the heads run on them only."""
        rois, roi_valid = losses.add_gt_proposals(proposals, proposal_valid, targets['boxes'],
                                                  targets['valid'])
        assign = functools.partial(losses.roi_targets, high_threshold=self.box_fg_iou_threshold,
                                   low_threshold=self.box_bg_iou_threshold)
        matched, labels, regression = jax.vmap(assign)(
            rois, roi_valid, targets['boxes'], targets['labels'], targets['valid'])
        positive, negative = self._sample(labels, self.box_batch_size_per_image,
                                          self.box_positive_fraction)
        count = rois.shape[1]
        gather = jax.vmap(lambda values, indices: values[indices])
        sampled, sampled_valid = jax.vmap(functools.partial(
            first_indices, size=min(self.box_batch_size_per_image, count)))(positive | negative)
        class_logits, box_deltas = box_branch(gather(rois, sampled))
        out = losses.fastrcnn_loss(class_logits, box_deltas, gather(labels, sampled),
                                   gather(regression, sampled), sampled_valid)

        most_positive = int(self.box_batch_size_per_image * self.box_positive_fraction)
        chosen, chosen_valid = jax.vmap(functools.partial(
            first_indices, size=max(1, min(most_positive, count))))(positive)
        chosen_rois = gather(rois, chosen)
        mask_targets = jax.vmap(losses.project_masks_on_boxes)(
            targets['masks'], chosen_rois, gather(matched, chosen), image_sizes)
        out['loss_mask'] = losses.maskrcnn_loss(mask_branch(chosen_rois), gather(labels, chosen),
                                                mask_targets, chosen_valid)
        return out


def train_losses(model: MaskRCNN, variables: Any, images: jax.Array, image_sizes: jax.Array,
                 targets: dict[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
    """torchvision's training-mode losses {'loss_objectness', 'loss_rpn_box_reg',
    'loss_classifier', 'loss_box_reg', 'loss_mask'} (float32 scalars; their sum is the loss).

    images [B, H, W, 3] normalised and padded to 32, image_sizes [B, 2] (unpadded h, w);
    targets: 'boxes' [B, G, 4] (x1, y1, x2, y2 pixels), 'labels' [B, G] int (1..C-1; a label
    >= num_classes cannot be checked under jit and turns the RoI losses into nan),
    'masks' [B, G, H, W] (0/1, padded like the images), 'valid' [B, G] bool (padding rows
    False; an image may have none). rng draws the RPN and RoI samples.
    """
    return model.apply(variables, images, image_sizes, targets, rngs={'sampling': rng})


MaskRCNNResNet50FPN = functools.partial(MaskRCNN, depth=50)
