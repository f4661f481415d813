"""segjax.quantization: fake quantization against hand-computed values, the straight-through
gradient, the QAT wrapper (same variables as the float model, trains), weight-only int8 export,
and (slow) a QAT run exported to int8 TFLite and loaded back."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import config as config_lib
from segjax import experiment, quantization, step
from segjax.export import artefact, formats, serving
from segjax.models import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


# --- fake quantization by hand -------------------------------------------------------------

def test_fake_quant_golden_values():
    # scale 0.5, zero point 1, levels -4..3: x/0.5+1 = [1.2, -2, 11, -9, 0.5(->0 half-even)]
    x = jnp.array([0.1, -1.5, 5.0, -5.0, -0.25])
    out = quantization.fake_quant(x, jnp.array(0.5), jnp.array(1.0), qmin=-4, qmax=3)
    np.testing.assert_allclose(out, [0.0, -1.5, 1.0, -2.5, -0.5])


def test_weights_are_symmetric_per_output_channel():
    # kernel [2, 2]: channel 0 absmax 1.27 -> scale 0.01; channel 1 absmax 0.254 -> 0.002
    kernel = jnp.array([[1.27, 0.254], [-0.0149, -0.0031]])
    np.testing.assert_allclose(quantization.weight_scale(kernel), [[0.01, 0.002]], rtol=1e-6)
    np.testing.assert_allclose(quantization.fake_quant_weight(kernel),
                               [[1.27, 0.254], [-0.01, -0.004]], rtol=1e-5)
    zero_channel = jnp.zeros((3, 3, 4, 2)).at[..., 0].set(0.5)
    np.testing.assert_array_equal(quantization.fake_quant_weight(zero_channel), zero_channel)


def test_activation_scale_and_zero_point():
    # [-1, 3]: scale 4/255, zero point round(-128 + 255/4) = -64
    scale, zero_point = quantization.activation_scale_zero_point(jnp.array(-1.0),
                                                                 jnp.array(3.0))
    np.testing.assert_allclose(scale, 4 / 255, rtol=1e-6)
    assert float(zero_point) == -64
    # [2, 6] widened to [0, 6] (0 exact): zero point -128
    scale, zero_point = quantization.activation_scale_zero_point(jnp.array(2.0),
                                                                 jnp.array(6.0))
    np.testing.assert_allclose(scale, 6 / 255, rtol=1e-6)
    assert float(zero_point) == -128
    x = jnp.array([0.0, 6.0, 3.0, 1.0])
    out = quantization.fake_quant_activation(x)
    assert float(out[0]) == 0.0 and abs(float(out[1]) - 6.0) < 1e-5
    np.testing.assert_allclose(out, np.round(np.asarray(x) / (6 / 255)) * (6 / 255), atol=1e-6)


def test_straight_through_gradient_inside_the_range_zero_outside():
    x = jnp.array([-3.0, -0.3, 0.0, 0.74, 2.9, 3.2])
    grad = jax.grad(lambda v: jnp.sum(quantization.fake_quant(
        v, jnp.array(1.0), jnp.array(0.0), qmin=-2, qmax=2) * jnp.arange(1.0, 7.0)))(x)
    np.testing.assert_array_equal(grad, [0.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    # the scale and zero point get no gradient
    assert float(jax.grad(lambda s: quantization.fake_quant(
        jnp.array(0.7), s, jnp.array(0.0), qmin=-2, qmax=2))(jnp.array(0.5))) == 0.0
    # weights and a tensor's own range: never clipped, so the gradient is 1 everywhere
    kernel = jnp.array([[0.3, -1.0], [0.05, 0.2]])
    # (1 up to float32 rounding of (x / scale) * scale)
    np.testing.assert_allclose(
        jax.grad(lambda k: jnp.sum(quantization.fake_quant_weight(k)))(kernel), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda a: jnp.sum(quantization.fake_quant_activation(a)))(kernel), 1.0,
        rtol=1e-6)


def test_fake_quant_params_touches_kernels_only():
    params = {'conv': {'kernel': jnp.array([[0.123456, 1.0]]), 'bias': jnp.array([0.123456])},
              'bn': {'scale': jnp.array([0.123456])}}
    out = quantization.fake_quant_params(params)
    np.testing.assert_array_equal(out['conv']['bias'], params['conv']['bias'])
    np.testing.assert_array_equal(out['bn']['scale'], params['bn']['scale'])
    np.testing.assert_allclose(out['conv']['kernel'], [[0.123456, 1.0]], rtol=1e-6)  # exact
    kernel = jnp.array([[0.1234, 0.5]])  # channel 0 alone: 127 levels of 0.1234 / 127
    np.testing.assert_allclose(quantization.fake_quant_params({'kernel': kernel})['kernel'],
                               kernel, rtol=1e-6)


def test_int8_kernel_round_trip():
    kernel = np.array([[[[1.27, -0.5]], [[0.005, 0.25]]]], np.float32)  # [1, 2, 1, 2]
    stored = quantization.int8_kernel(kernel)
    assert stored.levels.dtype == np.int8
    np.testing.assert_array_equal(stored.levels[..., 0].ravel(), [127, 0])  # 0.005/0.01 -> 0
    np.testing.assert_array_equal(stored.levels[..., 1].ravel(), [-127, 64])  # 0.25/(0.5/127)
    np.testing.assert_allclose(stored.dequantize(), quantization.fake_quant_weight(kernel),
                               atol=1e-7)


# --- the wrapper on a model ----------------------------------------------------------------

def tiny_unet():
    return unet.UNet(num_classes=4, base_width=4, depth=2)


def tiny_variables(model):
    images = jnp.asarray(np.random.RandomState(0).randn(2, SIZE, SIZE, 3), jnp.float32)
    return model.init(jax.random.key(0), images, train=False), images


def test_config_mode_wraps_the_model_and_rejects_unknown_modes():
    config = config_lib.load(os.path.join(ROOT, 'experiments/unet_synthetic.py'))
    assert config.quantization.mode is None
    assert not isinstance(experiment.make_model(config), quantization.QuantizationAware)
    config_lib.apply_override(config, 'quantization.mode=qat')
    model = experiment.make_model(config)
    assert isinstance(model, quantization.QuantizationAware) and model.mode == 'qat'
    assert model.num_classes == config.data.num_classes  # the model's fields show through
    with pytest.raises(config_lib.ConfigError, match="config.quantization.mode='int4'"):
        config_lib.load(os.path.join(ROOT, 'experiments/unet_synthetic.py'),
                        ['quantization.mode=int4'])
    assert config_lib.QUANTIZATION_MODES == quantization.MODES


def test_quantization_aware_model_has_the_float_variables_and_int8_grid_outputs():
    model = tiny_unet()
    variables, images = tiny_variables(model)
    qat = quantization.quantization_aware(model, 'qat')
    assert (jax.tree.structure(qat.init(jax.random.key(0), images, train=False))
            == jax.tree.structure(variables))
    float_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    logits = jax.jit(lambda v, x: qat.apply(v, x, train=False))(variables, images)
    # the logits sit on one 256-level grid; within a few steps of the float ones
    assert len(np.unique(np.asarray(logits))) <= 256
    step_size = float(jnp.max(logits) - jnp.min(logits)) / 255
    assert float(jnp.max(jnp.abs(logits - float_logits))) < 10 * step_size
    weights_only = quantization.quantization_aware(model, 'weight_only_int8')
    expected = jax.jit(lambda v, x: model.apply(
        {**v, 'params': quantization.fake_quant_params(v['params'])}, x, train=False))(
        variables, images)
    np.testing.assert_allclose(
        jax.jit(lambda v, x: weights_only.apply(v, x, train=False))(variables, images),
        expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_qat_trains_a_few_steps():
    """Supervised train_step on the QAT model: finite, decreasing loss, every kernel moves."""
    import optax

    from segjax import losses, trainers

    model = quantization.quantization_aware(tiny_unet(), 'qat')
    trainer = trainers.supervised(
        model=model, tx=optax.adam(1e-2),
        loss_fn=lambda logits, labels: losses.cross_entropy(logits, labels),
        num_classes=4, ignore_index=255, image_shape=(1, SIZE, SIZE, 3), grad_accum_steps=1,
        ema_decay=0.0)
    state = trainer.init(jax.random.key(0))
    rng = np.random.RandomState(1)
    labels = np.zeros((4, SIZE, SIZE), np.int32)
    labels[:, 4:12, 4:12] = rng.randint(1, 4, (4, 1, 1))
    images = (labels[..., None] * 0.5 + rng.randn(4, SIZE, SIZE, 3) * 0.1).astype(np.float32)
    batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
    train_step = jax.jit(trainer.step)
    start = state.params
    first = None
    for i in range(8):
        state, stats = train_step(state, batch, jax.random.key(i))
        loss = float(stats['loss'])
        assert np.isfinite(loss)
        first = loss if first is None else first
    assert loss < first
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start, state.params)
    assert all(jax.tree.leaves(moved))


@pytest.mark.slow
def test_weight_only_int8_export_holds_int8_constants(tmp_path):
    """for_export stores int8 kernels: the StableHLO artefact is smaller, its classes those
    of the fake-quantized weights."""
    model = unet.UNet(num_classes=4, base_width=8, depth=2)
    variables, _ = tiny_variables(model)
    variables = jax.device_get({'params': variables['params'],
                                'batch_stats': variables['batch_stats']})
    mean, std = (120.0, 115.0, 100.0), (60.0, 58.0, 57.0)
    float_fn = serving.serving_function(model, variables, mean=mean, std=std)
    int8_model, int8_vars = quantization.for_export(
        quantization.quantization_aware(model, 'weight_only_int8'), variables)
    int8_fn = serving.serving_function(int8_model, int8_vars, mean=mean, std=std)
    sizes = {}
    for name, function in (('float', float_fn), ('int8', int8_fn)):
        path = formats.write('stablehlo', function, SIZE, SIZE, str(tmp_path / name))
        sizes[name] = os.path.getsize(path)
    assert sizes['int8'] < 0.5 * sizes['float'], sizes
    images = np.random.RandomState(3).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    with open(tmp_path / 'int8' / 'model.stablehlo', 'rb') as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    fake = serving.serving_function(
        quantization.quantization_aware(model, 'weight_only_int8'), variables, mean=mean,
        std=std)
    np.testing.assert_array_equal(exported.call(images)['classes'],
                                  jax.jit(fake)(images)['classes'])
    # the QAT wrapper exports the float model and the same variables
    qat_model, qat_vars = quantization.for_export(
        quantization.quantization_aware(model, 'qat'), variables)
    assert qat_model is model and qat_vars is variables


# --- a QAT run, exported to int8 TFLite ----------------------------------------------------

@pytest.mark.slow  # whole CLI runs / int8 conversions: minutes; by hand with -m long
@pytest.mark.long
def test_qat_run_exports_to_int8_tflite_and_round_trips(tmp_path):
    """Train 2 float steps, resume 2 QAT steps (fine-tuning is a resume), export tflite_int8
    through the CLI, load it back: its classes agree with the QAT model's fake-int8 ones on
    most pixels (both compute int8; the ranges differ: batch vs calibration)."""
    import subprocess
    import sys

    workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
    overrides = [f'--config.{k}={v}' for k, v in {
        'data.builder_config': 'smoke', 'data.data_dir': str(data_dir),
        'data.crop_size': '(32,32)', 'model.base_width': 4, 'model.depth': 2,
        'batch_size': 8, 'eval_batch_size': 8, 'log_every': 1, 'eval_every': 0,
        'checkpoint_every': 2, 'num_summary_images': 0}.items()]
    experiment_file = 'experiments/unet_synthetic.py'

    def run(module, *args):
        result = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    run('segjax.train', '--config', experiment_file, '--workdir', workdir, *overrides,
        '--config.num_steps=2')
    qat = [*overrides, '--config.num_steps=4', '--config.quantization.mode=qat']
    resumed = run('segjax.train', '--config', experiment_file, '--workdir', workdir, *qat)
    assert 'resuming at step 2/4' in resumed.stdout + resumed.stderr
    run('segjax.export', '--config', experiment_file, '--workdir', workdir, '--format',
        'tflite_int8', '--output', tmp_path / 'int8', '--representative', 8, *qat)
    exported = artefact.load(str(tmp_path / 'int8'))
    assert exported.spec['source']['step'] == 4

    config = config_lib.load(os.path.join(ROOT, experiment_file),
                             [o.removeprefix('--config.') for o in qat])
    from segjax import sharding

    model, state = experiment.restore_state(config, str(workdir), sharding.make_mesh())
    images = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    outputs = exported(images)
    assert outputs['classes'].shape == (3, 32, 32) and outputs['classes'].dtype == np.int32
    normalised = (images.astype(np.float32) - np.float32(config.data.mean)) / np.float32(
        config.data.std)
    fake_int8 = np.asarray(step.predict_step(state, jnp.asarray(normalised), model=model))
    assert (outputs['classes'] == fake_int8).mean() > 0.9


def test_mode_names_are_strings_or_none():
    assert all(m is None or isinstance(m, str) for m in quantization.MODES)
    with pytest.raises(quantization.QuantizationError, match="expected one of"):
        quantization.quantization_aware(tiny_unet(), 'int4')
    assert isinstance(config_lib.defaults().quantization, ml_collections.ConfigDict)


# --- symbolic spatial size (StableHLO) -----------------------------------------------------

@pytest.mark.slow  # whole CLI runs / int8 conversions: minutes; by hand with -m long
@pytest.mark.long
@pytest.mark.parametrize('name, multiple', [('unet', 4), ('deeplabv3plus', 1)])
def test_stablehlo_symbolic_size_runs_at_two_sizes(name, multiple, tmp_path):
    """One artefact, [b, m*h, m*w, 3]: at 16x16 and 24x40 its outputs are the jitted serving
    function's at that size; a size that is not a multiple of m is a clear error."""
    from test_export import random_variables, tiny_model

    model = tiny_model(name)
    function = serving.serving_function(model, random_variables(model), mean=(120.0,) * 3,
                                        std=(60.0,) * 3)
    path = formats.write('stablehlo', function, 0, 0, str(tmp_path), size_multiple=multiple)
    artefact.write_spec(str(tmp_path), {
        'format': 'stablehlo', 'file': os.path.basename(path),
        'input': {'name': 'image', 'dtype': 'uint8', 'shape': [None, None, None, 3],
                  'size_multiple': multiple}})
    exported = artefact.load(str(tmp_path))
    for batch, height, width in ((1, 16, 16), (2, 24, 40)):
        images = np.random.RandomState(height).randint(
            0, 256, (batch, height, width, 3)).astype(np.uint8)
        outputs = exported(images)
        expected = jax.jit(function)(images)
        assert outputs['classes'].shape == (batch, height, width)
        np.testing.assert_array_equal(outputs['classes'], expected['classes'])
        np.testing.assert_allclose(outputs['probabilities'], expected['probabilities'],
                                   atol=1e-5)
    if multiple > 1:
        with pytest.raises(artefact.ExportedInputError, match='multiples of 4'):
            exported(np.zeros((1, 18, 16, 3), np.uint8))
    with pytest.raises(serving.ExportError, match='only --format stablehlo'):
        formats.write('tflite', function, 16, 16, str(tmp_path / 'x'), size_multiple=multiple)


@pytest.mark.slow  # whole CLI runs / int8 conversions: minutes; by hand with -m long
@pytest.mark.long
def test_tflite_int8_with_float_ops_keeps_those_ops_in_float(tmp_path):
    """Selective quantization: BATCH_MATMUL (DeepLabV3+'s ASPP image pool) runs on float32
    tensors, the convolutions stay int8, uint8 in."""
    import tensorflow as tf
    from test_export import random_variables, tiny_model

    model = tiny_model('deeplabv3plus')
    function = serving.serving_function(model, random_variables(model), mean=(120.0,) * 3,
                                        std=(60.0,) * 3)
    images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    path = formats.write('tflite_int8', function, 32, 32, str(tmp_path),
                         representative=lambda: list(images), float_ops=['BATCH_MATMUL'])
    interpreter = tf.lite.Interpreter(model_path=path)
    dtypes = {d['index']: d['dtype'] for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    matmul_inputs = [t for op in ops if op['op_name'] == 'BATCH_MATMUL' for t in op['inputs']]
    conv_inputs = [t for op in ops if op['op_name'] == 'CONV_2D' for t in op['inputs']]
    assert matmul_inputs and all(dtypes[t] == np.float32 for t in matmul_inputs)
    assert conv_inputs and all(dtypes[t] in (np.int8, np.int32) for t in conv_inputs)
    outputs = interpreter.get_signature_runner('serving_default')(image=images[:2])
    assert outputs['classes'].shape == (2, 32, 32)
