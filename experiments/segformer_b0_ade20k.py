"""SegFormer-B0 on ADE20K (SceneParse150) at 512x512: the paper's / mmsegmentation's recipe.

Published (Xie et al. 2021, Table 1; mmsegmentation configs/segformer/README.md,
segformer_mit-b0_8xb2-160k_ade20k-512x512): 37.4 single-scale val mIoU (mmsegmentation: 37.41).

The recipe: MiT-B0 encoder with ImageNet-1k weights, all-MLP decoder 256 wide (dropout 0.1),
stochastic depth 0.1, cross-entropy; AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, the
decoder at 10x the learning rate; linear warm-up over 1,500 steps, then poly decay (power 1) to
0 at 160k steps; batch 16. Data as mmsegmentation's ADE20K pipeline: random rescale 0.5-2.0 of
(2048, 512) keeping the aspect ratio, 512x512 crop retried until no class covers 75%, flip,
photometric distortion, ImageNet mean/std; annotation 0 ("other") ignored (segjax.data.ade20k,
the ADE20K builder). Evaluation: each image resized into (2048, 512) as mmsegmentation's test
does, whole-image inference.

Differences: segjax evaluates batches, so images are zero-padded to 2048x2048 (padding ignored
by the metrics), and the padded tokens take part in SegFormer's global attention where
mmsegmentation runs each image at its own size; --config.eval.mode=slide
--config.eval.window='(512, 512)' --config.eval.stride='(341, 341)' avoids that (cheaper too).
Weight decay skips biases (mmsegmentation decays them; both skip norms). The 10x decoder rate
needs segjax.optim's `lr_multipliers` option. Not yet reproduced with segjax.

What to download: ADEChallengeData2016.zip, prepared as segjax/data/ade20k.py says; the ImageNet
encoder: `model.safetensors` of https://huggingface.co/nvidia/mit-b0 (its ImageNet classifier
is left out when loading; the decoder starts from scratch).

    python -m segjax.data.ade20k [--manual_dir DIR_WITH_THE_ZIP]
    python -m segjax.train --config experiments/segformer_b0_ade20k.py \
        --workdir runs/segformer_b0_ade20k --config.pretrained=weights/mit-b0/model.safetensors
"""

import ml_collections

from segjax import config as config_lib
from segjax import losses, optim
from segjax.data import ade20k
from segjax.models import segformer


def use_ade20k_data(config: ml_collections.ConfigDict) -> None:
    """Sets config.data to ADE20K at 512x512 with mmsegmentation's pipeline, in place.

    Shared by every ADE20K experiment (`from experiments.segformer_b0_ade20k import
    use_ade20k_data`): train on 'train', evaluate on 'validation'; random rescale 0.5-2.0 of
    (2048, 512), 512x512 crop retried until no class covers 75%, flip, photometric distortion;
    evaluation images resized into (2048, 512) and padded to 2048x2048. The image mean/std stay
    the config's (ImageNet's by default).
    """
    config.data.builder = ade20k.Ade20k
    config.data.builder_config = None  # ADE20K has one: clears a base experiment's (VOC's)
    config.data.num_classes = ade20k.NUM_CLASSES
    config.data.class_names = ade20k.CLASS_NAMES
    config.data.palette = tuple(map(tuple, ade20k.PALETTE.tolist()))
    config.data.train_split = 'train'
    config.data.eval_split = 'validation'
    config.data.crop_size = (512, 512)
    config.data.scale_range = (0.5, 2.0)
    config.data.base_size = (2048, 512)  # (long, short) edge the scale ratios apply to
    config.data.cat_max_ratio = 0.75
    config.data.flip = True
    config.data.photometric = True
    config.data.eval_base_size = (2048, 512)  # mmsegmentation's test Resize, aspect kept
    config.data.eval_pad_size = (2048, 2048)  # fits any image resized into (2048, 512)


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 160_000
    config.batch_size = 16
    use_ade20k_data(config)

    config.model = {'fn': segformer.SegFormerB0, 'drop_path_rate': 0.1, 'dropout': 0.1}
    config.loss.fn = losses.cross_entropy
    config.optimizer = {'fn': optim.adamw, 'lr': 6e-5, 'weight_decay': 0.01, 'b1': 0.9,
                        'b2': 0.999, 'lr_multipliers': {'decode_head': 10.0}}
    config.schedule = {'fn': optim.warmup_poly, 'warmup_steps': 1500, 'power': 1.0,
                       'end_value': 0.0}

    config.log_every = 50
    config.eval_every = 16_000
    config.checkpoint_every = 4000
    config.eval_batch_size = 2  # whole 2048x2048 images: attention over 262k stride-4 tokens
    return config
