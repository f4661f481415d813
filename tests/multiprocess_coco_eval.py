"""Run by tests/test_instance_multihost_eval.py, as one process or as one of several: the COCO
evaluation of a randomly initialised tiny Mask R-CNN (seed 0) on splits of the smoke instances
data, through the trainer's own `evaluate`; writes {split: {'metrics', 'evaluator' (the
CocoEvaluator's export: every image, annotation and detection pycocotools saw)}} as JSON.

    python tests/multiprocess_coco_eval.py DATA_DIR OUT.json                  # one process
    python tests/multiprocess_coco_eval.py DATA_DIR OUT.json HOST:PORT PROCESS_ID NUM_PROCESSES

DATA_DIR must hold the prepared smoke data (synthetic_instances/smoke); each process writes
OUT.json.<process id>.
"""

import json
import sys

import jax
import optax
from helpers import TINY_MASKRCNN

from segjax import config as config_lib
from segjax import sharding
from segjax.data import instances, synthetic
from segjax.instance import evaluation, maskrcnn
from segjax.trainers import instance

CANVAS = 64  # the 32 px smoke images resized x2 (FPN's smallest anchors are 32 px)
NUM_CLASSES = len(synthetic.CLASS_NAMES)
# Global eval batch 4: 1 image per device on 4 devices (2 processes x 2, or 1 x 4).
EVAL_BATCH = 4
# 9 images: slices of 5 and 4 on 2 processes (local batch 2), so process 1 runs one batch of
# padding only; 'train[:3]+validation[:6]': each part split on its own (5 and 4 again), so
# each process's images are not one contiguous run of the split.
SPLITS = ('validation[:9]', 'train[:3]+validation[:6]')


def evaluate(data_dir: str) -> dict:
    builder = instances.SyntheticInstances(config='smoke', data_dir=data_dir)
    model = maskrcnn.MaskRCNN(**TINY_MASKRCNN, num_classes=NUM_CLASSES,
                              rpn_pre_nms_top_n=100, rpn_post_nms_top_n=20,
                              detections_per_image=10)
    trainer = instance.trainer(model=model, tx=optax.sgd(0.1), loss_fn=None,
                               num_classes=NUM_CLASSES, ignore_index=255,
                               image_shape=(1, CANVAS, CANVAS, 3), min_size=CANVAS,
                               max_size=CANVAS)
    mesh = sharding.make_mesh()
    state = jax.jit(trainer.init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    config = config_lib.defaults()
    config.data.num_classes, config.data.crop_size = NUM_CLASSES, (CANVAS, CANVAS)
    config.eval_batch_size = EVAL_BATCH
    results = {}
    for split in SPLITS:
        config.data.eval_split = split
        metrics = trainer.evaluate(state, builder, config, mesh)
        # The same evaluation (the trainer's detect_fn and sizes), for what pycocotools saw.
        evaluator = evaluation.coco_evaluator_over_split(state, builder, config, mesh,
                                                         **trainer.evaluate.keywords)
        results[split] = {'metrics': metrics, 'evaluator': evaluator.export()}
    return results


if __name__ == '__main__':
    data_dir, out = sys.argv[1], sys.argv[2]
    process_id = 0
    if len(sys.argv) > 3:
        coordinator, process_id, num_processes = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        sharding.initialize_multihost(coordinator, num_processes, process_id)
    with open(f'{out}.{process_id}', 'w') as f:
        json.dump(evaluate(data_dir), f)
