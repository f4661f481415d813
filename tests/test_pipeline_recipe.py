"""Tests for the recipes of segjax.data.pipeline: TrainRecipe / EvalRecipe normalise what they
hold (tuples), name a malformed field or config.data key, and from_config reads config.data."""

import dataclasses

import numpy as np
import pytest

from segjax import config as config_lib
from segjax.data import cityscapes, pipeline


def _data(**values):
    data = config_lib.defaults().data
    data.num_classes = 21  # the default 0 is a placeholder config.validate refuses
    for key, value in values.items():
        data[key] = value
    return data


def test_defaults_are_the_pipelines_historical_ones():
    recipe = pipeline.TrainRecipe(crop_size=(32, 32))
    assert recipe == pipeline.TrainRecipe(
        crop_size=(32, 32), scale_range=(1.0, 1.0), flip=True, base_size=None,
        cat_max_ratio=1.0, rotation=0.0, photometric=False, mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375), ignore_index=255, label_map=None, num_classes=None)
    assert pipeline.EvalRecipe() == pipeline.EvalRecipe(
        pad_size=None, base_size=None, mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375), ignore_index=255, label_map=None, num_classes=None)


def test_sequences_become_tuples_and_recipes_are_hashable():
    recipe = pipeline.TrainRecipe(crop_size=[16, 24], scale_range=[0.5, 2], base_size=[64, 32],
                                  label_map=cityscapes.LABEL_ID_TO_TRAIN_ID, num_classes=19)
    assert recipe.crop_size == (16, 24) and recipe.scale_range == (0.5, 2)
    assert recipe.base_size == (64, 32)
    assert recipe.label_map == tuple(int(v) for v in cityscapes.LABEL_ID_TO_TRAIN_ID)
    assert len(recipe.label_map) == 256 and recipe.label_map[7] == 0 and recipe.label_map[0] == 255
    assert hash(recipe) == hash(dataclasses.replace(recipe))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.flip = False


def test_from_config_reads_config_data():
    data = _data(crop_size=(48, 40), scale_range=(0.5, 2.0), flip=False, base_size=(96, 48),
                 cat_max_ratio=0.75, rotation=10.0, photometric=True, mean=(1.0, 2.0, 3.0),
                 std=(4.0, 5.0, 6.0), ignore_index=254, label_map=tuple(range(256)),
                 num_classes=21, eval_pad_size=(64, 64), eval_base_size=(60, 30))
    assert pipeline.TrainRecipe.from_config(data) == pipeline.TrainRecipe(
        crop_size=(48, 40), scale_range=(0.5, 2.0), flip=False, base_size=(96, 48),
        cat_max_ratio=0.75, rotation=10.0, photometric=True, mean=(1.0, 2.0, 3.0),
        std=(4.0, 5.0, 6.0), ignore_index=254, label_map=tuple(range(256)), num_classes=21)
    # Eval reads the eval_* sizes, not the training ones.
    assert pipeline.EvalRecipe.from_config(data) == pipeline.EvalRecipe(
        pad_size=(64, 64), base_size=(60, 30), mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0),
        ignore_index=254, label_map=tuple(range(256)), num_classes=21)
    assert pipeline.EvalRecipe.from_config(_data()).pad_size is None


@pytest.mark.parametrize('key, value, expected', [
    ('crop_size', (32,), r'config\.data\.crop_size=\(32,\): expected \(height, width\)'),
    ('crop_size', (32, 0), r'config\.data\.crop_size=\(32, 0\): .*two positive integers'),
    ('scale_range', (2.0, 0.5), r'config\.data\.scale_range=.*0 < min <= max'),
    ('base_size', (512, 256.5), r'config\.data\.base_size=.*\(long, short\)'),
    ('cat_max_ratio', 0.0, r'config\.data\.cat_max_ratio=0\.0: expected a share in \(0, 1\]'),
    ('rotation', -5.0, r'config\.data\.rotation=-5\.0'),
    ('mean', (1.0, 2.0), r'config\.data\.mean=\(1\.0, 2\.0\): expected three numbers'),
    ('std', (1.0, 0.0, 1.0), r'config\.data\.std=.*> 0'),
    ('ignore_index', 256, r'config\.data\.ignore_index=256: expected a label value in 0\.\.255'),
    ('label_map', tuple(range(255)), r'config\.data\.label_map: expected a 256-entry table'),
    ('num_classes', 0, r'config\.data\.num_classes=0: expected a positive integer'),
])
def test_from_config_names_the_malformed_key(key, value, expected):
    with pytest.raises(config_lib.ConfigError, match=expected):
        pipeline.TrainRecipe.from_config(_data(**{key: value}))


def test_eval_errors_name_the_eval_keys():
    with pytest.raises(config_lib.ConfigError, match=r'config\.data\.eval_pad_size=\(0, 8\)'):
        pipeline.EvalRecipe.from_config(_data(eval_pad_size=(0, 8)))
    with pytest.raises(config_lib.ConfigError, match=r'config\.data\.eval_base_size=\(8,\)'):
        pipeline.EvalRecipe.from_config(_data(eval_base_size=(8,)))


def test_direct_construction_names_the_field():
    with pytest.raises(ValueError, match=r'^crop_size=\(32, 32, 3\): expected \(height, width\)'):
        pipeline.TrainRecipe(crop_size=(32, 32, 3))
    with pytest.raises(ValueError, match=r"^crop_size='32x32': expected \(height, width\)"):
        pipeline.TrainRecipe(crop_size='32x32')
    with pytest.raises(ValueError, match=r'^flip=1: expected True or False'):
        pipeline.TrainRecipe(crop_size=(8, 8), flip=1)
    with pytest.raises(ValueError, match=r'^pad_size=\(8, -1\)'):
        pipeline.EvalRecipe(pad_size=(8, -1))
    with pytest.raises(ValueError, match=r'^label_map: .*0\.\.255'):
        pipeline.TrainRecipe(crop_size=(8, 8), label_map=np.full(256, 300))


@pytest.mark.slow  # two command lines: `pytest -m slow` (CI runs it)
@pytest.mark.parametrize('module, flag', [('segjax.evaluate', '--workdir'),
                                          ('segjax.browse', '--output')])
def test_commands_report_a_malformed_data_value_in_one_line(tmp_path, module, flag):
    from test_end_to_end import EXPERIMENT, run_cli

    bad = ('--config.data.eval_pad_size=(0, 5)' if module == 'segjax.evaluate'
           else '--config.data.cat_max_ratio=1.5')
    extra = ['--augmented'] if module == 'segjax.browse' else []
    result = run_cli(module, '--config', EXPERIMENT, flag, tmp_path, bad, *extra, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'config.data.' in result.stderr and 'Traceback' not in result.stderr
