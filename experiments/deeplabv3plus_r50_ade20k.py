"""DeepLabV3+-R50-D8 on ADE20K (SceneParse150) at 512x512: mmsegmentation's recipe.

Published (mmsegmentation configs/deeplabv3plus/README.md, deeplabv3plus_r50-d8 512x512,
single-scale val mIoU): 42.72 at 80k steps (43.95 at 160k: --config.num_steps=160000).

Data: the 20,210 ADE20K training images, evaluated on the 2,000 validation images; 150 classes,
annotation value 0 ("other") ignored (segjax.data.ade20k). mmsegmentation's ADE20K pipeline:
random rescale 0.5-2.0 of (2048, 512) keeping the aspect ratio, 512x512 crop retried until no
class covers 75%, horizontal flip, photometric distortion, ImageNet mean/std. Evaluation resizes
each image into (2048, 512) as mmsegmentation's test does and pads it to 2048x2048 (padding is
ignored); unlike mmsegmentation, the label is resized with the image (nearest) instead of the
prediction being resized back to the original label. --config.data.eval_base_size='(512, 512)'
--config.data.eval_pad_size='(512, 512)' evaluates ~16x cheaper, at a smaller scale.

Model and optimisation are experiments/deeplabv3plus_r50_voc_aug.py's: ImageNet-pretrained
ResNet-V1c, output stride 8, depthwise-separable ASPP and decoder, auxiliary FCN head (loss
weight 0.4), SGD 0.01 / momentum 0.9 / weight decay 5e-4, poly 0.9, batch 16, 80k steps.

What to download: ADEChallengeData2016.zip
(http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip), unextracted, into
~/tensorflow_datasets/downloads/manual/ (or --manual_dir); the ImageNet weights as in the README's
"Pretrained weights" (mmcv's ResNet-50-V1c,
https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth).

    python -m segjax.data.ade20k [--manual_dir DIR_WITH_THE_ZIP]
    python -m segjax.train --config experiments/deeplabv3plus_r50_ade20k.py \
        --workdir runs/deeplabv3plus_r50_ade20k \
        --config.pretrained=weights/resnet50_v1c-2cccc1ad.pth
"""

from experiments.deeplabv3plus_r50_voc_aug import get_config as voc_config
from experiments.segformer_b0_ade20k import use_ade20k_data


def get_config():
    config = voc_config()  # model, loss, optimizer, schedule and augmentation as for VOC
    config.num_steps = 80_000
    config.batch_size = 16
    use_ade20k_data(config)  # replaces VOC's data set, crop and pipeline

    config.eval_every = 8000
    config.checkpoint_every = 4000
    config.eval_batch_size = 4
    return config
