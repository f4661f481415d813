"""A small Segmenter (ViT 4x4 patches, 64 wide, 3 blocks; a one-block mask transformer) trained
from scratch on the synthetic-shapes data: Segmenter's code path end to end on a CPU.

    python -m segjax.train --config experiments/segmenter_synthetic.py --workdir runs/segmenter

Everything but the model and the optimiser is the unet_synthetic experiment. AdamW with a
linear warm-up and cosine decay (the ADE20K recipe fine-tunes ImageNet weights with SGD at 1e-3;
from scratch a transformer needs Adam's per-parameter scaling). 4x4 patches give a 16x16 token
grid for these 64x64 images; the 1-pixel-thin parts of the shapes are below a patch.
"""

import functools

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax import optim
from segjax.models import segmenter, vit


def get_config():
    config = unet_synthetic_config()
    encoder = functools.partial(vit.VisionTransformer, patch_size=4, hidden_size=64, depth=3,
                                num_heads=2, image_size=64, layer_norm_eps=1e-6)
    config.model = {'fn': segmenter.Segmenter, 'backbone': encoder, 'decoder_depth': 1,
                    'drop_path_rate': 0.1}
    config.optimizer = {'fn': optim.adamw, 'lr': 1e-3, 'weight_decay': 0.01}
    config.schedule = {'fn': optim.warmup_cosine, 'warmup_steps': 50}
    # Half the U-Net's batch and 600 steps: ~10 minutes on a shared 2-core CPU.
    config.batch_size = 8
    config.num_steps = 600
    config.eval_every = 0
    return config
