"""The discriminators of adversarial segmentation: PyTorch re-implementations of the references
(AdvSemiSeg's FCDiscriminator, Luc et al.'s network) as oracles, the model contract (shapes,
float32 logits from bfloat16 compute, jit, gradients), and parameter counts by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.discriminator import ImageLabelDiscriminator, PixelDiscriminator


def _probabilities(shape, seed=0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def _torch_fc_discriminator(torch, num_classes: int, ndf: int):
    """hfslyc/AdvSemiSeg model/discriminator.py FCDiscriminator, layer for layer."""
    nn = torch.nn

    class FCDiscriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(num_classes, ndf, kernel_size=4, stride=2, padding=1)
            self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
            self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
            self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
            self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
            self.leaky_relu = nn.LeakyReLU(negative_slope=0.2)

        def forward(self, x):
            for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
                x = self.leaky_relu(conv(x))
            return self.classifier(x)

    torch.manual_seed(0)
    return FCDiscriminator().eval()


def _flax_params_from_torch(torch_model) -> dict:
    """Each torch Conv2d `name.weight` (OIHW) / `name.bias` as flax {'name': kernel HWIO, bias}."""
    params = {}
    for name, module in torch_model.named_children():
        if hasattr(module, 'weight'):
            params[name] = {'kernel': module.weight.detach().numpy().transpose(2, 3, 1, 0),
                            'bias': module.bias.detach().numpy()}
    return {'params': params}


def _to_nchw(torch, x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize('height, width', [(64, 96), (70, 45)])  # 2x3 and 2x1 logit maps
def test_pixel_discriminator_matches_adv_semi_seg(height, width):
    torch = pytest.importorskip('torch')
    num_classes, ndf = 3, 8
    reference = _torch_fc_discriminator(torch, num_classes, ndf)
    variables = _flax_params_from_torch(reference)
    probabilities = _probabilities((2, height, width, num_classes))
    model = PixelDiscriminator(features=ndf)
    # Same parameter tree as flax's own init: the names and shapes are AdvSemiSeg's.
    abstract = jax.eval_shape(model.init, jax.random.key(0), probabilities)
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(np.shape, variables)

    with torch.no_grad():
        expected = reference(_to_nchw(torch, probabilities))  # [B,1,h,w]
        expected_upsampled = torch.nn.functional.interpolate(
            expected, size=(height, width), mode='bilinear', align_corners=False)
    logits = model.apply(variables, probabilities, method=PixelDiscriminator.logits_at_stride_32)
    assert logits.shape == (2, height // 32, width // 32)
    np.testing.assert_allclose(logits, expected[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    upsampled = model.apply(variables, probabilities)
    assert upsampled.shape == (2, height, width) and upsampled.dtype == jnp.float32
    np.testing.assert_allclose(upsampled, expected_upsampled[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_pixel_discriminator_parameter_count():
    num_classes, ndf = 5, 8
    channels = [num_classes, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 1]
    expected = sum(4 * 4 * cin * cout + cout for cin, cout in zip(channels[:-1], channels[1:],
                                                                  strict=True))
    assert expected == 44_793  # 16 * (40 + 128 + 512 + 2048 + 64) + (8 + 16 + 32 + 64 + 1)
    abstract = jax.eval_shape(PixelDiscriminator(features=ndf).init, jax.random.key(0),
                              jnp.zeros((1, 32, 32, num_classes)))
    assert sum(leaf.size for leaf in jax.tree.leaves(abstract)) == expected
    # The paper's default width on VOC's 21 classes: 2.78M parameters (by the same formula).
    abstract = jax.eval_shape(PixelDiscriminator().init, jax.random.key(0),
                              jnp.zeros((1, 32, 32, 21)))
    assert sum(leaf.size for leaf in jax.tree.leaves(abstract)) == 2_783_169


def _torch_luc_discriminator(torch, num_classes: int, features: int, fusion: str):
    """Luc et al.'s network as ImageLabelDiscriminator documents it, written in torch."""
    nn = torch.nn

    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            label_in = 3 * num_classes if fusion == 'product' else num_classes
            self.label_conv = nn.Conv2d(label_in, features, 5, padding=2)
            if fusion == 'concat':
                self.image_conv1 = nn.Conv2d(3, features // 4, 5, padding=2)
                self.image_conv2 = nn.Conv2d(features // 4, features, 5, padding=2)
            trunk_in = features if fusion == 'product' else 2 * features
            self.conv1 = nn.Conv2d(trunk_in, 2 * features, 3, padding=1)
            self.conv2 = nn.Conv2d(2 * features, 4 * features, 3, padding=1)
            self.conv3 = nn.Conv2d(4 * features, 8 * features, 3, padding=1)
            self.classifier = nn.Conv2d(8 * features, 1, 3, padding=1)

        def forward(self, image, labels):
            relu, pool = torch.relu, nn.functional.max_pool2d
            if fusion == 'product':
                batch, _, height, width = image.shape
                product = labels[:, :, None] * image[:, None]  # [B,C,3,H,W]
                x = self.label_conv(product.reshape(batch, -1, height, width))
            else:
                image = self.image_conv2(relu(self.image_conv1(image)))
                x = torch.cat([self.label_conv(labels), image], dim=1)
            x = relu(self.conv1(relu(x)))
            x = relu(self.conv2(pool(x, 2)))
            x = relu(self.conv3(pool(x, 2)))
            return self.classifier(x).mean(dim=(1, 2, 3))

    torch.manual_seed(0)
    return Discriminator().eval()


@pytest.mark.parametrize('fusion', ['concat', 'product'])
def test_image_label_discriminator_matches_torch(fusion):
    torch = pytest.importorskip('torch')
    num_classes, features = 3, 8
    reference = _torch_luc_discriminator(torch, num_classes, features, fusion)
    variables = _flax_params_from_torch(reference)
    # Odd sizes: both poolings drop a last row or column, as torch's.
    images = np.random.default_rng(1).normal(size=(2, 19, 22, 3)).astype(np.float32)
    label_maps = _probabilities((2, 19, 22, num_classes))
    model = ImageLabelDiscriminator(features=features, fusion=fusion)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images, label_maps)
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(np.shape, variables)
    with torch.no_grad():
        expected = reference(_to_nchw(torch, images), _to_nchw(torch, label_maps)).numpy()
    logits = model.apply(variables, images, label_maps)
    assert logits.shape == (2,) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_image_label_discriminator_parameter_count():
    num_classes, f = 5, 8
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    trunk = conv(3, 2 * f, 2 * f) + conv(3, 2 * f, 4 * f) + conv(3, 4 * f, 8 * f) + conv(
        3, 8 * f, 1)
    concat = conv(5, num_classes, f) + conv(5, 3, f // 4) + conv(5, f // 4, f) + trunk
    # Product fusion: no image branch; the label branch sees 3C channels and the trunk only f.
    product = conv(5, 3 * num_classes, f) + trunk - conv(3, 2 * f, 2 * f) + conv(3, f, 2 * f)
    shapes = (jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, num_classes)))
    for fusion, expected in (('concat', concat), ('product', product)):
        abstract = jax.eval_shape(ImageLabelDiscriminator(features=f, fusion=fusion).init,
                                  jax.random.key(0), *shapes)
        assert sum(leaf.size for leaf in jax.tree.leaves(abstract)) == expected


def _models_and_inputs(num_classes=3, size=32):
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, size, size, 3)), jnp.float32)
    label_maps = jnp.asarray(_probabilities((2, size, size, num_classes), seed=3))
    return {
        'pixel': (functools.partial(PixelDiscriminator, features=4), (label_maps,),
                  (2, size, size)),
        'concat': (functools.partial(ImageLabelDiscriminator, features=4, fusion='concat'),
                   (images, label_maps), (2,)),
        'product': (functools.partial(ImageLabelDiscriminator, features=4, fusion='product'),
                    (images, label_maps), (2,)),
    }


def _fast_jit(fn, *args):
    """fn compiled for args without XLA's backend optimisations: `init` (its truncated-normal
    draws) compiles in ~20 s with them and ~2.5 s without on a 2-core CPU."""
    return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


@functools.cache
def _initialised(name: str) -> tuple:
    """(make, inputs, output shape, init compiled once, variables from key 0)."""
    make, inputs, out_shape = _models_and_inputs()[name]
    init = _fast_jit(make().init, jax.random.key(0), *inputs)
    return make, inputs, out_shape, init, init(jax.random.key(0), *inputs)


@pytest.mark.parametrize('name', ['pixel', 'concat', 'product'])
def test_contract_float32_logits_from_bfloat16_jit_and_deterministic_init(name):
    make, inputs, out_shape, init, variables = _initialised(name)
    again, other = init(jax.random.key(0), *inputs), init(jax.random.key(1), *inputs)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, again))
    # Every kernel differs under another key (biases start at zero under any key).
    for path, kernel in jax.tree_util.tree_leaves_with_path(variables):
        if path[-1].key == 'kernel':
            assert not bool(jnp.array_equal(kernel, other['params'][path[1].key]['kernel'])), path
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
    apply_float32 = functools.partial(make().apply, train=True)
    float32 = _fast_jit(apply_float32, variables, *inputs)(variables, *inputs)
    # The same float32 parameters serve bfloat16 compute; the logits come back float32.
    apply_bfloat16 = make(dtype=jnp.bfloat16).apply
    bfloat16 = _fast_jit(apply_bfloat16, variables, *inputs)(variables, *inputs)
    for logits in (float32, bfloat16):
        assert logits.shape == out_shape and logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))
    # bfloat16 really computed (not float32 in disguise), to its ~3 significant digits.
    assert not bool(jnp.array_equal(bfloat16, float32))
    np.testing.assert_allclose(bfloat16, float32,
                               atol=5e-4 + 0.03 * float(jnp.abs(float32).max()))


@pytest.mark.parametrize('name', ['pixel', 'concat', 'product'])
def test_gradients_finite_and_nonzero(name):
    make, inputs, _, _, variables = _initialised(name)
    model = make()

    def loss(params, *inputs):
        # Per-pixel / per-image BCE against 'real', the adversarial loss's shape.
        logits = model.apply({'params': params}, *inputs)
        return jnp.mean(jax.nn.softplus(-logits))

    grad_fn = jax.grad(loss, argnums=tuple(range(len(inputs) + 1)))
    grads = _fast_jit(grad_fn, variables['params'], *inputs)(variables['params'], *inputs)
    for grad in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(grad)))
    for path, grad in jax.tree_util.tree_leaves_with_path(grads[0]):
        assert float(jnp.abs(grad).max()) > 0, path
    for grad in grads[1:]:  # every input (probabilities, and the image) gets a gradient
        assert float(jnp.abs(grad).max()) > 0


def test_pixel_discriminator_bad_input():
    model = PixelDiscriminator(features=4)
    with pytest.raises(ValueError, match=r'H, W = 31, 64 is too small.*at least 32'):
        model.init(jax.random.key(0), jnp.zeros((1, 31, 64, 3)))
    with pytest.raises(ValueError, match=r'\[B,H,W,num_classes\], got shape \(32, 32, 3\)'):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_image_label_discriminator_bad_input():
    images, labels = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"fusion='sum'; expected 'concat' or 'product'"):
        ImageLabelDiscriminator(fusion='sum').init(jax.random.key(0), images, labels)
    with pytest.raises(ValueError, match=r'same B, H, W'):
        ImageLabelDiscriminator().init(jax.random.key(0), images, labels[:, :7])
    with pytest.raises(ValueError, match=r'at least 4'):
        ImageLabelDiscriminator().init(jax.random.key(0), images[:, :3], labels[:, :3])
