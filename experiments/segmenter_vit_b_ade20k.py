"""Segmenter ViT-B/16 with the mask transformer decoder on ADE20K (SceneParse150), 512x512.

Published (Strudel et al. 2021, Segmenter; rstrudel/segmenter README): Seg-B-Mask/16 48.5
single-scale / 50.0 multi-scale ADE20K val mIoU (106M parameters).

The recipe (paper Sec. 4.1 and the official config): ViT-B/16 pretrained on ImageNet-21k and
fine-tuned on ImageNet-1k at 384 (timm's `vit_base_patch16_384`, the "augreg" weights), position
embeddings resized to the 32x32 grid of 512x512 crops; a 2-layer mask transformer 768 wide;
stochastic depth 0.1, no dropout; SGD lr 1e-3, momentum 0.9, no weight decay, poly decay (power
0.9) over 160k iterations (64 epochs) at batch 8; mmsegmentation's ADE20K augmentation (random
rescale 0.5-2.0, 512x512 crop, flip, photometric distortion); images normalised with mean and
std 0.5 (the ViT's); evaluation with 512x512 sliding windows.

Differences: the weights segjax imports are transformers' `google/vit-base-patch16-224`
(ImageNet-21k pre-training + ImageNet-1k fine-tuning at 224, the original ViT, not augreg's),
their 14x14 position grid resized bicubically to 32x32 (Segmenter resizes the 384 model's 24x24
bilinearly); LayerNorm eps 1e-12 (transformers') where timm uses 1e-6; the sliding-window stride
here is 341 (overlapping; the official code's is 512); segjax's SGD never decays norms or
biases (the weight decay is 0 here anyway). Not yet reproduced with segjax.

What to download: ADEChallengeData2016.zip (prepared as segjax/data/ade20k.py says) and
`model.safetensors` of https://huggingface.co/google/vit-base-patch16-224 (a
ViTForImageClassification: its encoder fills the 'backbone', its ImageNet classifier is left
out, the decoder starts from scratch).

    python -m segjax.data.ade20k [--manual_dir DIR_WITH_THE_ZIP]
    python -m segjax.train --config experiments/segmenter_vit_b_ade20k.py \
        --workdir runs/segmenter_vit_b_ade20k \
        --config.pretrained=weights/vit-base-patch16-224/model.safetensors
"""

from experiments.segformer_b0_ade20k import use_ade20k_data
from segjax import config as config_lib
from segjax import losses, optim
from segjax.models import segmenter


def get_config():
    config = config_lib.defaults()
    config.seed = 0
    config.num_steps = 160_000
    config.batch_size = 8

    use_ade20k_data(config)
    config.data.mean = (127.5, 127.5, 127.5)  # ViT's normalisation: [-1, 1]
    config.data.std = (127.5, 127.5, 127.5)

    config.model = {'fn': segmenter.SegmenterViTB16, 'drop_path_rate': 0.1, 'decoder_depth': 2}
    config.loss.fn = losses.cross_entropy
    config.optimizer = {'fn': optim.sgd, 'lr': 1e-3, 'momentum': 0.9, 'weight_decay': 0.0}
    config.schedule = {'fn': optim.warmup_poly, 'power': 0.9, 'end_value': 1e-5}

    config.eval.mode = 'slide'
    config.eval.window = (512, 512)
    config.eval.stride = (341, 341)

    config.log_every = 50
    config.eval_every = 16_000
    config.checkpoint_every = 4000
    config.eval_batch_size = 2
    return config
