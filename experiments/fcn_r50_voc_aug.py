"""FCN-R50-D8 on Pascal VOC 2012 train_aug at 512x512: mmsegmentation's recipe.

Published (mmsegmentation configs/fcn/README.md, fcn_r50-d8, single-scale val mIoU):
    67.08 at 20k steps, 66.97 at 40k steps.

The recipe: ResNet-50-V1c (deep stem) with ImageNet weights, output stride 8, FCN head on layer4
and an auxiliary FCN head on layer3 with loss weight 0.4; SGD lr 0.01, momentum 0.9, weight
decay 5e-4, poly decay (power 0.9, down to 1e-4), batch 16, 40k steps (--config.num_steps=20000
for the 20k schedule). Data handling is experiments/fcn_voc_aug.py's (mmsegmentation's VOC-aug
pipeline). Differences: segjax's FCN head is torchvision's (one 3x3 conv, 512 wide) where
mmsegmentation's has two and concatenates the input; weight decay skips biases and norms.

ImageNet weights (see the README's "Pretrained weights"): mmcv's ResNet-50-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth

    python -m segjax.train --config experiments/fcn_r50_voc_aug.py --workdir runs/fcn_r50_voc \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth
"""

from experiments.fcn_voc_aug import get_config as voc_aug_config
from segjax import losses, optim
from segjax.models import fcn


def get_config():
    config = voc_aug_config()
    config.num_steps = 40_000
    config.batch_size = 16
    config.model = {'fn': fcn.FCNResNet, 'depth': 50, 'deep_stem': True, 'output_stride': 8,
                    'aux_head': True}
    config.loss = {'fn': losses.with_aux, 'aux_weight': 0.4, 'main': losses.cross_entropy}
    config.optimizer = {'fn': optim.sgd, 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4}
    config.schedule = {'fn': optim.warmup_poly, 'warmup_steps': 0, 'power': 0.9,
                       'end_value': 1e-4}
    return config
