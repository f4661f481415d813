"""DeepLabV3 (ASPP with image pooling) on a narrow dilated ResNet-18, on the synthetic-shapes data.

    python -m segjax.train --config experiments/deeplabv3_synthetic.py --workdir runs/dlv3_r18

At 64x64 the stride-8 features are 8x8, so the atrous rates are scaled down from the paper's
(12, 24, 36) to (2, 4, 6). Everything but the model is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax.models import deeplab


def get_config():
    config = unet_synthetic_config()
    config.model = {'fn': deeplab.DeepLabV3, 'depth': 18, 'base_width': 16, 'output_stride': 8,
                    'rates': (2, 4, 6), 'channels': 64}
    return config
