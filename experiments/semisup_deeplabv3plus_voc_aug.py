"""Semi-supervised DeepLabV3+-R50 on Pascal VOC 2012 train_aug with 1/8 of the labels (Hung et
al. 2018's protocol), the rest of train_aug as unlabelled images.

Hung, Tsai, Liou, Lin & Yang, "Adversarial Learning for Semi-Supervised Semantic Segmentation"
(BMVC 2018), DeepLab-v2 ResNet-101 (ImageNet-pretrained), VOC 2012 val mIoU:
    1/8 of the labels, + adversarial + self-training: 69.5 (the authors' released 1/8 model:
    68.8); all labels: 73.6 supervised, 74.9 with the adversarial loss.
(Their other table entries are not reproduced here: we could not check them against the paper.)

This file keeps experiments/deeplabv3plus_r50_voc_aug.py's recipe (mmsegmentation's: 512x512
crops, batch 16, SGD 0.01 poly, 40k steps, auxiliary head) and adds the paper's semi-supervised
training: the pixel-wise discriminator with Adam 1e-4, lambda_adv 0.01, lambda_semi_adv 0.001,
lambda_semi 0.1, T_semi 0.2, and self-training from a quarter of the schedule (the paper: 5,000
of 20,000 iterations). The labelled eighth (1,323 of 10,582 images) is drawn with
config.data.labelled_seed; the supervised-only baseline on the same labels is

    python -m segjax.train --config experiments/deeplabv3plus_r50_voc_aug.py \
        --workdir runs/dlv3p_voc_1_8 --config.data.labelled_fraction=0.125 \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth

and this experiment

    python -m segjax.train --config experiments/semisup_deeplabv3plus_voc_aug.py \
        --workdir runs/dlv3p_voc_semisup_1_8 \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth

Not run by us (it needs the VOC and SBD archives and an accelerator): no figure of ours yet.
"""

from experiments.deeplabv3plus_r50_voc_aug import get_config as deeplabv3plus_r50_voc_aug_config
from segjax.losses import adversarial as adversarial_losses
from segjax.models.discriminator import PixelDiscriminator
from segjax.trainers import semisupervised


def get_config():
    config = deeplabv3plus_r50_voc_aug_config()
    config.data.labelled_fraction = 0.125
    config.trainer.fn = semisupervised.trainer
    config.trainer.discriminator = PixelDiscriminator
    config.trainer.discriminator_features = 64
    config.trainer.discriminator_lr = 1e-4
    config.trainer.adversarial_loss = adversarial_losses.bce_gan
    config.trainer.adversarial_weight = 0.01
    config.trainer.unlabelled_adversarial_weight = 0.001
    config.trainer.self_training_weight = 0.1
    config.trainer.confidence_threshold = 0.2
    config.trainer.self_training_start = config.num_steps // 4
    return config
