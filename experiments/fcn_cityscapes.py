"""FCN-8s (the VGG-style BatchNorm encoder, from scratch) on Cityscapes fine, 512x1024 crops.

Data: the 2,975 gtFine train images, evaluated on the 500 val images at full 1024x2048 (512x1024
sliding windows, as mmsegmentation does) on the 19 trainIds: labelIds are mapped in the input
graph by cityscapes.LABEL_ID_TO_TRAIN_ID, everything else is 255 = ignored. mmsegmentation's
Cityscapes recipe: random rescale 0.5-2.0 of (2048, 1024) keeping the aspect ratio, 512x1024
crop retried until no class covers 75%, horizontal flip, photometric distortion, ImageNet
mean/std.

What to download (free registration at https://www.cityscapes-dataset.com/downloads/):
leftImg8bit_trainvaltest.zip (11 GB) and gtFine_trainvaltest.zip (241 MB). Put both, unextracted,
in ~/tensorflow_datasets/downloads/manual/ (or pass --manual_dir below), then

    python -m segjax.data.cityscapes [--manual_dir DIR_WITH_THE_ZIPS]   # prepare once
    python -m segjax.train --config experiments/fcn_cityscapes.py --workdir runs/fcn_cityscapes
    python -m segjax.evaluate --config experiments/fcn_cityscapes.py --workdir runs/fcn_cityscapes

The schedule is mmsegmentation's 80k (SGD 0.01, poly, batch 8) and wants accelerators; on a CPU
try --config.batch_size=2 --config.num_steps=20 --config.data.crop_size='(256, 512)' as a smoke
run. This encoder is not pretrained: expect far less than an ImageNet-pretrained FCN-R50's ~72.
"""

from segjax import config as config_lib
from segjax import losses, optim
from segjax.data import cityscapes
from segjax.models import fcn


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 80_000
    config.batch_size = 8

    config.data.builder = cityscapes.Cityscapes
    config.data.num_classes = cityscapes.NUM_CLASSES
    config.data.class_names = cityscapes.CLASS_NAMES
    config.data.palette = tuple(map(tuple, cityscapes.PALETTE.tolist()))
    config.data.label_map = cityscapes.LABEL_ID_TO_TRAIN_ID  # stored labelIds -> 19 trainIds
    config.data.train_split = 'train'
    config.data.eval_split = 'validation'
    config.data.crop_size = (512, 1024)
    config.data.scale_range = (0.5, 2.0)
    config.data.base_size = (2048, 1024)  # (long, short) edge the scale ratios apply to
    config.data.cat_max_ratio = 0.75
    config.data.flip = True
    config.data.photometric = True
    config.data.eval_pad_size = (1024, 2048)  # every image is 1024x2048: the whole image
    # mmsegmentation's Cityscapes test: 512x1024 sliding windows, stride (341, 683).
    config.eval.mode = 'slide'
    config.eval.window = (512, 1024)
    config.eval.stride = (341, 683)

    config.model.fn = fcn.FCN
    config.model.base_width = 64
    config.model.skip = 8

    config.loss.fn = losses.cross_entropy

    config.optimizer.fn = optim.sgd
    config.optimizer.lr = 0.01
    config.optimizer.momentum = 0.9
    config.optimizer.weight_decay = 5e-4
    config.schedule.fn = optim.warmup_poly
    config.schedule.warmup_steps = 500
    config.schedule.power = 0.9

    config.log_every = 50
    config.eval_every = 8000
    config.checkpoint_every = 4000
    config.eval_batch_size = 8
    return config
