"""resize_bilinear, segjax's one resize: half-pixel centres, no antialiasing, up and down.

Golden values by hand, then PyTorch's F.interpolate(mode='bilinear', align_corners=False)
(mmsegmentation's resize) and tf.image.resize (the training pipeline's) as oracles.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from segjax.models import layers
from segjax.models.layers import resize_bilinear

# (input h, w) -> (output h, w): scales 0.75, 1.25, 1.5, 2 and 0.5, sizes that are no simple
# ratio (33 -> 17, 17 -> 64), up on one axis and down on the other, and to/from one pixel.
SIZES = [((16, 20), (12, 15)), ((16, 20), (20, 25)), ((16, 20), (24, 30)), ((16, 20), (32, 40)),
         ((16, 20), (8, 10)), ((33, 33), (17, 17)), ((17, 17), (64, 64)), ((20, 12), (15, 30)),
         ((7, 5), (1, 1)), ((1, 1), (4, 3)), ((13, 203), (97, 61))]


def resize_jit(x, height, width):
    return jax.jit(resize_bilinear, static_argnums=(1, 2))(x, height, width)


def noise(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_docstring_examples():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(resize_bilinear, module=layers,
                                             globs={'resize_bilinear': resize_bilinear}):
        runner.run(test)
    assert runner.summarize(verbose=False) == doctest.TestResults(failed=0, attempted=4)


def test_golden_values_by_hand():
    # x = 10 * row + column: bilinear sampling of a linear ramp returns the sampled coordinate.
    ramp = (10 * np.arange(3)[:, None] + np.arange(3)[None, :]).astype(np.float32)
    ramp = ramp[None, :, :, None]
    # 3 -> 2: centres sample at (i + 0.5) * 1.5 - 0.5 = 0.25 and 1.75.
    np.testing.assert_allclose(resize_jit(ramp, 2, 2)[0, :, :, 0],
                               [[2.75, 4.25], [17.75, 19.25]], rtol=1e-6)
    # 2 -> 3: samples at -1/6 (clamped to 0), 0.5, 7/6 (clamped to 1).
    np.testing.assert_allclose(resize_jit(ramp[:, :2, :2], 3, 3)[0, :, :, 0],
                               [[0.0, 0.5, 1.0], [5.0, 5.5, 6.0], [10.0, 10.5, 11.0]], rtol=1e-6)
    # A 2x2 checkerboard doubled: weights (1, 0), (.75, .25), (.25, .75), (0, 1) on each axis.
    board = jnp.array([[0.0, 1.0], [1.0, 0.0]])[None, :, :, None]
    expected = [[0.0, 0.25, 0.75, 1.0],
                [0.25, 0.375, 0.625, 0.75],
                [0.75, 0.625, 0.375, 0.25],
                [1.0, 0.75, 0.25, 0.0]]
    np.testing.assert_allclose(resize_jit(board, 4, 4)[0, :, :, 0], expected, rtol=1e-6)


def test_halving_is_2x2_average_pooling_not_a_blur():
    # Without antialiasing, output pixel i samples at 2i + 0.5: the mean of pixels 2i, 2i + 1.
    # (jax.image.resize's default antialias=True spreads a triangle over four pixels instead.)
    x = noise((2, 12, 18, 5))
    pooled = x.reshape(2, 6, 2, 9, 2, 5).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_jit(x, 6, 9), pooled, rtol=1e-5, atol=1e-6)
    blurred = jax.image.resize(x, (2, 6, 9, 5), 'bilinear')
    assert np.abs(blurred - pooled).max() > 0.1


@pytest.mark.parametrize('channels', [1, 3, 21])
@pytest.mark.parametrize('size_in, size_out', SIZES)
def test_matches_torch_interpolate(size_in, size_out, channels):
    torch = pytest.importorskip('torch')
    x = noise((2, *size_in, channels), seed=channels)
    ours = np.asarray(resize_jit(x, *size_out))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode='bilinear',
        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_matches_torch_at_cityscapes_widths():
    # Source coordinates near 2047 carry float32 rounding (results up to ~1e-3 from exact
    # arithmetic on N(0, 1) noise); jax and torch round them alike, so they still agree.
    torch = pytest.importorskip('torch')
    x = noise((1, 1, 2048, 3))
    for width in (1536, 3584):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(1, width), mode='bilinear',
            align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(resize_jit(x, 1, width), expected, rtol=0, atol=1e-5)


def test_gradients_match_torch():
    torch = pytest.importorskip('torch')
    x, cotangent = noise((2, 9, 14, 3)), noise((2, 13, 10, 3), seed=1)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(resize_bilinear(x, 13, 10) * cotangent)))(x)
    source = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    out = torch.nn.functional.interpolate(source, size=(13, 10), mode='bilinear',
                                          align_corners=False)
    (out * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(grad, source.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)


def test_gradients_by_hand_and_numerically():
    # d sum(resize(x)) / dx = each input pixel's total weight: 2 -> 4 gives (1 + .75 + .25) = 2
    # per pixel and axis; 4 -> 2 gives 0.5 per pixel and axis.
    total = jax.grad(lambda x, size: jnp.sum(resize_bilinear(x, *size)))
    np.testing.assert_allclose(total(jnp.ones((1, 2, 2, 1)), (4, 4)), np.full((1, 2, 2, 1), 4.0))
    np.testing.assert_allclose(total(jnp.ones((1, 4, 4, 1)), (2, 2)), np.full((1, 4, 4, 1), .25))
    check_grads(lambda x: resize_bilinear(x, 5, 3), (jnp.asarray(noise((1, 4, 6, 2))),),
                order=2, modes=('fwd', 'rev'), eps=1e-2, atol=1e-2)


def test_matches_tf_image_resize():
    tf = pytest.importorskip('tensorflow')
    for size_in, size_out in SIZES:
        x = noise((2, *size_in, 3))
        expected = tf.image.resize(x, size_out, method='bilinear').numpy()  # antialias=False
        np.testing.assert_allclose(resize_jit(x, *size_out), expected, rtol=0, atol=1e-5,
                                   err_msg=f'{size_in} -> {size_out}')


def test_bfloat16_is_interpolated_in_float32_and_rounded_once():
    x = noise((1, 7, 9, 4)).astype(jnp.bfloat16)
    out = resize_jit(x, 10, 5)
    assert out.dtype == jnp.bfloat16
    exact = resize_jit(x.astype(np.float32), 10, 5)
    np.testing.assert_array_equal(out, exact.astype(jnp.bfloat16))


def test_other_ranks_and_identity():
    # [B, L, C]: one spatial axis, linear; sizes that already match return the input itself.
    x = jnp.asarray(noise((2, 4, 3)))
    np.testing.assert_allclose(resize_bilinear(x, 2), (x[:, 0::2] + x[:, 1::2]) / 2, rtol=1e-6)
    same = jnp.asarray(noise((1, 5, 6, 2)))
    assert resize_bilinear(same, 5, 6) is same


def test_wrong_number_of_sizes_is_a_clear_error():
    with pytest.raises(ValueError, match=r'size \(4,\) must give one length per axis'):
        resize_bilinear(jnp.zeros((1, 2, 2, 3)), 4)
