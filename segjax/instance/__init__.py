"""Instance segmentation (Mask R-CNN, He et al. 2017) built on segjax's ResNet.

Every function here works on fixed shapes under jit: a variable number of boxes is a fixed-size
array plus a boolean validity mask. The modules mirror torchvision's detection code so that
torchvision (a test oracle only) checks them number for number:
  boxes.py       box coder (Faster R-CNN's deltas), IoU, clipping, small-box masks
  nms.py         greedy NMS and per-class (batched) NMS with fixed-size outputs
  anchors.py     FPN anchors in torchvision's AnchorGenerator order
  roi_align.py   RoIAlign and the FPN level mapping of MultiScaleRoIAlign
  fpn.py         ResNet + FPN backbone (P2-P6) with frozen BatchNorm
  rpn.py         RPN head and eval-mode proposal selection
  roi_heads.py   box head + predictor, mask head + predictor
  matching.py    Matcher (IoU thresholds, low-quality matches) and the balanced sampler
  losses.py      RPN / Fast R-CNN / mask targets and losses (torchvision's)
  postprocess.py detections (per-class NMS, top-k), class masks, masks pasted into the image
  maskrcnn.py    the whole Mask R-CNN module: eval forward and training losses
  coco_eval.py   COCO box and mask AP through pycocotools, image by image
  torchvision_weights.py  torchvision detection state dicts -> these modules' variables
"""
