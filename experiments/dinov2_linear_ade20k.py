"""DINOv2-B/14 linear probe on ADE20K (SceneParse150): frozen features, a linear head.

Published (Oquab et al. 2023, DINOv2, Table 10, "lin."): ViT-B/14 47.3 ADE20K val mIoU (ViT-S/14
44.3; "+ms", the last four layers concatenated at 640 pixels with multi-scale testing: 51.3).

The protocol (paper Sec. 7.4): a linear layer on the frozen backbone's patch tokens of the last
layer predicts class logits at 1/14 of the input (36x36 for 512x512), upsampled bilinearly to
the input; the head is BatchNorm + 1x1 convolution (`BNHead` in facebookresearch/dinov2,
dinov2/eval/segmentation/models/decode_heads/linear_head.py). The released training configs
(mmsegmentation 0.x, not in the repository: from our reading of them, check before comparing)
train it 40k iterations at batch 16 on 512x512 crops of mmsegmentation's ADE20K pipeline
(random rescale 0.5-2.0 of (2048, 512), crop with cat_max_ratio 0.75, flip, photometric
distortion), AdamW lr 1e-3, weight decay 1e-4, 1,500-step linear warm-up then poly decay
(power 1), and evaluate with 512x512 sliding windows, stride 341.

In segjax: `vit.DINOv2LinearB14` with `frozen_backbone=True` (the encoder runs in evaluation
mode and its output is under stop_gradient) and `lr_multipliers={'backbone': 0.0}` (its
updates, weight decay included, are multiplied by 0: the backbone stays bit-identical,
tests/test_vit.py checks it). `--config.model.layers='(-4, -3, -2, -1)'` is the four-layer
probe of "+ms" (without its 640-pixel images and multi-scale testing:
`--config.eval.scales=...`).

Differences: DINOv2's backbone wrapper pads each input to a multiple of 14 (CenterPadding);
segjax's ViT drops the remainder (512 -> 504 pixels seen, logits still resized to 512); the
backbone's AdamW state is allocated though never used (~2x the backbone's 86M parameters in
memory). Not yet reproduced with segjax.

What to download: ADEChallengeData2016.zip (prepared as segjax/data/ade20k.py says) and
`model.safetensors` of https://huggingface.co/facebook/dinov2-base (a Dinov2Model: it fills the
'backbone'; the head starts from scratch).

    python -m segjax.data.ade20k [--manual_dir DIR_WITH_THE_ZIP]
    python -m segjax.train --config experiments/dinov2_linear_ade20k.py \
        --workdir runs/dinov2_linear_ade20k \
        --config.pretrained=weights/dinov2-base/model.safetensors
"""

from experiments.segformer_b0_ade20k import use_ade20k_data
from segjax import config as config_lib
from segjax import losses, optim
from segjax.models import vit


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 40_000
    config.batch_size = 16
    use_ade20k_data(config)

    config.model = {'fn': vit.DINOv2LinearB14, 'frozen_backbone': True, 'layers': (-1,)}
    config.loss.fn = losses.cross_entropy
    config.optimizer = {'fn': optim.adamw, 'lr': 1e-3, 'weight_decay': 1e-4,
                        'lr_multipliers': {'backbone': 0.0}}
    config.schedule = {'fn': optim.warmup_poly, 'warmup_steps': 1500, 'power': 1.0,
                       'end_value': 0.0}

    config.eval.mode = 'slide'
    config.eval.window = (512, 512)
    config.eval.stride = (341, 341)

    config.log_every = 50
    config.eval_every = 4000
    config.checkpoint_every = 4000
    config.eval_batch_size = 2
    return config
