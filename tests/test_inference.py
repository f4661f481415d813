"""Whole-image, sliding-window and multi-scale/flip inference against hand-computed results."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import inference, step


def position_model(x):
    """Logits that depend only on the position inside the input: channel 0 = row, 1 = column."""
    n, h, w, _ = x.shape
    rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[None, :, None], (n, h, w))
    cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, None, :], (n, h, w))
    return jnp.stack([rows, cols], axis=-1) + 0.0 * x[..., :1]


def pixel_model(x):
    """A per-pixel (1x1) function of the colours: flip-equivariant, scale-free."""
    return jnp.stack([x[..., 0] - x[..., 1], x[..., 2], 0.5 * x[..., 0]], axis=-1)


def test_window_starts_cover_the_axis():
    assert inference.window_starts(10, 4, 3) == [0, 3, 6]
    assert inference.window_starts(11, 4, 3) == [0, 3, 6, 7]  # one more, flush with the end
    assert inference.window_starts(3, 4, 3) == [0]  # smaller than the window


def test_one_window_covering_the_image_equals_whole_image():
    images = jax.random.normal(jax.random.key(0), (2, 12, 20, 3))
    whole = inference.whole_logits(pixel_model, images)
    slide = inference.sliding_window_logits(pixel_model, images, window=(12, 20),
                                            stride=(12, 20), window_batch=3)
    np.testing.assert_allclose(slide, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('size', [(9, 13), (7, 5), (3, 4)])  # odd, and smaller than the window
def test_overlapping_windows_average_by_hand(size):
    height, width = size
    window, stride = (4, 6), (3, 4)
    images = jnp.zeros((2, height, width, 3))
    got = jax.jit(functools.partial(inference.sliding_window_logits, position_model,
                                    window=window, stride=stride, window_batch=3))(images)
    # By hand: each pixel averages its position inside every window that covers it.
    padded_h, padded_w = max(height, window[0]), max(width, window[1])
    total = np.zeros((padded_h, padded_w, 2))
    count = np.zeros((padded_h, padded_w, 1))
    for y0 in inference.window_starts(padded_h, window[0], stride[0]):
        for x0 in inference.window_starts(padded_w, window[1], stride[1]):
            for y in range(y0, y0 + window[0]):
                for x in range(x0, x0 + window[1]):
                    total[y, x] += (y - y0, x - x0)
                    count[y, x] += 1
    expected = (total / count)[:height, :width]
    assert got.shape == (2, height, width, 2)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    np.testing.assert_allclose(got[1], expected, rtol=1e-6)


def test_flip_tta_on_a_flip_symmetric_model_equals_plain_inference():
    images = jax.random.normal(jax.random.key(1), (2, 10, 14, 3))
    plain = jax.nn.softmax(pixel_model(images))
    tta = inference.probabilities(pixel_model, images, flip=True)
    np.testing.assert_allclose(tta, plain, rtol=1e-5, atol=1e-6)
    # Composed with sliding windows too.
    slide = inference.probabilities(pixel_model, images, mode='slide', window=(6, 6),
                                    stride=(4, 4), flip=True, window_batch=4)
    np.testing.assert_allclose(slide, plain, rtol=1e-5, atol=1e-6)


def test_multi_scale_averages_probabilities_at_full_resolution():
    images = jnp.ones((1, 8, 8, 3)) * jnp.array([1.0, 0.0, 2.0])  # constant image
    probs = inference.probabilities(pixel_model, images, scales=(0.5, 1.0, 1.75))
    assert probs.shape == (1, 8, 8, 3)
    # Constant input: every scale gives the same per-pixel probabilities.
    np.testing.assert_allclose(probs, jax.nn.softmax(pixel_model(images)), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_multi_scale_flip_matches_pytorch_on_noise():
    # mmsegmentation's test-time augmentation written in torch: F.interpolate bilinear with
    # align_corners=False (no antialiasing) to each scale and back, softmax, mean. With
    # jax.image.resize's default antialiasing the shrinking resizes blurred: 0.2 apart here.
    torch = pytest.importorskip('torch')
    functional = torch.nn.functional
    scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 37, 53, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)

    def conv3x3(x):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                            precision='highest')

    ours = jax.jit(functools.partial(inference.probabilities, conv3x3, scales=scales,
                                     flip=True))(images)
    source = torch.from_numpy(images).permute(0, 3, 1, 2)
    weight = torch.from_numpy(kernel).permute(3, 2, 0, 1)
    height, width = images.shape[1:3]
    expected = 0
    for scale in scales:
        scaled = functional.interpolate(source, size=(round(height * scale), round(width * scale)),
                                        mode='bilinear', align_corners=False)
        for flip in (False, True):
            logits = functional.conv2d(scaled.flip(3) if flip else scaled, weight, padding=1)
            logits = functional.interpolate(logits.flip(3) if flip else logits,
                                            size=(height, width), mode='bilinear',
                                            align_corners=False)
            expected = expected + logits.softmax(1) / (2 * len(scales))
    np.testing.assert_allclose(ours, expected.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)


class PixelNet(nn.Module):
    """A 1x1 convolution: each pixel's prediction depends on that pixel only."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(4, (1, 1))(x)


@pytest.mark.parametrize('inference_options', [None, {
    'mode': 'slide', 'window': (8, 8), 'stride': (5, 5), 'scales': (1.0,), 'flip': True,
    'window_batch': 4}])
def test_padding_never_changes_the_metrics(inference_options):
    model = PixelNet()
    images = jax.random.normal(jax.random.key(2), (2, 13, 11, 3))
    labels = jax.random.randint(jax.random.key(3), (2, 13, 11), 0, 4)
    variables = model.init(jax.random.key(4), images)
    state = step.TrainState(step=0, params=variables['params'], batch_stats={}, opt_state=None,
                            ema={}, nonfinite_run=0, skipped_steps=0)
    batch = {'image': images, 'label': labels, 'valid': jnp.array([True, True])}
    # The same images padded to 16x24 (label 255 there) plus one invalid filler example.
    padded = {'image': jnp.zeros((3, 16, 24, 3)).at[:2, :13, :11].set(images),
              'label': jnp.full((3, 16, 24), 255).at[:2, :13, :11].set(labels),
              'valid': jnp.array([True, True, False])}
    eval_step = functools.partial(step.eval_step, model=model, num_classes=4,
                                  inference_options=inference_options)
    plain, with_padding = eval_step(state, batch), eval_step(state, padded)
    assert int(plain['confusion_matrix'].sum()) == 2 * 13 * 11
    assert int(plain['boundary_union'].sum()) > 0
    for key in ('confusion_matrix', 'boundary_intersection', 'boundary_union'):
        np.testing.assert_array_equal(plain[key], with_padding[key])


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        inference.probabilities(pixel_model, jnp.zeros((1, 4, 4, 3)), mode='tiles')
    with pytest.raises(ValueError, match='needs a window and a stride'):
        inference.probabilities(pixel_model, jnp.zeros((1, 4, 4, 3)), mode='slide')
