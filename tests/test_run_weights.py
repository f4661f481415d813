"""config.pretrained=<a segjax workdir>: another run's trained weights start a new run (the same
model, or inside a wrapper such as CRF-as-RNN), whatever that run's optimizer."""

import os

import jax
import numpy as np
import pytest

from segjax import checkpoint, experiment, pretrained, sharding
from segjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = os.path.join(ROOT, 'experiments', 'unet_synthetic.py')
CRF_RNN = os.path.join(ROOT, 'experiments', 'crf_rnn_unet_synthetic.py')
SMALL = ['data.crop_size=(32, 32)', 'batch_size=2']


def fresh_state(path: str, overrides: list[str], seed: int = 0):
    config = config_lib.load(path, SMALL + overrides)
    model = experiment.make_model(config)
    tx, _ = experiment.optim.make(config)
    init, _ = experiment.initial_state(experiment.make_trainer(config, model, tx),
                                       sharding.make_mesh(), config)
    return init(jax.random.key(seed))


def saved_run(workdir, state) -> str:
    mngr = checkpoint.manager(experiment.checkpoint_dir(str(workdir)))
    checkpoint.save(mngr, 7, state)
    mngr.wait_until_finished()
    mngr.close()
    return str(workdir)


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope='module')
def unet_run(tmp_path_factory):
    """A U-Net (width 4, depth 2) 'trained' with EMA: a state of seed 1 saved at step 7."""
    state = fresh_state(UNET, ['model.base_width=4', 'model.depth=2', 'ema_decay=0.9'],
                        seed=1)
    return saved_run(tmp_path_factory.mktemp('unet_run'), state), state


def test_the_same_model_takes_the_whole_run(unet_run):
    workdir, trained = unet_run
    state = fresh_state(UNET, ['model.base_width=4', 'model.depth=2'])   # no EMA here
    loaded = experiment.load_pretrained(state, workdir)
    assert_trees_equal(loaded.params, trained.params)
    assert_trees_equal(loaded.batch_stats, trained.batch_stats)
    assert int(loaded.step) == 0  # a new run: step and optimizer state start afresh
    assert_trees_equal(loaded.opt_state, state.opt_state)


def test_a_crf_rnn_takes_the_run_as_its_inner_unet(unet_run):
    workdir, trained = unet_run
    state = fresh_state(CRF_RNN, ['model.inner.base_width=4', 'model.inner.depth=2'])
    loaded = experiment.load_pretrained(state, workdir)
    assert_trees_equal(loaded.params['inner'], trained.params)
    assert_trees_equal(loaded.batch_stats['inner'], trained.batch_stats)
    crf = {k: v for k, v in loaded.params.items() if k != 'inner'}
    assert crf and all(k in state.params for k in crf)
    assert_trees_equal(crf, {k: state.params[k] for k in crf})  # the CRF's own: initial


def test_a_run_of_another_model_is_refused(unet_run, tmp_path):
    workdir, _ = unet_run
    state = fresh_state(UNET, ['model.base_width=8', 'model.depth=2'])
    with pytest.raises(pretrained.PretrainedError,
                       match='fits neither this model nor any one of its sub-modules'):
        experiment.load_pretrained(state, workdir)
    with pytest.raises(pretrained.PretrainedError, match='no checkpoint in'):
        experiment.load_pretrained(state, str(tmp_path))
    with pytest.raises(pretrained.PretrainedError, match='neither a file'):
        experiment.load_pretrained(state, str(tmp_path / 'missing'))
