"""FCN-R50-D8 on Cityscapes fine at 512x1024 crops: mmsegmentation's recipe.

Published (mmsegmentation configs/fcn/README.md, fcn_r50-d8, single-scale val mIoU):
    72.25 at 40k steps, 73.61 at 80k steps.

The recipe: ResNet-50-V1c (deep stem) with ImageNet weights, output stride 8, FCN head on layer4
and an auxiliary FCN head on layer3 with loss weight 0.4; SGD lr 0.01, momentum 0.9, weight
decay 5e-4, poly decay (power 0.9, down to 1e-4), batch 8, 80k steps (--config.num_steps=40000
for the 40k schedule). Data handling and the sliding-window evaluation are
experiments/fcn_cityscapes.py's. Differences: segjax's FCN head is torchvision's (one 3x3 conv)
where mmsegmentation's has two and concatenates the input; weight decay skips biases and norms.

ImageNet weights (see the README's "Pretrained weights"): mmcv's ResNet-50-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth

    python -m segjax.train --config experiments/fcn_r50_cityscapes.py --workdir runs/fcn_r50_cs \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth
"""

from experiments.fcn_cityscapes import get_config as cityscapes_config
from segjax import losses, optim
from segjax.models import fcn


def get_config():
    config = cityscapes_config()
    config.num_steps = 80_000
    config.batch_size = 8
    config.model = {'fn': fcn.FCNResNet, 'depth': 50, 'deep_stem': True, 'output_stride': 8,
                    'aux_head': True}
    config.loss = {'fn': losses.with_aux, 'aux_weight': 0.4, 'main': losses.cross_entropy}
    config.optimizer = {'fn': optim.sgd, 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4}
    config.schedule = {'fn': optim.warmup_poly, 'warmup_steps': 0, 'power': 0.9,
                       'end_value': 1e-4}
    return config
