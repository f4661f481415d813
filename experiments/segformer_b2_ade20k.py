"""SegFormer-B2 on ADE20K (SceneParse150) at 512x512: the paper's / mmsegmentation's recipe.

Published (Xie et al. 2021, Table 1; mmsegmentation configs/segformer/README.md,
segformer_mit-b2_8xb2-160k_ade20k-512x512): 46.5 single-scale val mIoU (mmsegmentation: 45.58).

Everything but the model is experiments/segformer_b0_ade20k.py (its docstring lists the recipe,
the differences and the data preparation): MiT-B2 encoder (channels 64/128/320/512, 3/4/6/3
blocks) with ImageNet-1k weights, all-MLP decoder 768 wide.

What to download: as for B0, with `model.safetensors` of https://huggingface.co/nvidia/mit-b2.

    python -m segjax.train --config experiments/segformer_b2_ade20k.py \
        --workdir runs/segformer_b2_ade20k --config.pretrained=weights/mit-b2/model.safetensors
"""

from experiments.segformer_b0_ade20k import get_config as segformer_b0_ade20k_config
from segjax.models import segformer


def get_config():
    config = segformer_b0_ade20k_config()
    config.model.fn = segformer.SegFormerB2
    return config
