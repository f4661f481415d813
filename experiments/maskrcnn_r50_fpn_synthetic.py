"""Mask R-CNN on the embedded synthetic shapes as instances: the download-free CPU demo.

    python -m segjax.train --config experiments/maskrcnn_r50_fpn_synthetic.py --workdir runs/mr
    python -m segjax.evaluate --config experiments/maskrcnn_r50_fpn_synthetic.py --workdir runs/mr

torchvision's Mask R-CNN pipeline (segjax.trainers.instance) made small enough for a CPU: the
64x64 images (shapes 14-36 px, 0-4 instances, occluding) are resized to 96x96 as
GeneralizedRCNNTransform would resize them (its smallest FPN anchors are 32 px: at 64 px most
shapes would match no anchor above IoU 0.3), and the network is ResNet-18-FPN with narrow heads
(`--config.model.depth=50 --config.model.fpn_channels=256 ...` gives maskrcnn_resnet50_fpn's
shapes). All backbone stages train from scratch (no ImageNet weights here); BatchNorm stays
frozen at its initial statistics, as torchvision's FrozenBatchNorm2d. COCO box and mask AP
(pycocotools) on the 300 validation images are printed at every evaluation and written to
<workdir>/metrics.json. The CPU time and AP measured are in docs/instance.md.
"""

from segjax import config as config_lib
from segjax import optim
from segjax.data import instances, synthetic
from segjax.instance import maskrcnn
from segjax.trainers import instance


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 3000  # 13 minutes on 2 idle CPU cores (docs/instance.md)
    config.batch_size = 4

    config.data.builder = instances.SyntheticInstances
    config.data.builder_config = 'default'
    config.data.num_classes = len(synthetic.CLASS_NAMES)
    config.data.class_names = synthetic.CLASS_NAMES
    config.data.palette = tuple(map(tuple, synthetic.PALETTE.tolist()))
    config.data.crop_size = (96, 96)  # the canvas images are padded to (multiples of 32)
    config.data.flip = True

    config.model.fn = maskrcnn.MaskRCNN
    config.model.depth = 18
    config.model.fpn_channels = 64
    config.model.representation_size = 256
    config.model.mask_layers = (64, 64)
    config.model.mask_dim_reduced = 64
    # Fewer proposals and samples than COCO's 2000 / 512: a 128 px image has 4 objects at most.
    config.model.rpn_pre_nms_top_n_train = 400
    config.model.rpn_post_nms_top_n_train = 150
    config.model.rpn_pre_nms_top_n = 400
    config.model.rpn_post_nms_top_n = 100
    config.model.box_batch_size_per_image = 64
    config.model.detections_per_image = 50

    config.trainer.fn = instance.trainer
    config.trainer.min_size = 96
    config.trainer.max_size = 96
    config.trainer.max_instances = 8
    config.trainer.trainable_backbone_layers = 5  # from scratch: every stage learns

    config.optimizer.fn = optim.adamw
    config.optimizer.lr = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.fn = optim.warmup_cosine
    config.schedule.warmup_steps = 30

    config.log_every = 25
    config.eval_every = 1000  # 300 validation images: ~15 s on a CPU
    config.checkpoint_every = 500
    config.eval_batch_size = 16
    config.num_summary_images = 0  # the semantic input|truth|prediction strip does not apply
    return config
