"""U-Net trained adversarially (Luc et al. 2016) on the embedded synthetic-shapes data set.

    python -m segjax.train --config experiments/adversarial_unet_synthetic.py --workdir runs/adv

The U-Net is the generator: besides its cross-entropy it is trained to make a discriminator
(segjax.models.discriminator.ImageLabelDiscriminator, on (image, label map) pairs) take its
softmax maps for ground truth. Evaluation and prediction use the U-Net alone, as for any
experiment. Only config.data.labelled_fraction of the train split's labels are used (1/8, as in
the semi-supervised comparison; 1.0 for all). Everything else is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax.losses import adversarial as adversarial_losses
from segjax.models.discriminator import ImageLabelDiscriminator
from segjax.trainers import adversarial


def get_config():
    config = unet_synthetic_config()
    config.data.labelled_fraction = 0.125
    config.trainer.fn = adversarial.trainer
    config.trainer.discriminator = ImageLabelDiscriminator
    config.trainer.discriminator_features = 32
    config.trainer.discriminator_lr = 1e-4
    config.trainer.adversarial_loss = adversarial_losses.bce_gan
    config.trainer.adversarial_weight = 0.1
    return config
