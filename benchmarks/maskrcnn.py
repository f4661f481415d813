"""segjax's Mask R-CNN vs torchvision's maskrcnn_resnet50_fpn: training step and inference
s/image at 800 x 1333, alternated in one process on the same weights.

    python benchmarks/maskrcnn.py                         # 800x1333, batches 1 and 2 for training
    python benchmarks/maskrcnn.py --height 128 --width 160 --repeats 1   # smoke
    python benchmarks/maskrcnn.py --json out.json --markdown out.md

Both models are torchvision's maskrcnn_resnet50_fpn architecture as its COCO recipe trains it
(ResNet-50 with FrozenBatchNorm2d, trainable_backbone_layers=3, 91 classes), random weights
made by torchvision and loaded into segjax with `torchvision_weights.load_maskrcnn`. As in
tests/test_maskrcnn.py, the heads are scaled so random weights give detections (without it no
score passes 0.05 and torchvision skips the mask head); the detection counts are reported.

Training step: forward with targets (4 instances per image: boxes, labels, masks), the five
losses summed, backward, SGD update (momentum 0.9, weight decay 1e-4 on the trainable
parameters, a tiny lr: see LR_PER_IMAGE; frozen ones untouched). Memory: batch 1 at 800x1333
took ~9 GB for segjax (process RSS); batch 2 was OOM-killed on a 23 GB machine shared with
other jobs. segjax: one jitted function (value_and_grad of
`maskrcnn.train_losses`, optax masked by `fpn.trainable_mask`), state donated. torchvision:
`zero_grad`, `sum(model(images, targets).values()).backward()`, `step()`.

Inference: one uint8 800 x 1333 image in, detections with masks at the original size out.
segjax: `segjax.instance.inference.detect_images` (host resize/normalise/pad, jitted forward,
masks pasted on the host); torchvision: `model([image / 255])` under inference_mode.

Timing follows benchmarks/peer_pytorch.py: one warm-up call each (compiles), then `--repeats`
alternated pairs (segjax first, a 1 s pause before each call), medians reported. PyTorch uses
every core (`torch.set_num_threads(os.cpu_count())`), XLA too. The load average at the start
and end is recorded: on a shared machine the figures are only indicative.

torch is imported first, before JAX (see peer_pytorch.py).
"""

# ruff: noqa: I001  (torch must be imported before jax: the import order is deliberate)
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch  # first of the heavy imports
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.mask_rcnn import MaskRCNN as TorchMaskRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

import jax
import jax.numpy as jnp
import numpy as np
import optax

from segjax import sharding
from segjax.instance import inference
from segjax.instance.fpn import trainable_mask
from segjax.instance.maskrcnn import MaskRCNN, train_losses
from segjax.instance.torchvision_weights import load_maskrcnn

SETTLE_S = 1.0
INSTANCES = 4
# SGD with torchvision's momentum 0.9 and weight decay 1e-4, but a tiny lr: the scaled random
# weights have a backbone gradient norm of ~3.7e4 at 800x1333 (measured), so the recipe's
# 0.02 / 16 per image made the next step's loss nan. Step time does not depend on the lr.
LR_PER_IMAGE, MOMENTUM, WEIGHT_DECAY = 1e-7, 0.9, 1e-4


def torch_model(seed: int = 0) -> torch.nn.Module:
    """maskrcnn_resnet50_fpn as its COCO recipe builds it (FrozenBN, 3 trainable layers), heads
    scaled so random weights detect (tests/helpers.py's spread_scores)."""
    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
    model = TorchMaskRCNN(backbone, num_classes=91)
    with torch.no_grad():
        for block in model.backbone.fpn.layer_blocks:
            block[0].weight.mul_(0.003)
            block[0].bias.mul_(0.003)
        model.rpn.head.cls_logits.weight.mul_(50)
        model.rpn.head.bbox_pred.weight.mul_(3)
        model.roi_heads.box_predictor.cls_score.weight.mul_(10)
        for name, parameter in model.named_parameters():
            if name.endswith('bias') and not name.startswith('backbone.body'):
                parameter.normal_(0, 0.1)
        for module in model.backbone.body.modules():
            if hasattr(module, 'running_var'):  # random frozen statistics, as the test's
                channels = module.running_var.shape[0]
                module.weight.copy_(torch.rand(channels) + 0.5)
                module.bias.copy_(torch.randn(channels) * 0.1)
                module.running_mean.copy_(torch.randn(channels) * 0.1)
                module.running_var.copy_(torch.rand(channels) + 0.5)
    return model


def random_instances(rng: np.random.Generator, height: int, width: int, count: int):
    """(boxes [count, 4] xyxy, labels [count] in 1..90, masks [count, H, W] uint8: ellipses
    filling their boxes)."""
    corner = rng.uniform(0, [width * 0.7, height * 0.7], (count, 2))
    size = rng.uniform([width * 0.1, height * 0.1], [width * 0.3, height * 0.3], (count, 2))
    boxes = np.concatenate([corner, corner + size], axis=1).astype(np.float32)
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    masks = np.zeros((count, height, width), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks[i] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    return boxes, rng.integers(1, 91, count), masks


class Batch:
    """One fixed random training batch: uint8 images and instances, in both layouts."""

    def __init__(self, batch: int, height: int, width: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        self.instances = [random_instances(rng, height, width, INSTANCES) for _ in range(batch)]


class SegjaxRunner:
    def __init__(self, state_dict: dict, height: int, width: int, lr: float = LR_PER_IMAGE):
        self.model = MaskRCNN()
        canvas = inference.canvas_size([(height, width)])
        self.variables = load_maskrcnn(jax.eval_shape(
            self.model.init, jax.random.key(0), jnp.zeros((1, *canvas, 3))), state_dict)
        self.canvas, self.size = canvas, (height, width)
        self.detect_fn = inference.detector(self.model)
        labels = jax.tree.map(lambda t: 'train' if t else 'frozen',
                              trainable_mask(self.variables['params'], 3))
        self.tx = optax.multi_transform(
            {'train': optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                                  optax.sgd(lr, momentum=MOMENTUM)),
             'frozen': optax.set_to_zero()}, labels)
        self.params = self.variables['params']
        self.opt_state = self.tx.init(self.params)
        self.step = jax.jit(self._step, donate_argnums=(0, 1))
        self.train_inputs = {}
        self.detections = 0

    def _step(self, params, opt_state, images, image_sizes, targets, rng):
        def loss_fn(p):
            out = train_losses(self.model, {**self.variables, 'params': p}, images,
                               image_sizes, targets, rng)
            return sum(out.values())

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def set_train_batch(self, batch: Batch) -> None:
        prepared = inference.prepare_images(list(batch.images), min_size=min(self.size),
                                            max_size=max(self.size), canvas=self.canvas)
        masks = np.zeros((len(batch.images), INSTANCES, *self.canvas), np.float32)
        for b, (_, _, m) in enumerate(batch.instances):
            masks[b, :, :m.shape[1], :m.shape[2]] = m
        targets = {'boxes': np.stack([i[0] for i in batch.instances]),
                   'labels': np.stack([i[1] for i in batch.instances]).astype(np.int32),
                   'masks': masks, 'valid': np.ones((len(batch.images), INSTANCES), bool)}
        self.train_inputs = dict(images=jnp.asarray(prepared.images),
                                 image_sizes=jnp.asarray(prepared.image_sizes),
                                 targets=jax.tree.map(jnp.asarray, targets))

    def train(self, step: int = 0) -> float:
        start = time.perf_counter()
        self.params, self.opt_state, loss = self.step(
            self.params, self.opt_state, rng=jax.random.key(step), **self.train_inputs)
        loss = float(loss)
        elapsed = time.perf_counter() - start
        if not np.isfinite(loss):
            raise FloatingPointError(f'segjax training loss {loss}')
        return elapsed

    def infer(self, image: np.ndarray) -> float:
        start = time.perf_counter()
        variables = {**self.variables, 'params': self.params}
        result = inference.detect_image(self.model, variables, image, min_size=min(self.size),
                                        max_size=max(self.size), detect_fn=self.detect_fn)
        elapsed = time.perf_counter() - start
        self.detections = len(result['scores'])
        return elapsed


class TorchRunner:
    def __init__(self, model: torch.nn.Module, height: int, width: int,
                 lr: float = LR_PER_IMAGE):
        self.model = model
        self.model.transform.min_size = (min(height, width),)
        self.model.transform.max_size = max(height, width)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=lr, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)
        self.detections = 0

    def set_train_batch(self, batch: Batch) -> None:
        self.images = [torch.from_numpy(i.transpose(2, 0, 1).astype(np.float32) / 255)
                       for i in batch.images]
        self.targets = [{'boxes': torch.from_numpy(b), 'labels': torch.from_numpy(lab),
                         'masks': torch.from_numpy(m)} for b, lab, m in batch.instances]

    def train(self, step: int = 0) -> float:
        self.model.train()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(self.model(self.images, self.targets).values())
        loss.backward()
        self.optimizer.step()
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise FloatingPointError(f'torchvision training loss {loss}')
        return elapsed

    def infer(self, image: np.ndarray) -> float:
        self.model.eval()
        start = time.perf_counter()
        with torch.inference_mode():
            tensor = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255)
            result = self.model([tensor])[0]
        elapsed = time.perf_counter() - start
        self.detections = len(result['scores'])
        return elapsed


def alternate(segjax_fn, torch_fn, pairs: int) -> tuple[float, float, list, list]:
    segjax_times, torch_times = [], []
    for i in range(pairs):
        time.sleep(SETTLE_S)
        segjax_times.append(segjax_fn(i + 1))
        time.sleep(SETTLE_S)
        torch_times.append(torch_fn(i + 1))
    return (statistics.median(segjax_times), statistics.median(torch_times), segjax_times,
            torch_times)


def load_average() -> str:
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def timed_row(what: str, batch: int, segjax_fn, torch_fn, repeats: int) -> dict:
    start = time.perf_counter()
    segjax_fn(0)  # warm-up: compiles
    compile_s = time.perf_counter() - start
    torch_first = torch_fn(0)
    segjax_s, torch_s, segjax_all, torch_all = alternate(segjax_fn, torch_fn, repeats)
    return {'what': what, 'batch': batch, 'pairs': repeats,
            'segjax_s': round(segjax_s, 3), 'torch_s': round(torch_s, 3),
            'ratio': round(segjax_s / torch_s, 3),
            'segjax_first_call_s': round(compile_s, 1), 'torch_first_call_s': round(torch_first, 2),
            'segjax_all_s': [round(t, 3) for t in segjax_all],
            'torch_all_s': [round(t, 3) for t in torch_all], 'load_average': load_average()}


def markdown(result: dict) -> str:
    lines = [f'Mask R-CNN R50-FPN, {result["size"]}, torch {result["torch"]} '
             f'({result["torch_threads"]} threads), jax {result["jax"]}, '
             f'{result["cpus"]} CPUs. Load average at start {result["load_start"]}, '
             f'end {result["load_end"]}: a shared machine, figures indicative only.', '',
             '| what | batch | segjax s | torch s | ratio | segjax first call s | loads |',
             '|---|---:|---:|---:|---:|---:|---|']
    for row in result['rows']:
        if 'error' in row:
            lines.append(f'| {row["what"]} | {row["batch"]} | {row["error"]} | | | | |')
            continue
        lines.append(f'| {row["what"]} | {row["batch"]} | {row["segjax_s"]} | {row["torch_s"]} '
                     f'| {row["ratio"]} | {row["segjax_first_call_s"]} | {row["load_average"]} |')
    if 'detections' in result:
        lines += ['', f'Detections per inference call: {result["detections"]}.']
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--height', type=int, default=800)
    parser.add_argument('--width', type=int, default=1333)
    parser.add_argument('--train-batches', default='1,2', help='comma list of batch sizes')
    parser.add_argument('--repeats', type=int, default=3, help='alternated pairs timed')
    parser.add_argument('--json', default=None)
    parser.add_argument('--markdown', default=None)
    args = parser.parse_args()
    sharding.configure_runtime()
    torch.set_num_threads(os.cpu_count())
    result = {'size': f'{args.height}x{args.width}', 'torch': torch.__version__,
              'torchvision': torchvision.__version__, 'jax': jax.__version__,
              'torch_threads': torch.get_num_threads(), 'cpus': os.cpu_count(),
              'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_start': load_average(),
              'rows': []}

    def save() -> None:
        result['load_end'] = load_average()
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(result, f, indent=1)
        if args.markdown:
            with open(args.markdown, 'w') as f:
                f.write(markdown(result))

    model = torch_model()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    segjax_runner = SegjaxRunner(state, args.height, args.width)
    torch_runner = TorchRunner(model, args.height, args.width)
    print(f'torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__},'
          f' load {load_average()}', flush=True)

    image = np.random.default_rng(1).integers(0, 256, (args.height, args.width, 3), np.uint8)
    row = timed_row('inference s/image', 1, lambda _: segjax_runner.infer(image),
                    lambda _: torch_runner.infer(image), args.repeats)
    result['detections'] = {'segjax': segjax_runner.detections,
                            'torch': torch_runner.detections}
    result['rows'].append(row)
    print(json.dumps(row), flush=True)
    save()
    for batch in map(int, args.train_batches.split(',')):
        # Fresh weights and optimizer state for each batch size, on both sides.
        model = torch_model()
        segjax_runner = SegjaxRunner(state, args.height, args.width, LR_PER_IMAGE * batch)
        torch_runner = TorchRunner(model, args.height, args.width, LR_PER_IMAGE * batch)
        data = Batch(batch, args.height, args.width, seed=batch)
        segjax_runner.set_train_batch(data)
        torch_runner.set_train_batch(data)
        try:
            row = timed_row('train step s', batch, segjax_runner.train, torch_runner.train,
                            args.repeats)
        except (MemoryError, RuntimeError, FloatingPointError) as e:
            row = {'what': 'train step s', 'batch': batch,
                   'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
        result['rows'].append(row)
        print(json.dumps(row), flush=True)
        save()
    print(markdown(result))


if __name__ == '__main__':
    main()
