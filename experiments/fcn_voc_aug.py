"""FCN-8s (the VGG-style BatchNorm encoder, from scratch) on Pascal VOC 2012 train_aug, 512x512.

Data: 10,582 train_aug images (VOC 2012 train + SBD train/val - VOC val), evaluated on the 1,449
VOC val images, each whole, padded to 512x512 (padding is ignored by the metrics). The data
handling is mmsegmentation's VOC-aug recipe: random rescale 0.5-2.0 of (2048, 512) keeping the
aspect ratio, 512x512 crop (padded with ignore when smaller) retried until no class covers 75%,
horizontal flip, photometric distortion, ImageNet mean/std.

What to download: nothing by hand. On the first run TFDS downloads VOCtrainval_11-May-2012.tar
(2.0 GB, checksum-checked) and SBD's benchmark.tgz (1.4 GB, md5-checked) and prepares
voc2012_segmentation/aug in ~/tensorflow_datasets (or --config.data.data_dir). Offline, put both
archives, unextracted, in ~/tensorflow_datasets/downloads/manual/ first. Preparing once ahead:

    python -m segjax.data.voc --config aug [--manual_dir DIR_WITH_THE_ARCHIVES]
    python -m segjax.train --config experiments/fcn_voc_aug.py --workdir runs/fcn_voc_aug
    python -m segjax.evaluate --config experiments/fcn_voc_aug.py --workdir runs/fcn_voc_aug

The schedule is mmsegmentation's 40k (SGD 0.01, poly, batch 16) and wants accelerators; on a
CPU try --config.batch_size=2 --config.num_steps=20 as a smoke run. This encoder is not
pretrained, so expect far less than the ~67 mIoU of an ImageNet-pretrained FCN-R50 here.
"""

from segjax import config as config_lib
from segjax import losses, optim
from segjax.data import voc
from segjax.models import fcn


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 40_000
    config.batch_size = 16

    config.data.builder = voc.VocSegmentation
    config.data.builder_config = 'aug'
    config.data.num_classes = len(voc.CLASS_NAMES)
    config.data.class_names = voc.CLASS_NAMES
    config.data.palette = tuple(map(tuple, voc.PALETTE.tolist()))
    config.data.train_split = 'train_aug'
    config.data.eval_split = 'validation'
    config.data.crop_size = (512, 512)
    config.data.scale_range = (0.5, 2.0)
    config.data.base_size = (2048, 512)  # (long, short) edge the scale ratios apply to
    config.data.cat_max_ratio = 0.75
    config.data.flip = True
    config.data.photometric = True
    config.data.eval_pad_size = (512, 512)  # VOC images are at most 500x500

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
    config.eval_every = 4000
    config.checkpoint_every = 2000
    config.eval_batch_size = 16
    return config
