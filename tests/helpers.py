"""What several test files do the same way with a command-line training run: stop it with a
signal at a given step, resume it, and restore the state it saved; and the Mask R-CNN models
and conversions the instance tests share; and the fake Cityscapes zips the Cityscapes tests
write."""

import io
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable

import jax
import numpy as np
from PIL import Image
from test_end_to_end import ROOT, checkpoint_steps, run_cli

from segjax import config as config_lib
from segjax import experiment, sharding
from segjax.data import instances
from segjax.instance.torchvision_weights import load_maskrcnn


def signal_training_at(config: str, workdir, overrides, *, step: int,
                       signal_number: int = signal.SIGTERM, delay_s: float = 0.0,
                       timeout: float = 300) -> tuple[int, str]:
    """(exit code, output) of `python -m segjax.train` sent `signal_number` `delay_s` seconds
    after it prints `step {step}/` (never sent if the run ends first)."""
    process = subprocess.Popen(
        [sys.executable, '-m', 'segjax.train', '--config', str(config), '--workdir',
         str(workdir), *map(str, overrides)], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(f'step {step}/'):
            time.sleep(delay_s)
            process.send_signal(signal_number)
            break
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


def sigterm_then_resume(config: str, workdir, overrides, *, step: int,
                        num_steps: int) -> subprocess.CompletedProcess:
    """SIGTERM after `step`: the run exits 0 with a checkpoint short of `num_steps` (the one
    the signal saved); then the same command resumes it to the end. Returns the resumed run."""
    returncode, output = signal_training_at(config, workdir, overrides, step=step)
    assert returncode == 0, output[-3000:]
    assert checkpoint_steps(workdir)[-1] < num_steps, (checkpoint_steps(workdir), output[-3000:])
    return run_cli('segjax.train', '--config', config, '--workdir', workdir, *overrides)


def restored_state(config: str, workdir, overrides, step: int | None = None):
    """The train state a run saved in `workdir` (the latest or `step`), fetched to the host;
    `overrides` are the run's `--config.x=y` flags."""
    loaded = config_lib.load(config, [o[len('--config.'):] for o in overrides])
    _, state = experiment.restore_state(loaded, str(workdir), sharding.make_mesh(), step)
    return jax.device_get(state)


# Mask R-CNN: the models and conversions test_maskrcnn.py, test_instance_train.py,
# test_instance_inference.py and test_instance_trainer.py build the same way. torch and
# torchvision (test-only oracles) are imported inside: tests reach these through the `tv`
# fixture (conftest.py), which skips where they are missing.

# A small segjax MaskRCNN (ResNet-18-FPN, 16 FPN channels, a 32-wide box head, one 16-channel
# mask layer) that compiles its train step in a CPU test; num_classes and the sampling sizes
# are each test's.
TINY_MASKRCNN = dict(depth=18, fpn_channels=16, representation_size=32, mask_layers=(16,),
                     mask_dim_reduced=16)


def nchw(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2)


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def torch_maskrcnn_resnet18(**options):
    """torchvision's MaskRCNN over a ResNet-18-FPN (frozen BatchNorm, the last 3 stages
    trainable as torchvision's default), 5 classes, random weights from torch's generator;
    `options` go to MaskRCNN (min_size, max_size, top-n and sampler sizes)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d
    backbone = _resnet_fpn_extractor(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d),
                                     3)
    return MaskRCNN(backbone, num_classes=5, **options)


def numpy_state_dict(torch_model) -> dict:
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def variables_from_torch(model, images, state_dict: dict):
    """The segjax `model`'s variables (shapes traced on `images` [B, H, W, 3]) filled from a
    torchvision Mask R-CNN state dict."""
    return load_maskrcnn(jax.eval_shape(model.init, jax.random.key(0), images), state_dict)


def spread_scores(torch, model, feature_scale: float = 1.0) -> None:
    """Random RPN weights give objectness logits within ~1e-3 of each other: scaled, the
    proposals' order no longer hangs on float rounding. Class logits likewise. A random
    ResNet-50's FPN levels reach ~2000 (every RPN delta past the exp clip): `feature_scale`
    scales the FPN output convs."""
    with torch.no_grad():
        for block in model.backbone.fpn.layer_blocks:
            block[0].weight.mul_(feature_scale)
            block[0].bias.mul_(feature_scale)
        model.rpn.head.cls_logits.weight.mul_(50)
        model.rpn.head.bbox_pred.weight.mul_(3)
        model.roi_heads.box_predictor.cls_score.weight.mul_(10)
        for name, parameter in model.named_parameters():
            if name.endswith('bias') and not name.startswith('backbone.body'):
                parameter.normal_(0, 0.1)
        for module in model.backbone.body.modules():
            if hasattr(module, 'running_var'):  # BatchNorm2d or FrozenBatchNorm2d
                channels = module.running_var.shape[0]
                module.weight.copy_(torch.rand(channels) + 0.5)
                module.bias.copy_(torch.randn(channels) * 0.1)
                module.running_mean.copy_(torch.randn(channels) * 0.1)
                module.running_var.copy_(torch.rand(channels) + 0.5)


# Cityscapes: the two official zips, written the same way by test_cityscapes.py and
# test_cityscapes_instances.py (each with its own images and gtFine files).
CITYSCAPES_ZIPS = ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip')


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='PNG')
    return buffer.getvalue()


def write_cityscapes_zips(directory, frames: list[tuple[str, str, str]],
                          image: Callable[[str], np.ndarray],
                          gt_fine: Callable[[str, str], dict[str, bytes]],
                          image_replace: dict | None = None,
                          label_replace: dict | None = None) -> None:
    """CITYSCAPES_ZIPS in `directory`: README and license.txt at the top, then for each
    (split, city, image id) of `frames` leftImg8bit/<split>/<city>/<id>_leftImg8bit.png
    (`image(id)`) and gtFine/<split>/<city>/<id>_gtFine_<suffix> for each {suffix: bytes} of
    `gt_fine(split, id)`. The replace dicts set members ({name: bytes, or None to leave it
    out})."""
    images = {'README': b'leftImg8bit', 'license.txt': b'license'}
    labels = {'README': b'gtFine', 'license.txt': b'license'}
    for split, city, image_id in frames:
        images[f'leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png'] = png(image(image_id))
        for suffix, data in gt_fine(split, image_id).items():
            labels[f'gtFine/{split}/{city}/{image_id}_gtFine_{suffix}'] = data
    for members, replace in ((images, image_replace), (labels, label_replace)):
        for name, data in (replace or {}).items():
            if data is None:
                del members[name]
            else:
                members[name] = data
    for name, members in zip(CITYSCAPES_ZIPS, (images, labels), strict=True):
        with zipfile.ZipFile(directory / name, 'w') as archive:
            for member in sorted(members):
                archive.writestr(member, members[member])


def prepared_instances(config, data_dir) -> instances.SyntheticInstances:
    """The synthetic_instances builder of `config` (a name or a SyntheticShapesConfig),
    prepared in `data_dir`."""
    builder = instances.SyntheticInstances(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder

