"""FCN head on a dilated ResNet-18 (output stride 8), with the auxiliary head, on the
synthetic-shapes data.

    python -m segjax.train --config experiments/fcn_resnet_synthetic.py --workdir runs/fcn_r18

The ResNet is narrowed to base width 16 so it trains on a CPU; everything but the model and the
main + 0.4 x auxiliary loss is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import losses
from segjax.models import fcn


def get_config():
    config = unet_synthetic_config()
    config.model = {'fn': fcn.FCNResNet, 'depth': 18, 'base_width': 16, 'output_stride': 8,
                    'aux_head': True}
    config.loss = {'fn': losses.with_aux, 'aux_weight': 0.4,
                   'main': {'fn': losses.cross_entropy,
                            'class_weights': config.loss.class_weights}}
    return config
