"""Parameters and GFLOPs at 512x512 of every model family, for the README's model table.

    python benchmarks/model_table.py

FLOPs come from XLA's cost analysis of the jitted inference forward pass (batch 1, 512x512x3,
21 classes, no auxiliary head) and count a multiply-add as 2 FLOPs; papers and mmsegmentation's
get_flops usually count multiply-adds ("GFLOPs" there = GMACs here / 2). Nothing runs: the
models are only traced and lowered, so this takes seconds per model on a CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from segjax.models import deeplab, fcn, pspnet, resnet, segformer, segnet, unet

# (family, backbone, model, experiment file or '-'), the models as the experiments build them.
MODELS = [
    ('FCN (torchvision fcn_resnet50)', 'ResNet-50, OS8', fcn.FCNResNet50, '-'),
    ('FCN', 'ResNet-50-V1c, OS8', functools.partial(fcn.FCNResNet50, deep_stem=True),
     'fcn_r50_{voc_aug,cityscapes}.py'),
    ('FCN-8s', 'ResNet-50, OS32', fcn.FCN8sResNet50, '-'),
    ('FCN-8s', 'VGG-style BN, width 64', functools.partial(fcn.FCN8s, base_width=64),
     'fcn_{voc_aug,cityscapes}.py'),
    ('PSPNet', 'ResNet-50-V1c, OS8', functools.partial(pspnet.PSPNetResNet50, deep_stem=True),
     'pspnet_r50_{voc_aug,cityscapes}.py'),
    ('DeepLabV3 (torchvision deeplabv3_resnet50)', 'ResNet-50, OS8', deeplab.DeepLabV3ResNet50,
     '-'),
    ('DeepLabV3', 'ResNet-50-V1c, OS8, 512 wide',
     functools.partial(deeplab.DeepLabV3ResNet50, deep_stem=True, channels=512),
     'deeplabv3_r50_{voc_aug,cityscapes}.py'),
    ('DeepLabV3+', 'ResNet-50-V1c, OS8, separable, 512 wide',
     functools.partial(deeplab.DeepLabV3PlusResNet50, deep_stem=True, output_stride=8,
                       channels=512, separable=True),
     'deeplabv3plus_r50_{voc_aug,cityscapes}.py'),
    ('DeepLabV3+', 'ResNet-101-V1c, OS8, separable, 512 wide',
     functools.partial(deeplab.DeepLabV3PlusResNet101, deep_stem=True, output_stride=8,
                       channels=512, separable=True),
     'deeplabv3plus_r101_{voc_aug,cityscapes}.py'),
    ('DeepLabV3+', 'ResNet-50, OS16', deeplab.DeepLabV3PlusResNet50, '-'),
    ('U-Net', 'width 64, 4 levels', unet.UNetClassic, '-'),
    ('U-Net', 'width 16, 4 levels', unet.UNetSmall, 'unet_synthetic.py'),
    ('SegNet', 'VGG16-BN encoder', segnet.SegNetVGG16, '-'),
    ('SegNet', 'width 16', functools.partial(segnet.SegNet, base_width=16),
     'segnet_synthetic.py'),
    ('SegFormer-B0', 'MiT-B0, decoder 256 wide', segformer.SegFormerB0,
     'segformer_b0_{ade20k,cityscapes}.py'),
    ('SegFormer-B2', 'MiT-B2, decoder 768 wide', segformer.SegFormerB2, 'segformer_b2_ade20k.py'),
]


def measure(model_fn, size: int = 512, num_classes: int = 21) -> tuple[int, float]:
    """(parameter count, GFLOPs of one size x size forward pass)."""
    model = model_fn(num_classes=num_classes)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    params = sum(leaf.size for leaf in jax.tree.leaves(variables['params']))
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images)
    return params, lowered.cost_analysis()['flops'] / 1e9


def main() -> None:
    print('| family | backbone | params | GFLOPs 512x512 | experiment |')
    print('|---|---|---:|---:|---|')
    for family, backbone, model_fn, experiment_file in MODELS:
        params, gflops = measure(model_fn)
        print(f'| {family} | {backbone} | {params / 1e6:.2f}M | {gflops:.1f} | '
              f'{experiment_file} |', flush=True)
    params = sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(
        lambda: resnet.ResNetClassifier(depth=50).init(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))['params']))
    print(f'\nResNet-50 classifier (reference for the backbone): {params:,} parameters')


if __name__ == '__main__':
    main()
