"""U-Net on the embedded synthetic-shapes data set: the default, download-free experiment.

    python -m segjax.train --config experiments/unet_synthetic.py --workdir runs/demo
    python -m segjax.evaluate --config experiments/unet_synthetic.py --workdir runs/demo
    python -m segjax.predict --config experiments/unet_synthetic.py --workdir runs/demo \
        --input 'images/*.png' --output runs/demo/predictions

The data set (64x64, 7 shapes + background, textured, occluding) generates itself into TFDS's
data_dir in seconds on the first run. See the README for the mIoU and time measured on a 2-core CPU.
"""

from segjax import config as config_lib
from segjax import losses, optim
from segjax.data import synthetic
from segjax.models import unet


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 1000
    config.batch_size = 16

    config.data.builder = synthetic.SyntheticShapes
    config.data.num_classes = len(synthetic.CLASS_NAMES)
    config.data.class_names = synthetic.CLASS_NAMES
    config.data.palette = tuple(map(tuple, synthetic.PALETTE.tolist()))
    config.data.crop_size = (64, 64)
    config.data.scale_range = (1.0, 1.0)
    config.data.flip = True

    config.model.fn = unet.UNet
    config.model.base_width = 16
    config.model.depth = 4

    config.loss.fn = losses.cross_entropy
    # ~ frequency**-0.5 of each class in the train split, normalised to mean 1: thin and small
    # shapes would otherwise lose to the background.
    config.loss.class_weights = (0.4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

    config.optimizer.fn = optim.adamw
    config.optimizer.lr = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.fn = optim.warmup_cosine
    config.schedule.warmup_steps = 100

    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 250
    config.eval_batch_size = 32
    return config
