"""PSPNet-R50-D8 on Cityscapes fine at 512x1024 crops: mmsegmentation's recipe.

Published (mmsegmentation configs/pspnet/README.md, pspnet_r50-d8,
single-scale val mIoU):
    77.85 at 40k steps, 78.55 at 80k steps.

Everything but the model is experiments/fcn_r50_cityscapes.py's recipe: an ImageNet-pretrained
ResNet-V1c, output stride 8, auxiliary FCN head on layer3 (loss weight 0.4), SGD 0.01 / momentum
0.9 / weight decay 5e-4, poly 0.9, batch 8, 80k steps (--config.num_steps=40000 for the 40k
schedule).
The model: PSPNet head as mmsegmentation's (bins 1/2/3/6, 512 wide); the auxiliary head as
above.

ImageNet weights (see the README's "Pretrained weights"): mmcv's ResNet-50-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth

    python -m segjax.train --config experiments/pspnet_r50_cityscapes.py \
        --workdir runs/pspnet_r50_cs \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth
"""

from experiments.fcn_r50_cityscapes import get_config as fcn_r50_cityscapes_config
from segjax.models import pspnet


def get_config():
    config = fcn_r50_cityscapes_config()
    config.model = {'fn': pspnet.PSPNet, 'depth': 50, 'deep_stem': True, 'output_stride': 8,
                    'aux_head': True}
    return config
