"""Semi-supervised U-Net (Hung et al. 2018) on the embedded data set with 1/8 of the labels.

    python -m segjax.train --config experiments/semisup_unet_synthetic.py --workdir runs/semisup

A pixel-wise discriminator (segjax.models.discriminator.PixelDiscriminator) learns to tell
one-hot ground truth from the U-Net's softmax maps; on the 7/8 of the train split used without
labels, the U-Net is trained to fool it and, from step `self_training_start` on, on its own
argmax where the discriminator's confidence exceeds `confidence_threshold`. The labelled 1/8 is
drawn with config.data.labelled_seed, so supervised-only runs on the same labels compare:

    python -m segjax.train --config experiments/unet_synthetic.py --workdir runs/sup_1_8 \
        --config.data.labelled_fraction=0.125

Loss weights are the paper's; self-training starts at step 500 of 1,000 here (the paper: 5,000
of 20,000). Everything else is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax.losses import adversarial as adversarial_losses
from segjax.models.discriminator import PixelDiscriminator
from segjax.trainers import semisupervised


def get_config():
    config = unet_synthetic_config()
    config.data.labelled_fraction = 0.125
    config.trainer.fn = semisupervised.trainer
    config.trainer.discriminator = PixelDiscriminator
    config.trainer.discriminator_features = 32
    config.trainer.discriminator_lr = 1e-4
    config.trainer.adversarial_loss = adversarial_losses.bce_gan
    config.trainer.adversarial_weight = 0.01
    config.trainer.unlabelled_adversarial_weight = 0.001
    config.trainer.self_training_weight = 0.1
    config.trainer.confidence_threshold = 0.2
    config.trainer.self_training_start = 500
    return config
