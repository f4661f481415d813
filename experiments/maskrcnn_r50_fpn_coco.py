"""Mask R-CNN ResNet-50-FPN on COCO 2017: torchvision's 1x recipe (maskrcnn_resnet50_fpn).

    python -m segjax.data.coco --data_dir ~/tensorflow_datasets   # the official zips, once
    python -m segjax.train --config experiments/maskrcnn_r50_fpn_coco.py --workdir runs/mrcnn_coco \
        --config.pretrained=weights/resnet50-0676ba61.pth
    python -m segjax.evaluate --config experiments/maskrcnn_r50_fpn_coco.py \
        --workdir runs/mrcnn_coco

ImageNet weights (the recipe's start; see docs/models.md "Pretrained weights"): torchvision's
ResNet-50 IMAGENET1K_V1, the backbone torchvision's maskrcnn_resnet50_fpn trains from,
https://download.pytorch.org/models/resnet50-0676ba61.pth. `--config.pretrained` fills the
backbone's ResNet (backbone/body) with it (its `fc.*` left out); the FPN and the RPN and RoI
heads start from their initialisation, as torchvision's.

torchvision's own COCO weights (37.9 box / 34.6 mask AP) load whole, their 91 outputs indexed by
COCO category id cut to the 81 labels here; segjax.evaluate on a workdir without checkpoints
evaluates them: https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth

    python -m segjax.evaluate --config experiments/maskrcnn_r50_fpn_coco.py \
        --workdir runs/tv_mrcnn --config.pretrained=weights/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth

torchvision's published result for this recipe (references/detection, 26 epochs on train2017,
evaluated on val2017): 37.9 box AP, 34.6 mask AP. The recipe: SGD lr 0.02 for 16 images
(8 GPUs x 2), momentum 0.9, weight decay 1e-4; linear warm-up over the first 1000 iterations
from a factor 1e-3; lr x0.1 at epochs 16 and 22 of 26; images resized to short side 800 /
long side at most 1333, flipped at random; ResNet-50 from ImageNet weights with layer2..4
trained and BatchNorm frozen.

What differs here, and why:
  - every image is padded to one 1344 x 1344 canvas (fixed shapes under jit; torchvision pads
    each batch to its largest image), so a step costs more than torchvision's;
  - the labels are segjax.data.coco's contiguous 1..80 (81 classes with the background), where
    torchvision's head has 91 outputs indexed by COCO category id (segjax.pretrained remaps a
    loaded torchvision checkpoint's box/mask predictor rows);
  - segjax's SGD does not decay biases (torchvision decays every parameter);
  - COCO AP is computed against the annotations the builder stores (mask pixel count as a
    ground truth's area, where the official json has the polygon area: only APs/m/l can move).
Not run here (no COCO and no GPU in this workspace): nothing below has been measured.
"""

import jax.numpy as jnp

from segjax import config as config_lib
from segjax import optim
from segjax.instance import maskrcnn
from segjax.trainers import instance

TRAIN_IMAGES = 118_287  # train2017
BATCH_SIZE = 16
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH_SIZE


def warmup_multistep(peak_value: float, total_steps: int, *, warmup_steps: int = 1000,
                     warmup_factor: float = 1e-3, boundaries: tuple[int, ...] = (),
                     gamma: float = 0.1):
    """torchvision's detection schedule: LinearLR(start_factor=warmup_factor) over warmup_steps
    (lr x (f + (1 - f) t / warmup)), then MultiStepLR: x gamma at each step in `boundaries`."""
    del total_steps  # the boundaries say when it decays

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        progress = jnp.minimum(count / warmup_steps, 1.0)
        warm = warmup_factor + (1.0 - warmup_factor) * progress
        decays = sum((count >= b).astype(jnp.float32) for b in boundaries)
        return peak_value * warm * gamma ** decays

    return schedule


def get_config():
    from segjax.data import coco  # only when this experiment is loaded

    config = config_lib.defaults()
    config.seed = 0
    config.batch_size = BATCH_SIZE
    config.num_steps = 26 * STEPS_PER_EPOCH

    config.data.builder = coco.Coco2017Instances
    config.data.num_classes = coco.NUM_CLASSES
    config.data.class_names = ('background', *coco.CLASS_NAMES)
    config.data.crop_size = (1344, 1344)  # 800 x 1333 in either orientation, padded to 32
    config.data.flip = True

    config.model.fn = maskrcnn.MaskRCNN
    config.model.depth = 50

    config.trainer.fn = instance.trainer
    config.trainer.min_size = 800
    config.trainer.max_size = 1333
    config.trainer.max_instances = 100  # COCO train2017 has at most 93 non-crowd per image
    config.trainer.trainable_backbone_layers = 3
    config.trainer.shuffle_buffer = 256  # decoded examples with their masks: bounded memory

    config.optimizer.fn = optim.sgd
    config.optimizer.lr = 0.02
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 1e-4
    config.schedule.fn = warmup_multistep
    config.schedule.warmup_steps = 1000
    config.schedule.warmup_factor = 1e-3
    config.schedule.boundaries = (16 * STEPS_PER_EPOCH, 22 * STEPS_PER_EPOCH)

    config.log_every = 100
    config.eval_every = 2 * STEPS_PER_EPOCH
    config.checkpoint_every = 2000
    config.eval_batch_size = 16
    config.num_summary_images = 0
    return config
