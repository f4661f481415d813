"""A narrow SegFormer (MiT 16/32/64/128 channels, one block per stage) trained from scratch on
the synthetic-shapes data: SegFormer's code path end to end on a CPU.

    python -m segjax.train --config experiments/segformer_b0_synthetic.py --workdir runs/segformer

Everything but the model and the optimiser is the unet_synthetic experiment. The recipe of the
ADE20K/Cityscapes SegFormers (AdamW, poly decay with power 1 after a linear warm-up) at a
from-scratch learning rate (2e-3 where those fine-tune ImageNet weights at 6e-5), and no 10x
decoder rate. The decoder predicts at stride 4 (16x16 for these 64x64 images), so thin shapes
lose detail that the U-Net's full-resolution decoder keeps.
"""

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import optim
from segjax.models import segformer


def get_config():
    config = unet_synthetic_config()
    config.model = {'fn': segformer.SegFormer, 'hidden_sizes': (16, 32, 64, 128),
                    'depths': (1, 1, 1, 1), 'num_heads': (1, 2, 4, 8),
                    'decoder_channels': 64, 'drop_path_rate': 0.1, 'dropout': 0.1}
    config.optimizer = {'fn': optim.adamw, 'lr': 2e-3, 'weight_decay': 0.01}
    config.schedule = {'fn': optim.warmup_poly, 'warmup_steps': 100, 'power': 1.0,
                       'end_value': 0.0}
    return config
