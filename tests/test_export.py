"""segjax.export: the serving function against segjax's own prediction, every format's round
trip (symbolic batch 1 and 3), the StableHLO artefact in a process without segjax, the CLI and
predict --exported, and the clear errors for bad input."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import step
from segjax.export import artefact, formats, serving
from segjax.models import deeplab, unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
MEAN, STD = (120.0, 115.0, 100.0), (60.0, 58.0, 57.0)


def tiny_model(name):
    if name == 'unet':
        return unet.UNet(num_classes=5, base_width=4, depth=2)
    return deeplab.DeepLabV3Plus(num_classes=5, depth=18, base_width=4, output_stride=8,
                                 rates=(2, 4, 6), channels=8, low_level_channels=4,
                                 separable=True, aux_head=True)


def random_variables(model):
    """He-scaled random kernels, unit BatchNorm: shapes from jax.eval_shape, so nothing is
    compiled (jitting model.init took ~50 s on a busy 2-core CPU)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, SIZE, SIZE, 3)), train=False))
    rng = np.random.RandomState(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if 'var' in name or 'scale' in name:
            return np.ones(leaf.shape, np.float32)
        if 'mean' in name or 'bias' in name:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.randn(*leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def images(batch, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (batch, SIZE, SIZE, 3)).astype(np.uint8)


def segjax_classes(model, variables, batch):
    """What segjax.predict computes: numpy normalisation, then step.predict_step."""
    normalised = (batch.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    state = step.TrainState(step=0, params=variables['params'],
                            batch_stats=variables['batch_stats'], opt_state={}, ema={},
                            nonfinite_run=0, skipped_steps=0)
    return np.asarray(step.predict_step(state, jnp.asarray(normalised), model=model))


@pytest.fixture(scope='module', params=['unet'])
def tiny(request):
    model = tiny_model(request.param)
    variables = random_variables(model)
    function = serving.serving_function(model, variables, mean=MEAN, std=STD)
    return {'model': model, 'variables': variables, 'serving': function}


def export(fmt, function, directory):
    """formats.write + the spec file, as the CLI writes them."""
    path = formats.write(fmt, function, SIZE, SIZE, str(directory),
                         representative=lambda: list(images(8, seed=1)))
    artefact.write_spec(str(directory), {
        'format': fmt, 'file': os.path.basename(path),
        'input': {'name': 'image', 'dtype': 'uint8', 'shape': [None, SIZE, SIZE, 3]},
        'outputs': serving.output_shapes(SIZE, SIZE, 5), 'palette': [[0, 0, 0]] * 5})
    return artefact.load(str(directory))


# --- the serving function ------------------------------------------------------------------

def test_first_argmax_is_argmax_with_ties_to_the_first():
    scores = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, -5.0, 0.0, -0.5]])
    assert serving.first_argmax(scores).tolist() == [1, 0, 2]
    rng = np.random.RandomState(0).randn(4, 6, 7, 9).astype(np.float32)
    np.testing.assert_array_equal(serving.first_argmax(rng), jnp.argmax(rng, -1))
    assert serving.first_argmax(rng).dtype == jnp.int32


def test_softmax_matches_jax_nn_softmax():
    logits = np.random.RandomState(1).randn(3, 4, 5).astype(np.float32) * 20
    np.testing.assert_allclose(serving.softmax(logits), jax.nn.softmax(logits, -1), atol=1e-6)


def test_serving_function_equals_segjax_prediction(tiny):
    batch = images(3)
    outputs = jax.jit(tiny['serving'])(batch)
    np.testing.assert_array_equal(outputs['classes'],
                                  segjax_classes(tiny['model'], tiny['variables'], batch))
    assert outputs['probabilities'].shape == (3, SIZE, SIZE, 5)
    np.testing.assert_allclose(outputs['probabilities'].sum(-1), 1.0, atol=1e-5)


# --- round trips ---------------------------------------------------------------------------

def check_round_trip(exported, function, atol=1e-5):
    for batch in (1, 3):  # one artefact, the symbolic batch at two sizes
        inputs = images(batch, seed=batch)
        expected = jax.jit(function)(inputs)
        outputs = exported(inputs)
        assert outputs['classes'].shape == (batch, SIZE, SIZE)
        assert outputs['classes'].dtype == np.int32
        np.testing.assert_array_equal(outputs['classes'], expected['classes'])
        np.testing.assert_allclose(outputs['probabilities'], expected['probabilities'],
                                   atol=atol)


@pytest.mark.parametrize('fmt', ['stablehlo', 'savedmodel'])
def test_round_trip_unet(tiny, fmt, tmp_path):
    check_round_trip(export(fmt, tiny['serving'], tmp_path), tiny['serving'])


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize('name', ['unet', 'deeplabv3plus'])
@pytest.mark.parametrize('fmt', ['stablehlo', 'savedmodel', 'tflite', 'onnx'])
def test_round_trip_float_formats(name, fmt, tmp_path):
    model = tiny_model(name)
    function = serving.serving_function(model, random_variables(model), mean=MEAN, std=STD)
    check_round_trip(export(fmt, function, tmp_path), function)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize('name', ['unet', 'deeplabv3plus'])
def test_round_trip_tflite_int8(name, tmp_path):
    """Full-integer: the convolutions run on int8 tensors; uint8 in, int32/float32 out."""
    import tensorflow as tf

    model = tiny_model(name)
    function = serving.serving_function(model, random_variables(model), mean=MEAN, std=STD)
    exported = export('tflite_int8', function, tmp_path)
    for batch in (1, 3):
        outputs = exported(images(batch))
        assert outputs['classes'].shape == (batch, SIZE, SIZE)
        assert outputs['classes'].dtype == np.int32
        assert outputs['classes'].min() >= 0 and outputs['classes'].max() < 5
        # exp and its sum in int8 (scale 1/256): sums stray from 1 by ~0.1 (0.13 seen).
        assert outputs['probabilities'].min() >= 0 and outputs['probabilities'].max() <= 1.01
        np.testing.assert_allclose(outputs['probabilities'].sum(-1), 1.0, atol=0.25)
    interpreter = tf.lite.Interpreter(model_path=str(tmp_path / 'model.tflite'))
    conv_inputs = [t for op in interpreter._get_ops_details() if op['op_name'] == 'CONV_2D'
                   for t in op['inputs']]
    dtypes = {d['index']: d['dtype'] for d in interpreter.get_tensor_details()}
    assert conv_inputs and all(dtypes[t] in (np.int8, np.int32) for t in conv_inputs)


@pytest.mark.slow
@pytest.mark.long
def test_stablehlo_runs_without_segjax(tiny, tmp_path):
    """The artefact needs jax alone: a fresh process that never imports segjax."""
    exported = export('stablehlo', tiny['serving'], tmp_path)
    batch = images(3)
    np.save(tmp_path / 'images.npy', batch)
    script = textwrap.dedent(f"""
        import sys
        import jax, numpy as np
        with open({str(tmp_path / 'model.stablehlo')!r}, 'rb') as f:
            model = jax.export.deserialize(bytearray(f.read()))
        out = model.call(np.load({str(tmp_path / 'images.npy')!r}))
        assert not any(m == 'segjax' or m.startswith('segjax.') for m in sys.modules)
        np.save({str(tmp_path / 'classes.npy')!r}, np.asarray(out['classes']))
    """)
    subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), check=True, timeout=300,
                   env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    np.testing.assert_array_equal(np.load(tmp_path / 'classes.npy'), exported(batch)['classes'])


# --- bad input -----------------------------------------------------------------------------

def test_unknown_format_and_missing_converter_are_clear(monkeypatch):
    with pytest.raises(serving.ExportError, match='expected one of stablehlo'):
        formats.check_format('coreml')
    real_find_spec = formats.importlib.util.find_spec
    monkeypatch.setattr(formats.importlib.util, 'find_spec',
                        lambda name: None if name == 'tf2onnx' else real_find_spec(name))
    with pytest.raises(serving.ExportError, match=r'pip install tf2onnx==1\.17\.0'):
        formats.check_format('onnx')
    formats.check_format('stablehlo')  # needs nothing beyond jax


def test_bad_images_are_clear_errors():
    spec = {'input': {'shape': [None, SIZE, SIZE, 3]}}
    with pytest.raises(artefact.ExportedInputError, match='dtype float32.*uint8'):
        artefact.check_images(images(1).astype(np.float32), spec)
    with pytest.raises(artefact.ExportedInputError, match=r'shaped \(1, 32, 32, 4\)'):
        artefact.check_images(np.zeros((1, SIZE, SIZE, 4), np.uint8), spec)
    with pytest.raises(artefact.ExportedInputError, match='exported at 32x32.*--image_size'):
        artefact.check_images(np.zeros((1, 16, 16, 3), np.uint8), spec)
    assert artefact.check_images(images(1)[0], spec).shape == (1, SIZE, SIZE, 3)


def test_not_an_exported_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='no export.json'):
        artefact.load(str(tmp_path))


def test_ema_requested_without_ema_weights(tiny):
    state = step.TrainState(step=0, params=tiny['variables']['params'],
                            batch_stats=tiny['variables']['batch_stats'], opt_state={}, ema={},
                            nonfinite_run=0, skipped_steps=0)
    with pytest.raises(serving.ExportError, match='no EMA weights'):
        serving.model_variables(state, ema=True)
    ema = jax.tree.map(lambda x: x + 1, tiny['variables'])
    chosen = serving.model_variables(state.replace(ema=ema), ema=True)
    np.testing.assert_array_equal(jax.tree.leaves(chosen)[0], jax.tree.leaves(ema)[0])


def test_inference_options_export_cannot_hold():
    from segjax import config as config_lib

    config = config_lib.load(os.path.join(ROOT, 'experiments', 'unet_synthetic.py'))
    assert serving.network_options(config) == {}
    config.eval.crf.iterations = 5
    with pytest.raises(serving.ExportError, match='crf.iterations=0'):
        serving.network_options(config)
    config.eval.crf.iterations = 0
    config.eval.mode = 'slide'
    config.eval.window = (32, 32)
    config.eval.stride = (16, 16)
    with pytest.raises(serving.ExportError, match='eval.mode=whole'):
        serving.network_options(config)


# --- the command lines ---------------------------------------------------------------------

EXPERIMENT = 'experiments/unet_synthetic.py'


def run_cli(module, *args, check=True):
    result = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f'{module} exited {result.returncode}:\n{result.stderr[-4000:]}')
    return result


def tiny_overrides(data_dir):
    values = {'data.builder_config': 'smoke', 'data.data_dir': str(data_dir),
              'data.crop_size': '(32,32)', 'model.base_width': 4, 'model.depth': 2,
              'batch_size': 8, 'eval_batch_size': 8, 'num_steps': 2, 'log_every': 1,
              'eval_every': 0, 'checkpoint_every': 2, 'num_summary_images': 0,
              'ema_decay': 0.9}
    return [f'--config.{k}={v}' for k, v in values.items()]


@pytest.mark.slow
@pytest.mark.long
def test_cli_export_then_predict_exported(tmp_path):
    """train -> export (the raw weights to stablehlo; the EMA weights to tflite_int8,
    calibrated on the eval split) -> predict --exported writes the masks segjax.predict writes
    from the checkpoint."""
    from PIL import Image

    workdir, data_dir = tmp_path / 'run', tmp_path / 'tfds'
    overrides = tiny_overrides(data_dir)
    missing = run_cli('segjax.export', '--config', EXPERIMENT, '--workdir', workdir,
                      '--format', 'stablehlo', '--output', tmp_path / 'none', *overrides,
                      check=False)
    assert missing.returncode == 1 and 'no checkpoints in workdir' in missing.stderr
    run_cli('segjax.train', '--config', EXPERIMENT, '--workdir', workdir, *overrides)
    for fmt, weights in (('stablehlo', []), ('tflite_int8', ['--ema'])):
        run_cli('segjax.export', '--config', EXPERIMENT, '--workdir', workdir, *weights,
                '--format', fmt, '--output', tmp_path / fmt, '--representative', 4, *overrides)
        spec = json.loads((tmp_path / fmt / 'export.json').read_text())
        assert spec['format'] == fmt and spec['source']['step'] == 2
        assert spec['source']['weights'] == ('ema' if weights else 'params')
        assert spec['input']['shape'] == [None, 32, 32, 3]
    image_dir = tmp_path / 'images'
    image_dir.mkdir()
    for i in range(2):
        Image.fromarray(images(1, seed=i)[0]).save(image_dir / f'im{i}.png')
    run_cli('segjax.predict', '--config', EXPERIMENT, '--workdir', workdir, '--input',
            image_dir, '--output', tmp_path / 'reference', *overrides)
    run_cli('segjax.predict', '--exported', tmp_path / 'stablehlo', '--input', image_dir,
            '--output', tmp_path / 'exported')
    int8 = run_cli('segjax.predict', '--exported', tmp_path / 'tflite_int8', '--input',
                   image_dir, '--output', tmp_path / 'int8')
    assert 'tflite_int8 model' in int8.stdout
    for i in range(2):
        name = f'im{i}_mask.png'
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'exported' / name)),
                                      np.asarray(Image.open(tmp_path / 'reference' / name)))
        assert np.asarray(Image.open(tmp_path / 'int8' / name)).shape == (32, 32)
    wrong_size = tmp_path / 'big.png'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(wrong_size)
    bad = run_cli('segjax.predict', '--exported', tmp_path / 'stablehlo', '--input', wrong_size,
                  '--output', tmp_path / 'bad', check=False)
    assert bad.returncode == 1 and 'exported at 32x32' in bad.stderr
