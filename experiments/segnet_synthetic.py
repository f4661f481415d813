"""SegNet (max-pooling indices drive the decoder's unpooling) on the synthetic-shapes data.

    python -m segjax.train --config experiments/segnet_synthetic.py --workdir runs/segnet

Everything but the model is the unet_synthetic experiment. Base width 16 (1.84M parameters);
--config.model.base_width=64 is the paper's VGG16-BN SegNet (29.4M).
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax.models import segnet


def get_config():
    config = unet_synthetic_config()
    config.model = {'fn': segnet.SegNet, 'base_width': 16}
    return config
