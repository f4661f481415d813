"""Cross-entropy + Dice as one composite loss, each term logged by name.

    python -m segjax.train --config experiments/composite_loss_example.py --workdir runs/ce_dice
    python -m segjax.train --config experiments/composite_loss_example.py --workdir runs/ce_dice2 \
        --config.loss.terms.dice.weight=0.5 --config.loss.terms.dice.classes=all

TensorBoard then shows train/loss (the weighted total), train/loss/ce and train/loss/dice (each
term unweighted). Every field of a term can be overridden as above; a term's option must be
written here to be overridable. Everything else is the unet_synthetic experiment.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import losses


def get_config():
    config = unet_synthetic_config()
    class_weights = config.loss.class_weights
    config.loss = {
        'fn': losses.weighted_sum,
        'terms': {
            'ce': {'fn': losses.cross_entropy, 'weight': 1.0, 'class_weights': class_weights},
            'dice': {'fn': losses.dice_loss, 'weight': 1.0, 'smooth': 1.0, 'classes': 'present'},
        },
    }
    return config
