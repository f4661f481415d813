"""A small U-Net (width 8, a quarter of the parameters) distilled from a trained width-16 U-Net
on the embedded synthetic-shapes data (Hinton et al. 2015, per pixel; optionally Liu et al.
2019's pair-wise term). Train the teacher first, then the student:

    python -m segjax.train --config experiments/unet_synthetic.py --workdir runs/teacher_unet
    python -m segjax.train --config experiments/distill_unet_synthetic.py --workdir runs/distill

The teacher is experiments/unet_synthetic.py, the zoo's best measured model on these data
(README: 74.37 mIoU at 1,000 steps); a teacher trained elsewhere or with overrides that change
its model is named with --config.trainer.teacher_workdir=<dir> and
--config.trainer.teacher_overrides="('model.base_width=32',)". The student's loss: the
class-weighted cross-entropy + kd_weight x T^2 KL(teacher || student) at temperature T on
the valid pixels; --config.trainer.pairwise_weight=1.0 adds the pair-wise similarity term. The
student alone, for comparison (same steps and seed):

    python -m segjax.train --config experiments/unet_synthetic.py --workdir runs/student \
        --config.model.base_width=8

benchmarks/distillation.py runs all three and reports mIoU, parameters and latency.
Everything else is the unet_synthetic experiment.
"""

import os

from experiments.unet_synthetic import get_config as unet_synthetic_config
from segjax.trainers import distillation

# Beside this file, so the experiment loads from any working directory.
TEACHER_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'unet_synthetic.py')


def get_config():
    config = unet_synthetic_config()
    config.model.base_width = 8

    config.trainer.fn = distillation.trainer
    config.trainer.teacher_config = TEACHER_CONFIG
    config.trainer.teacher_workdir = 'runs/teacher_unet'
    config.trainer.teacher_step = None  # the latest checkpoint
    config.trainer.teacher_overrides = ()
    # Linked, not copied: an override of config.data.mean / std reaches the teacher check.
    config.trainer.image_mean = config.data.get_ref('mean')
    config.trainer.image_std = config.data.get_ref('std')
    config.trainer.kd_weight = 1.0
    config.trainer.temperature = 2.0
    config.trainer.pairwise_weight = 0.0
    config.trainer.pairwise_pool_size = 8
    return config
