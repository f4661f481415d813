"""DeepLabV3+-R101-D8 on Pascal VOC 2012 train_aug at 512x512: mmsegmentation's recipe.

Published (mmsegmentation configs/deeplabv3plus/README.md, deeplabv3plus_r101-d8,
single-scale val mIoU):
    77.22 at 20k steps, 78.62 at 40k steps.

Everything but the model is experiments/fcn_r50_voc_aug.py's recipe: an ImageNet-pretrained
ResNet-V1c, output stride 8, auxiliary FCN head on layer3 (loss weight 0.4), SGD 0.01 / momentum
0.9 / weight decay 5e-4, poly 0.9, batch 16, 40k steps (--config.num_steps=20000 for the 20k
schedule).
The model: as deeplabv3plus_r50 with ResNet-101-V1c.

ImageNet weights (see the README's "Pretrained weights"): mmcv's ResNet-101-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth

    python -m segjax.train --config experiments/deeplabv3plus_r101_voc_aug.py \
        --workdir runs/deeplabv3plus_r101_voc \
        --config.pretrained=weights/resnet101_v1c-e67eebb6.pth
"""

from experiments.fcn_r50_voc_aug import get_config as fcn_r50_voc_aug_config
from segjax.models import deeplab


def get_config():
    config = fcn_r50_voc_aug_config()
    config.model = {'fn': deeplab.DeepLabV3Plus, 'depth': 101, 'deep_stem': True,
                    'output_stride': 8, 'channels': 512, 'low_level_channels': 48,
                    'separable': True, 'aux_head': True}
    return config
