"""DeepLabV3+ (ASPP + low-level decoder, depthwise-separable convolutions) on a narrow ResNet-18
with the auxiliary head, on the synthetic-shapes data.

    python -m segjax.train --config experiments/deeplabv3plus_synthetic.py --workdir runs/dlv3p

At 64x64 the stride-8 features are 8x8, so the atrous rates are (2, 4, 6). Everything but the
model and the main + 0.4 x auxiliary loss is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import losses
from segjax.models import deeplab


def get_config():
    config = unet_synthetic_config()
    config.model = {'fn': deeplab.DeepLabV3Plus, 'depth': 18, 'base_width': 16,
                    'output_stride': 8, 'rates': (2, 4, 6), 'channels': 64,
                    'low_level_channels': 16, 'separable': True, 'aux_head': True}
    config.loss = {'fn': losses.with_aux, 'aux_weight': 0.4,
                   'main': {'fn': losses.cross_entropy,
                            'class_weights': config.loss.class_weights}}
    return config
