"""DeepLabV3+-R101-D8 on Cityscapes fine at 512x1024 crops: mmsegmentation's recipe.

Published (mmsegmentation configs/deeplabv3plus/README.md, deeplabv3plus_r101-d8,
single-scale val mIoU):
    80.21 at 40k steps, 80.97 at 80k steps.

Everything but the model is experiments/fcn_r50_cityscapes.py's recipe: an ImageNet-pretrained
ResNet-V1c, output stride 8, auxiliary FCN head on layer3 (loss weight 0.4), SGD 0.01 / momentum
0.9 / weight decay 5e-4, poly 0.9, batch 8, 80k steps (--config.num_steps=40000 for the 40k
schedule).
The model: as deeplabv3plus_r50 with ResNet-101-V1c.

ImageNet weights (see the README's "Pretrained weights"): mmcv's ResNet-101-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth

    python -m segjax.train --config experiments/deeplabv3plus_r101_cityscapes.py \
        --workdir runs/deeplabv3plus_r101_cs \
        --config.pretrained=weights/resnet101_v1c-e67eebb6.pth
"""

from experiments.fcn_r50_cityscapes import get_config as fcn_r50_cityscapes_config
from segjax.models import deeplab


def get_config():
    config = fcn_r50_cityscapes_config()
    config.model = {'fn': deeplab.DeepLabV3Plus, 'depth': 101, 'deep_stem': True,
                    'output_stride': 8, 'channels': 512, 'low_level_channels': 48,
                    'separable': True, 'aux_head': True}
    return config
