"""Config loading, command-line overrides and validation errors."""

import pytest

from segjax import config as config_lib

EXPERIMENT = 'experiments/unet_synthetic.py'


def test_experiment_loads_and_validates():
    config = config_lib.load(EXPERIMENT)
    assert config.data.num_classes == len(config.data.class_names) == 8


def test_overrides_parse_to_the_field_type():
    config = config_lib.load(EXPERIMENT, [
        'optimizer.lr=0.05', 'num_steps=7', 'data.crop_size=(32, 48)', 'data.flip=False',
        'data.data_dir=/tmp/somewhere', 'model.base_width=8'])
    assert config.optimizer.lr == 0.05
    assert config.num_steps == 7
    assert tuple(config.data.crop_size) == (32, 48)
    assert config.data.flip is False
    assert config.data.data_dir == '/tmp/somewhere'
    assert config.model.base_width == 8


def test_integer_for_float_field_becomes_float():
    config = config_lib.load(EXPERIMENT, ['optimizer.lr=1'])
    assert isinstance(config.optimizer.lr, float)


@pytest.mark.parametrize('override, message', [
    ('optimizer.lrr=0.1', "config.optimizer.lrr: adamw takes no option 'lrr'"),
    ('data.crop_sise=(1, 1)', "unknown config key 'data.crop_sise' (did you mean 'crop_size'?)"),
    ('nmu_steps=3', "unknown config key 'nmu_steps' (did you mean 'num_steps'?)"),
    ('dat.crop_size=(1, 1)', "unknown config key 'dat'"),
    ('num_steps=many', "config key 'num_steps': cannot parse 'many' as a int"),
    ('data.flip=1', "config key 'data.flip': expected True or False"),
    ('model.widht=3', "config.model.widht: UNet takes no option 'widht'"),
    ('num_steps', 'must look like --config.key=value'),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(EXPERIMENT, [override])
    assert message in str(info.value)


def test_unknown_key_in_experiment_file(tmp_path):
    path = tmp_path / 'typo.py'
    path.write_text(
        'from segjax import config as config_lib\n'
        'import importlib.util, sys\n'
        f'spec = importlib.util.spec_from_file_location("base", {EXPERIMENT!r})\n'
        'base = importlib.util.module_from_spec(spec); spec.loader.exec_module(base)\n'
        'def get_config():\n'
        '    c = base.get_config()\n'
        '    c.optimzer = c.optimizer\n'
        '    return c\n')
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'optimzer'"):
        config_lib.load(str(path))


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match='does not exist'):
        config_lib.load('experiments/no_such_experiment.py')


def test_split_argv():
    overrides, rest = config_lib.split_argv(['--workdir', 'w', '--config.a.b=1', '--config', 'x'])
    assert overrides == ['a.b=1'] and rest == ['--workdir', 'w', '--config', 'x']


def test_experiment_with_its_own_loss_function():
    import jax
    import jax.numpy as jnp
    import numpy as np

    config = config_lib.load('experiments/custom_loss_example.py', ['loss.gamma=0.0'])
    assert config.loss.gamma == 0.0
    logits = jnp.array([[[[2.0, 0.0], [0.0, 0.0]]]])  # [1,1,2,2]
    labels = jnp.array([[[0, 255]]])
    loss = jax.jit(lambda x, y: config.loss.fn(x, y, gamma=0.0))(logits, labels)
    # gamma 0 is cross-entropy: -log softmax([2, 0])[0] = log(1 + e^-2), ignored pixel left out.
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-2.0)), rtol=1e-6)


def test_nested_loss_terms_are_checked_and_can_take_new_options():
    path = 'experiments/composite_loss_example.py'
    config = config_lib.load(path, ['loss.terms.dice.exponent=2'])
    assert config.loss.terms.dice.exponent == 2
    with pytest.raises(config_lib.ConfigError, match="loss.terms.dice.smoth: dice_loss takes no "
                       "option 'smoth' \\(did you mean 'smooth'\\?\\)"):
        config_lib.load(path, ['loss.terms.dice.smoth=0.5'])


def test_boundary_dilation_ratio_must_be_a_fraction():
    config = config_lib.load(EXPERIMENT, ['eval.boundary_dilation_ratio=0.05'])
    assert config.eval.boundary_dilation_ratio == 0.05
    with pytest.raises(config_lib.ConfigError, match='boundary_dilation_ratio=0.0: expected'):
        config_lib.load(EXPERIMENT, ['eval.boundary_dilation_ratio=0'])
