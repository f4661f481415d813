"""DeepLabV3-R50-D8 on Pascal VOC 2012 train_aug at 512x512: mmsegmentation's recipe.

Published (mmsegmentation configs/deeplabv3/README.md, deeplabv3_r50-d8,
single-scale val mIoU):
    76.17 at 20k steps, 77.68 at 40k steps.

Everything but the model is experiments/fcn_r50_voc_aug.py's recipe: an ImageNet-pretrained
ResNet-V1c, output stride 8, auxiliary FCN head on layer3 (loss weight 0.4), SGD 0.01 / momentum
0.9 / weight decay 5e-4, poly 0.9, batch 16, 40k steps (--config.num_steps=20000 for the 20k
schedule).
The model: ASPP rates 12/24/36 at output stride 8 with image pooling, 512 wide; segjax's head is
laid out as torchvision's (a 1x1 projection of the ASPP concatenation, then a 3x3 conv) where
mmsegmentation's has the 3x3 conv only.

ImageNet weights (see the README's "Pretrained weights"): mmcv's ResNet-50-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth

    python -m segjax.train --config experiments/deeplabv3_r50_voc_aug.py \
        --workdir runs/deeplabv3_r50_voc \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth
"""

from experiments.fcn_r50_voc_aug import get_config as fcn_r50_voc_aug_config
from segjax.models import deeplab


def get_config():
    config = fcn_r50_voc_aug_config()
    config.model = {'fn': deeplab.DeepLabV3, 'depth': 50, 'deep_stem': True, 'output_stride': 8,
                    'channels': 512, 'aux_head': True}
    return config
