"""PSPNet (pyramid pooling, bins 1/2/3/6) on a narrow dilated ResNet-18 with the auxiliary head,
on the synthetic-shapes data.

    python -m segjax.train --config experiments/pspnet_synthetic.py --workdir runs/psp_r18

Everything but the model and the main + 0.4 x auxiliary loss is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import losses
from segjax.models import pspnet


def get_config():
    config = unet_synthetic_config()
    config.model = {'fn': pspnet.PSPNet, 'depth': 18, 'base_width': 16, 'output_stride': 8,
                    'channels': 64, 'aux_head': True}
    config.loss = {'fn': losses.with_aux, 'aux_weight': 0.4,
                   'main': {'fn': losses.cross_entropy,
                            'class_weights': config.loss.class_weights}}
    return config
