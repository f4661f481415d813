"""Plain-PyTorch twins of four segjax models, for the peer step-time benchmark.

Each twin has the same layers as its segjax model (convolutions with the same kernel sizes,
strides, dilations and widths, BatchNorm, ReLU, dropout, bilinear upsampling with half-pixel
centres) and exactly the same number of trainable parameters, so segjax's step time can be set
against PyTorch's on the same machine. Twins take NCHW images and return logits
[B, num_classes, H, W] at input resolution (a tensor, never a dict).

    python benchmarks/torch_models.py   # checks parameter counts and U-Net numerical parity

torch and torchvision are needed here only; the segjax library never imports them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, so not counted)."""
    return sum(p.numel() for p in module.parameters())


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3,
                 dilation: int = 1) -> nn.Sequential:
    """segjax's ConvBN / ConvBNReLU: bias-free convolution (symmetric padding), BN, ReLU."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),  # eps 1e-5, momentum 0.1: segjax's batch_norm defaults
        nn.ReLU(inplace=True))


def upsample(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """segjax's resize_bilinear (jax.image.resize, half-pixel centres) when upsampling."""
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


# ------------------------------------------------------------------------------------ U-Net
class UNet(nn.Module):
    """segjax.models.unet.UNet: two ConvBNReLU per level, 2x2 max pool, 2x2 stride-2 transposed
    convolution (with bias), concat [skip, upsampled], 1x1 classifier (with bias)."""

    def __init__(self, num_classes: int, base_width: int = 32, depth: int = 3):
        super().__init__()
        self.depth = depth
        widths = [base_width * 2**level for level in range(depth + 1)]

        def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
            return nn.Sequential(conv_bn_relu(in_channels, out_channels),
                                 conv_bn_relu(out_channels, out_channels))

        self.down = nn.ModuleList(
            double_conv(c_in, c_out) for c_in, c_out in zip([3] + widths[:-2], widths[:-1],
                                                             strict=True))
        self.middle = double_conv(widths[-2], widths[-1])
        # Decoder lists run from the deepest level up, in the order they are applied.
        levels = list(reversed(range(depth)))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2) for level in levels)
        self.up_convs = nn.ModuleList(
            double_conv(2 * widths[level], widths[level]) for level in levels)
        self.classifier = nn.Conv2d(base_width, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # As segjax: zero-pad bottom/right to a multiple of 2**depth, crop the logits back.
        height, width = images.shape[-2:]
        multiple = 2**self.depth
        x = F.pad(images, (0, -width % multiple, 0, -height % multiple))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for up, block, skip in zip(self.up, self.up_convs, reversed(skips), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.classifier(x)[:, :, :height, :width]


def unet(num_classes: int, base_width: int = 32, depth: int = 3) -> nn.Module:
    """Twin of `segjax.models.unet.UNet(num_classes, base_width, depth)`."""
    return UNet(num_classes, base_width, depth)


# ------------------------------------------------------------------- dilated ResNet-50 models
class ResNet50Features(nn.Module):
    """torchvision's ResNet-50 (V1.5) without avgpool/fc, dilated to `output_stride` like
    segjax's ResNet; returns (layer1, layer4). Submodule names follow torchvision's."""

    def __init__(self, output_stride: int):
        super().__init__()
        dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
        resnet = torchvision.models.resnet50(
            weights=None, replace_stride_with_dilation=dilate[output_stride])
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        layer1 = self.layer1(x)
        return layer1, self.layer4(self.layer3(self.layer2(layer1)))


class LogitsOnly(nn.Module):
    """A torchvision segmentation model's 'out' entry, so every twin returns a tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)['out']


def fcn_resnet50(num_classes: int) -> nn.Module:
    """Twin of `segjax.models.fcn.FCNResNet50(num_classes)`: torchvision's fcn_resnet50
    (output stride 8, FCNHead 2048 -> 512 -> classes), without the auxiliary head."""
    model = torchvision.models.segmentation.fcn_resnet50(
        weights=None, weights_backbone=None, aux_loss=False, num_classes=num_classes)
    return LogitsOnly(model)


class PSPNet(nn.Module):
    """segjax.models.pspnet.PSPNet on ResNet-50 (plain stem, output stride 8): adaptive average
    pooling to each bin size, 1x1 ConvBN-ReLU, upsampled and concatenated after the features;
    3x3 ConvBN-ReLU bottleneck, dropout, 1x1 classifier."""

    def __init__(self, num_classes: int, channels: int = 512, bins: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.backbone = ResNet50Features(output_stride=8)
        # segjax's adaptive_avg_pool is defined as torch's AdaptiveAvgPool2d (same bin edges).
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(2048, channels, 1)) for b in bins)
        self.bottleneck = conv_bn_relu(2048 + len(bins) * channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, x = self.backbone(images)
        x = torch.cat([x] + [upsample(branch(x), x.shape[-2:]) for branch in self.ppm], dim=1)
        logits = self.classifier(self.dropout(self.bottleneck(x)))
        return upsample(logits, images.shape[-2:])


def pspnet_resnet50(num_classes: int) -> nn.Module:
    """Twin of `segjax.models.pspnet.PSPNetResNet50(num_classes)`."""
    return PSPNet(num_classes)


class ASPP(nn.Module):
    """segjax.models.deeplab.ASPP (non-separable): a 1x1 branch, a dilated 3x3 branch per rate
    and image pooling (global mean, 1x1 ConvBN-ReLU, broadcast), concatenated and projected by a
    1x1 ConvBN-ReLU, then dropout."""

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, ...], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)]
            + [conv_bn_relu(in_channels, channels, 3, dilation=rate) for rate in rates])
        # Its BatchNorm sees one value per channel and image: train mode needs batch > 1.
        self.pooling = conv_bn_relu(in_channels, channels, 1)
        self.project = conv_bn_relu((len(rates) + 2) * channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooling(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        x = torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1)
        return self.dropout(self.project(x))


class DeepLabV3Plus(nn.Module):
    """segjax.models.deeplab.DeepLabV3Plus on ResNet-50 with its defaults: output stride 16,
    ASPP rates (6, 12, 18) with dropout 0.1, 48-channel layer1 projection, concat [low, ASPP]
    at stride 4, two 3x3 ConvBN-ReLU, dropout 0.1, 1x1 classifier."""

    def __init__(self, num_classes: int, channels: int = 256, low_level_channels: int = 48,
                 dropout: float = 0.1):
        super().__init__()
        self.backbone = ResNet50Features(output_stride=16)
        self.aspp = ASPP(2048, channels, rates=(6, 12, 18), dropout=0.1)
        self.low_level = conv_bn_relu(256, low_level_channels, 1)
        self.decoder = nn.Sequential(conv_bn_relu(low_level_channels + channels, channels, 3),
                                     conv_bn_relu(channels, channels, 3))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layer1, layer4 = self.backbone(images)
        low = self.low_level(layer1)
        x = torch.cat([low, upsample(self.aspp(layer4), low.shape[-2:])], dim=1)
        logits = self.classifier(self.dropout(self.decoder(x)))
        return upsample(logits, images.shape[-2:])


def deeplabv3plus_resnet50(num_classes: int) -> nn.Module:
    """Twin of `segjax.models.deeplab.DeepLabV3PlusResNet50(num_classes)` (its defaults)."""
    return DeepLabV3Plus(num_classes)


# The four twin builders, each called with num_classes; nothing more than a tuple.
TWINS = (unet, fcn_resnet50, pspnet_resnet50, deeplabv3plus_resnet50)


# ------------------------------------------------------------------------------------ checks
def check_parameter_counts(num_classes: int = 21) -> None:
    """Prints segjax's and the twin's trainable parameter counts and asserts they are equal.

    segjax's count comes from `jax.eval_shape` of `init`: shapes only, nothing is computed.
    """
    import functools

    import jax
    import jax.numpy as jnp

    from segjax.models import deeplab, fcn, pspnet
    from segjax.models import unet as segjax_unet

    pairs = [  # (twin, segjax model, input side)
        (unet, functools.partial(segjax_unet.UNet, base_width=32, depth=3), 256),
        (fcn_resnet50, fcn.FCNResNet50, 512),
        (pspnet_resnet50, pspnet.PSPNetResNet50, 512),
        (deeplabv3plus_resnet50, deeplab.DeepLabV3PlusResNet50, 512),
    ]
    for twin, model_cls, side in pairs:
        model = model_cls(num_classes)
        shapes = jax.eval_shape(lambda model=model, side=side: model.init(
            jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False))
        segjax_count = sum(leaf.size for leaf in jax.tree.leaves(shapes['params']))
        torch_count = parameter_count(twin(num_classes))
        print(f'{twin.__name__:24s} segjax {segjax_count:>11,d}  torch {torch_count:>11,d}')
        assert segjax_count == torch_count, (twin.__name__, segjax_count, torch_count)


def check_unet_parity(size: int = 64, num_classes: int = 21) -> float:
    """Copies a segjax U-Net's variables (random BN statistics too) into the torch twin and
    returns the largest absolute difference of their eval-mode logits on a random image."""
    import jax
    import jax.numpy as jnp

    from segjax.models import unet as segjax_unet

    rng = np.random.default_rng(0)
    model = segjax_unet.UNet(num_classes, base_width=32, depth=3)
    images = rng.normal(size=(1, size, size, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), jnp.asarray(images), train=False)
    params = jax.tree.map(np.asarray, variables['params'])
    stats = jax.tree.map(np.asarray, variables['batch_stats'])
    twin = unet(num_classes, base_width=32, depth=3).eval()

    def copy(tensor: torch.Tensor, value: np.ndarray) -> None:
        tensor.copy_(torch.from_numpy(np.array(value, np.float32)))  # a writable copy

    with torch.no_grad():
        # flax numbers ConvBNReLU modules in creation order: encoder, middle, decoder.
        blocks = [*twin.down, twin.middle, *twin.up_convs]
        for index, (conv, bn, _) in enumerate(cbr for block in blocks for cbr in block):
            name = f'ConvBNReLU_{index}'
            copy(conv.weight, params[name]['Conv_0']['kernel'].transpose(3, 2, 0, 1))  # HWIO
            channels = bn.num_features  # random affine and statistics, so BN is exercised
            values = {'weight': rng.uniform(0.5, 1.5, channels),
                      'bias': rng.normal(0, 0.1, channels),
                      'running_mean': rng.normal(0, 0.1, channels),
                      'running_var': rng.uniform(0.5, 1.5, channels)}
            params[name]['BatchNorm_0'].update(scale=values['weight'], bias=values['bias'])
            stats[name]['BatchNorm_0'].update(mean=values['running_mean'],
                                              var=values['running_var'])
            for key, value in values.items():
                copy(getattr(bn, key), value)
        for index, up in enumerate(twin.up):
            kernel = params[f'ConvTranspose2x2_{index}']['kernel']  # (2, 2, in, out)
            # segjax: out(2i+a, 2j+c) = x[i,j] @ kernel[1-a, 1-c]; torch: x[i,j] @ w[:, :, a, c].
            copy(up.weight, kernel[::-1, ::-1].transpose(2, 3, 0, 1))
            copy(up.bias, params[f'ConvTranspose2x2_{index}']['bias'])
        copy(twin.classifier.weight, params['Conv_0']['kernel'].transpose(3, 2, 0, 1))
        copy(twin.classifier.bias, params['Conv_0']['bias'])
        torch_logits = twin(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

    segjax_logits = np.asarray(model.apply({'params': params, 'batch_stats': stats},
                                           jnp.asarray(images), train=False))
    difference = float(np.abs(segjax_logits.transpose(0, 3, 1, 2) - torch_logits).max())
    print(f'U-Net parity: max |segjax - torch| = {difference:.2e} '
          f'(logits up to {np.abs(torch_logits).max():.2f})')
    return difference


if __name__ == '__main__':
    check_parameter_counts()
    assert check_unet_parity() < 1e-4
