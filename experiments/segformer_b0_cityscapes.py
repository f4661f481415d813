"""SegFormer-B0 on Cityscapes fine at 1024x1024 crops: the paper's / mmsegmentation's recipe.

Published (Xie et al. 2021, Table 1; mmsegmentation configs/segformer/README.md,
segformer_mit-b0_8xb1-160k_cityscapes-1024x1024): 76.2 single-scale val mIoU
(mmsegmentation: 76.54).

The recipe: MiT-B0 encoder with ImageNet-1k weights, all-MLP decoder 256 wide (dropout 0.1),
stochastic depth 0.1, cross-entropy; AdamW lr 6e-5, weight decay 0.01, the decoder at 10x the
learning rate; linear warm-up over 1,500 steps, then poly decay (power 1) to 0 at 160k steps;
batch 8. Data as experiments/fcn_cityscapes.py (19 trainIds; random rescale 0.5-2.0 of
(2048, 1024), crop retried until no class covers 75%, flip, photometric distortion) with
1024x1024 crops; evaluation on the full 1024x2048 images with 1024x1024 sliding windows at
stride 768, as mmsegmentation's.

Differences: weight decay skips biases (mmsegmentation decays them); the 10x decoder rate needs
segjax.optim's `lr_multipliers` option. Not yet reproduced with segjax.

What to download: the Cityscapes zips as experiments/fcn_cityscapes.py says; the ImageNet
encoder: `model.safetensors` of https://huggingface.co/nvidia/mit-b0.

    python -m segjax.data.cityscapes [--manual_dir DIR_WITH_THE_ZIPS]
    python -m segjax.train --config experiments/segformer_b0_cityscapes.py \
        --workdir runs/segformer_b0_cityscapes \
        --config.pretrained=weights/mit-b0/model.safetensors
"""

from experiments.fcn_cityscapes import get_config as cityscapes_config
from experiments.segformer_b0_ade20k import get_config as segformer_b0_ade20k_config


def get_config():
    config = cityscapes_config()
    recipe = segformer_b0_ade20k_config()
    config.num_steps = 160_000
    config.batch_size = 8
    config.data.crop_size = (1024, 1024)
    config.eval.window = (1024, 1024)
    config.eval.stride = (768, 768)
    for section in ('model', 'loss', 'optimizer', 'schedule'):
        config[section] = recipe[section]
    config.eval_every = 16_000
    config.checkpoint_every = 4000
    config.eval_batch_size = 2
    return config
