"""A small ViT (4x4 patches, 64 wide, 3 blocks) with DINOv2's linear head (BatchNorm + 1x1
convolution on the concatenated patch tokens of the last two blocks) trained from scratch on the
synthetic-shapes data: the linear-probe model's code path end to end on a CPU.

    python -m segjax.train --config experiments/vit_linear_synthetic.py --workdir runs/vit_linear

Unlike the DINOv2 protocol (experiments/dinov2_linear_ade20k.py) nothing is frozen: there are
no pretrained features to probe here. `--config.model.frozen_backbone=True
--config.optimizer.lr_multipliers="{'backbone': 0.0}"` runs the frozen protocol on a random
encoder (its mIoU is then what random features allow).
"""

import functools

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import optim
from segjax.models import vit


def get_config():
    config = unet_synthetic_config()
    encoder = functools.partial(vit.VisionTransformer, patch_size=4, hidden_size=64, depth=3,
                                num_heads=2, image_size=64, layer_norm_eps=1e-6)
    config.model = {'fn': vit.ViTLinear, 'backbone': encoder, 'layers': (-2, -1),
                    'drop_path_rate': 0.1}
    config.optimizer = {'fn': optim.adamw, 'lr': 1e-3, 'weight_decay': 0.01}
    config.schedule = {'fn': optim.warmup_cosine, 'warmup_steps': 50}
    # Half the U-Net's batch and 600 steps: ~10 minutes on a shared 2-core CPU.
    config.batch_size = 8
    config.num_steps = 600
    config.eval_every = 0
    return config
