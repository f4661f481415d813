"""COCO-style box and mask AP through pycocotools (the reference implementation).

segjax only writes the glue: ground truth from segjax.data.instances-layout examples (masks ->
RLE, area = mask area, iscrowd) and results from `MaskRCNN` outputs (boxes -> xywh, mask
probabilities > 0.5 -> RLE), one image at a time, as torchvision's reference
coco_eval does (separate 'bbox' and 'segm' result lists). Only compact RLEs are kept between
images, so a split streams through in constant memory per image.

    evaluator = CocoEvaluator(num_classes=8)
    for image_id, (example, detections) in enumerate(pairs, start=1):
        evaluator.add_ground_truth(image_id, example['instances'], example['image'].shape[:2])
        evaluator.add_detections(image_id, **detections)   # boxes, scores, labels, masks, valid
    metrics = evaluator.summarize()   # {'bbox/AP': ..., 'segm/AP50': ..., ...}

Several processes each evaluate their own images: every process's `export()` gathered
(JSON: the RLEs are strings), `CocoEvaluator.merged(num_classes, exports)` holds exactly what
one evaluator fed every image would hold (segjax.instance.evaluation does this).

Detections must be at the ground truth's resolution: `detections_at_original_size` rescales
the boxes of a resized input and pastes the 28x28 mask probabilities at the original size.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats order (maxDets=100 for all AP entries).
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
MASK_THRESHOLD = 0.5


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] (x1, y1, x2, y2) -> COCO's (x, y, width, height)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def encode_masks(masks: np.ndarray) -> list[dict]:
    """[N, H, W] 0/1 masks -> COCO RLEs (Fortran-order encode, counts as str for JSON)."""
    masks = np.asarray(masks, np.uint8).reshape(-1, *np.shape(masks)[-2:])
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
    return [{**rle, 'counts': rle['counts'].decode('ascii')} for rle in rles]


def ground_truth_annotations(image_id: int, instances: dict, first_id: int) -> list[dict]:
    """COCO annotations of one image from {'bbox' [N, 4] xyxy, 'label' [N], 'mask' [N, H, W],
    'is_crowd' [N]}; ids first_id, first_id + 1, ...; area is the mask's pixel count."""
    rles = encode_masks(instances['mask'])
    boxes = xyxy_to_xywh(instances['bbox'])
    labels, crowd = np.asarray(instances['label']), np.asarray(instances['is_crowd'])
    if not len(rles) == len(boxes) == len(labels) == len(crowd):
        raise ValueError(f'image {image_id}: instances have {len(rles)} masks, {len(boxes)} '
                         f'boxes, {len(labels)} labels, {len(crowd)} is_crowd; expected equal')
    return [{'id': first_id + i, 'image_id': int(image_id), 'category_id': int(labels[i]),
             'bbox': boxes[i].tolist(), 'segmentation': rles[i],
             'area': float(mask_utils.area(rles[i])), 'iscrowd': int(bool(crowd[i]))}
            for i in range(len(rles))]


def detection_results(image_id: int, boxes: np.ndarray, scores: np.ndarray,
                      labels: np.ndarray, masks: np.ndarray | None = None,
                      valid: np.ndarray | None = None) -> tuple[list[dict], list[dict]]:
    """(bbox results, segm results) of one image's detections: boxes [D, 4] xyxy, scores [D],
    labels [D], masks [D, H, W] probabilities (> 0.5 is inside, as torchvision's reference;
    None: no segm results),
    valid [D] (padding rows of a fixed-size output are skipped)."""
    keep = np.ones(len(scores), bool) if valid is None else np.asarray(valid, bool)
    boxes, scores = xyxy_to_xywh(boxes)[keep], np.asarray(scores, np.float64)[keep]
    labels = np.asarray(labels)[keep]
    common = [{'image_id': int(image_id), 'category_id': int(label), 'score': float(score)}
              for label, score in zip(labels, scores, strict=True)]
    bbox = [{**c, 'bbox': box.tolist()} for c, box in zip(common, boxes, strict=True)]
    if masks is None:
        return bbox, []
    rles = encode_masks(np.asarray(masks)[keep] > MASK_THRESHOLD)
    return bbox, [{**c, 'segmentation': rle} for c, rle in zip(common, rles, strict=True)]


def coco_ground_truth(images: list[dict], annotations: list[dict], num_classes: int) -> COCO:
    """A pycocotools COCO object from image entries {'id', 'height', 'width'} and annotations;
    categories 1..num_classes-1."""
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': annotations,
                    'categories': [{'id': c} for c in range(1, num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def coco_metrics(ground_truth: COCO, results: list[dict], iou_type: str) -> dict[str, float]:
    """COCOeval (iou_type 'bbox' or 'segm') -> {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}.

    No results at all gives AP 0 (pycocotools' loadRes cannot take an empty list)."""
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes(results)
        evaluator = COCOeval(ground_truth, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # -1 marks "no ground truth in this area range"; reported as such.
    return dict(zip(METRIC_NAMES, map(float, evaluator.stats[:6]), strict=True))


class CocoEvaluator:
    """Accumulates ground truth and detections image by image, then runs COCOeval once."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.bbox_results: list[dict] = []
        self.segm_results: list[dict] = []

    def add_ground_truth(self, image_id: int, instances: dict, image_size) -> None:
        """One image's instances (segjax.data.instances layout) and its (height, width)."""
        height, width = (int(s) for s in image_size)
        self.images.append({'id': int(image_id), 'height': height, 'width': width})
        self.annotations += ground_truth_annotations(image_id, instances,
                                                     first_id=len(self.annotations) + 1)

    def add_detections(self, image_id: int, boxes, scores, labels, masks=None,
                       valid=None) -> None:
        """One image's detections at the ground truth's resolution (see detection_results)."""
        bbox, segm = detection_results(image_id, boxes, scores, labels, masks, valid)
        self.bbox_results += bbox
        self.segm_results += segm

    def export(self) -> dict[str, list[dict]]:
        """Everything added so far as JSON-able lists ('images', 'annotations', 'bbox_results',
        'segm_results'): one process's share for `merged`. Export before `summarize`, which
        lets pycocotools' loadRes add keys to the result dicts."""
        return {'images': self.images, 'annotations': self.annotations,
                'bbox_results': self.bbox_results, 'segm_results': self.segm_results}

    @classmethod
    def merged(cls, num_classes: int, exports: list[dict]) -> CocoEvaluator:
        """One evaluator holding every export's images (e.g. one export per process), as an
        evaluator fed all of them in image-id order would hold them: each list in image-id
        order (a stable sort, so each image keeps its own order) and the annotation ids
        renumbered 1, 2, ... in that order. pycocotools breaks ties by list order, so this is
        what makes the metrics equal to the one-process ones, not only close."""
        def by_image(key: str) -> list[dict]:
            rows = [row for export in exports for row in export[key]]
            return sorted(rows, key=lambda row: row['image_id'])

        evaluator = cls(num_classes)
        evaluator.images = sorted((image for export in exports for image in export['images']),
                                  key=lambda image: image['id'])
        repeated = [i for i, n in Counter(image['id'] for image in evaluator.images).items()
                    if n > 1]
        if repeated:
            raise ValueError(f'image ids {sorted(repeated)[:10]} are in more than one export; '
                             'expected each image in exactly one (each process its own images)')
        evaluator.annotations = [{**annotation, 'id': new_id} for new_id, annotation in
                                 enumerate(by_image('annotations'), start=1)]
        evaluator.bbox_results = by_image('bbox_results')
        evaluator.segm_results = by_image('segm_results')
        return evaluator

    def summarize(self) -> dict[str, float]:
        """{'bbox/AP', ..., 'segm/APl'} over every image added so far."""
        ground_truth = coco_ground_truth(self.images, self.annotations, self.num_classes)
        metrics = {}
        for iou_type, results in (('bbox', self.bbox_results), ('segm', self.segm_results)):
            for name, value in coco_metrics(ground_truth, results, iou_type).items():
                metrics[f'{iou_type}/{name}'] = value
        return metrics


def detections_at_original_size(outputs: dict, resized_size, original_size) -> dict:
    """One image's MaskRCNN eval outputs (numpy, unbatched: 'boxes', 'scores', 'labels',
    'valid', 'mask_probs' [D, 28, 28]) for an input resized from original_size (h, w) to
    resized_size -> detections at the original size, masks pasted there as torchvision's
    postprocess does (boxes scaled by original / resized per axis)."""
    from segjax.instance.postprocess import paste_masks_in_image  # jax only when used

    ratio_h, ratio_w = (float(o) / float(r) for o, r in zip(original_size, resized_size,
                                                            strict=True))
    boxes = np.asarray(outputs['boxes'], np.float32) * np.float32(
        [ratio_w, ratio_h, ratio_w, ratio_h])
    height, width = (int(s) for s in original_size)
    masks = paste_masks_in_image(outputs['mask_probs'], boxes, np.array([height, width]),
                                 (height, width))
    return {'boxes': boxes, 'scores': np.asarray(outputs['scores']),
            'labels': np.asarray(outputs['labels']), 'valid': np.asarray(outputs['valid']),
            'masks': np.asarray(masks)}
