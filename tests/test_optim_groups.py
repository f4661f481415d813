"""Parameter groups of segjax.optim: per-module LR multipliers, layer-wise LR decay and the
parameters weight decay skips, each update checked against lr * factor * the optimizer's
direction computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import checkpoint, experiment, optim
from segjax import config as config_lib

EXPERIMENT = 'experiments/unet_synthetic.py'


def tree(**leaves):
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: parameters named by their paths."""
    result = {}
    for path, value in leaves.items():
        node = result
        *parents, leaf = path.split('/')
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return result


def flat(params) -> dict[str, np.ndarray]:
    return {optim.parameter_path(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def params_and_grads(paths: dict[str, tuple[int, ...]], seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {p: rng.normal(size=shape) for p, shape in paths.items()}
    grads = {p: rng.normal(size=shape) for p, shape in paths.items()}
    return tree(**params), tree(**grads)


SHAPES = {
    'backbone/conv/kernel': (3, 3, 2, 4), 'backbone/conv/bias': (4,),
    'decode_head/conv/kernel': (1, 1, 4, 4), 'decode_head/conv_seg/kernel': (1, 1, 4, 3),
    'decode_head/conv_seg/bias': (3,), 'norm/scale': (4,),
}


def run_updates(tx, params, grads, steps: int = 1):
    """The updates of `steps` jitted steps on the same gradients (parameters not applied)."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for _ in range(steps):
        updates, state = update(grads, state, params)
        out.append(flat(updates))
    return out


# ----------------------------------------------------------------------------------------------
# Per-module LR multipliers.


def test_sgd_multipliers_scale_each_group_longest_pattern_wins():
    params, grads = params_and_grads(SHAPES)
    tx = optim.sgd(0.1, momentum=0.0, weight_decay=0.0,
                   lr_multipliers={'decode_head': 10.0, 'decode_head/conv_seg': 3.0})
    (updates,) = run_updates(tx, params, grads)
    factors = {'backbone/conv/kernel': 1.0, 'backbone/conv/bias': 1.0, 'norm/scale': 1.0,
               'decode_head/conv/kernel': 10.0, 'decode_head/conv_seg/kernel': 3.0,
               'decode_head/conv_seg/bias': 3.0}
    for path, grad in flat(grads).items():
        np.testing.assert_allclose(updates[path], -0.1 * factors[path] * grad, rtol=1e-6,
                                   err_msg=path)


def adamw_by_hand(params, grads, *, steps, lr_at, factor, decayed, wd, b1=0.9, b2=0.999,
                  eps=1e-8):
    """AdamW's updates for `steps` steps of the same gradient, in numpy: the bias-corrected
    moments' direction plus wd * p where decayed, times -lr(count) * factor."""
    m = v = 0.0
    out = []
    for count in range(steps):
        m = b1 * m + (1 - b1) * grads
        v = b2 * v + (1 - b2) * grads**2
        direction = (m / (1 - b1**(count + 1))) / (np.sqrt(v / (1 - b2**(count + 1))) + eps)
        out.append(-lr_at(count) * factor * (direction + (wd * params if decayed else 0.0)))
    return out


def test_adamw_with_schedule_multipliers_and_decay_by_hand():
    params, grads = params_and_grads(SHAPES, seed=1)
    schedule = optim.warmup_poly(6e-5, 10, warmup_steps=2, power=1.0, end_value=0.0)
    tx = optim.adamw(schedule, weight_decay=0.01, lr_multipliers={'decode_head': 10.0})
    steps = run_updates(tx, params, grads, steps=3)
    for path, grad in flat(grads).items():
        p = flat(params)[path]
        expected = adamw_by_hand(
            p, grad, steps=3, lr_at=lambda c: float(schedule(c)), wd=0.01,
            factor=10.0 if path.startswith('decode_head') else 1.0, decayed=p.ndim >= 2)
        for k in range(3):
            np.testing.assert_allclose(steps[k][path], expected[k], rtol=2e-5, atol=1e-12,
                                       err_msg=f'{path} step {k}')


def test_sgd_momentum_is_lr_free_and_the_factor_scales_the_whole_update():
    """PyTorch's per-group lr: update = -lr_g * buffer, buffer = momentum * buffer + g + wd * p."""
    params, grads = params_and_grads({'head/kernel': (2, 3), 'body/kernel': (2, 3)}, seed=2)
    tx = optim.sgd(0.01, momentum=0.9, weight_decay=5e-4, lr_multipliers={'head': 10.0})
    steps = run_updates(tx, params, grads, steps=3)
    for path in ('head/kernel', 'body/kernel'):
        p, g = flat(params)[path], flat(grads)[path]
        buffer, factor = 0.0, 10.0 if path.startswith('head') else 1.0
        for k in range(3):
            buffer = 0.9 * buffer + g + 5e-4 * p
            np.testing.assert_allclose(steps[k][path], -0.01 * factor * buffer, rtol=1e-5)


def test_unmatched_multiplier_pattern_is_a_config_error_naming_it():
    params, _ = params_and_grads(SHAPES)
    tx = optim.adamw(1e-3, lr_multipliers={'decode_head': 10.0, 'decoder_head': 2.0})
    with pytest.raises(config_lib.ConfigError) as error:
        tx.init(params)
    message = str(error.value)
    assert message.startswith("config.optimizer.lr_multipliers: pattern 'decoder_head' matches "
                              'no parameter')
    assert "'backbone/conv/kernel'" in message  # shows what the paths look like


@pytest.mark.parametrize('options, message', [
    ({'lr_multipliers': {'head': -1.0}}, "lr_multipliers['head']=-1.0: expected a number >= 0"),
    ({'layer_decay': 0.65}, 'config.optimizer.layer_decay needs config.optimizer.layer_id_fn'),
    ({'layer_decay': 1.5, 'layer_id_fn': lambda p: 0}, 'layer_decay=1.5: expected a factor in'),
    ({'layer_id_fn': lambda p: 0}, 'layer_id_fn is set but config.optimizer.layer_decay is not'),
])
def test_bad_group_options_are_config_errors(options, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace('[', r'\[').replace(
            ']', r'\]').replace('.', r'\.')):
        optim.sgd(0.1, **options)


def test_unmatched_pattern_through_a_config_fails_at_state_init():
    """The real path: options from the config, checked against the model's parameter paths
    when the train state is built (jax.eval_shape), before any step."""
    config = config_lib.load(EXPERIMENT, ["optimizer.lr_multipliers={'no_such_module': 10.0}",
                                          'data.crop_size=(16, 16)'])
    tx, _ = optim.make(config)
    trainer = experiment.make_trainer(config, experiment.make_model(config), tx)
    with pytest.raises(config_lib.ConfigError, match="pattern 'no_such_module' matches no"):
        jax.eval_shape(trainer.init, jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# What weight decay skips.


NO_DECAY_SHAPES = {
    'encoder/pos_embed': (1, 5, 4), 'embeddings/position_embeddings': (5, 4),
    'encoder/block_0/attn/kernel': (4, 4), 'encoder/block_0/attn/bias': (4,),
    'encoder/block_0/norm/scale': (4,), 'encoder/block_0/norm/bias': (4,),
    'decode_head/pos_block/kernel': (3, 3, 1, 4),
}


@pytest.mark.parametrize('make', [
    lambda **kw: optim.sgd(0.1, momentum=0.0, weight_decay=0.5, **kw),
    lambda **kw: optim.adamw(0.1, weight_decay=0.5, **kw),
])
def test_norms_biases_and_position_embeddings_are_not_decayed(make):
    params, _ = params_and_grads(NO_DECAY_SHAPES)
    zero = jax.tree.map(jnp.zeros_like, params)  # only weight decay moves anything
    (updates,) = run_updates(make(), params, zero)
    decayed = {'encoder/block_0/attn/kernel', 'decode_head/pos_block/kernel'}
    for path, p in flat(params).items():
        expected = -0.1 * 0.5 * p if path in decayed else np.zeros_like(p)
        np.testing.assert_allclose(updates[path], expected, rtol=1e-6, err_msg=path)
    # A pattern of one's own (SegFormer's mmsegmentation recipe: 'pos_block' decay_mult 0).
    (updates,) = run_updates(make(no_decay=('pos_embed', 'pos_block')), params, zero)
    assert not updates['decode_head/pos_block/kernel'].any()
    # Replacing the built-in names turns them off: 'position_embeddings' is decayed now.
    np.testing.assert_allclose(updates['embeddings/position_embeddings'],
                               -0.05 * flat(params)['embeddings/position_embeddings'], rtol=1e-6)


def test_own_no_decay_pattern_that_matches_nothing_is_a_config_error():
    params, _ = params_and_grads(NO_DECAY_SHAPES)
    with pytest.raises(config_lib.ConfigError, match="no_decay: pattern 'pos_blok' matches no"):
        optim.adamw(0.1, no_decay=('pos_blok',)).init(params)
    optim.adamw(0.1).init(tree(**{'conv/kernel': np.ones((2, 2))}))  # built-ins may match none


# ----------------------------------------------------------------------------------------------
# Layer-wise LR decay.


def vit_layer_id(path: str) -> int | None:
    """A model's layer-id function, BEiT's rule: embeddings 0, block i -> i + 1, else above."""
    if path.startswith('encoder/patch_embed') or 'pos_embed' in path:
        return 0
    for part in path.split('/'):
        if part.startswith('block_'):
            return int(part.split('_')[1]) + 1
    return None


LAYER_SHAPES = {
    'encoder/patch_embed/kernel': (2, 2, 3, 4), 'encoder/pos_embed': (1, 4, 4),
    'encoder/block_0/mlp/kernel': (4, 4), 'encoder/block_1/mlp/kernel': (4, 4),
    'encoder/block_2/mlp/kernel': (4, 4), 'encoder/norm/scale': (4,),
    'decode_head/kernel': (4, 3),
}


def test_layer_decay_by_hand_and_with_multipliers():
    params, grads = params_and_grads(LAYER_SHAPES, seed=3)
    # 3 blocks: top = 4; embeddings 0.5**4, block i 0.5**(3 - i), the rest the full rate.
    factors = {'encoder/patch_embed/kernel': 0.0625, 'encoder/pos_embed': 0.0625,
               'encoder/block_0/mlp/kernel': 0.125, 'encoder/block_1/mlp/kernel': 0.25,
               'encoder/block_2/mlp/kernel': 0.5, 'encoder/norm/scale': 1.0,
               'decode_head/kernel': 1.0}
    tx = optim.sgd(0.1, momentum=0.0, weight_decay=0.0, layer_decay=0.5,
                   layer_id_fn=vit_layer_id)
    (updates,) = run_updates(tx, params, grads)
    for path, grad in flat(grads).items():
        np.testing.assert_allclose(updates[path], -0.1 * factors[path] * grad, rtol=1e-6,
                                   err_msg=path)
    np.testing.assert_equal(flat(optim.lr_factors(params, layer_decay=0.5,
                                                  layer_id_fn=vit_layer_id)), factors)
    # Multipliers multiply the layer factor.
    both = optim.lr_factors(params, layer_decay=0.5, layer_id_fn=vit_layer_id,
                            lr_multipliers={'decode_head': 10.0, 'block_1': 2.0})
    assert flat(both)['decode_head/kernel'] == 10.0
    assert flat(both)['encoder/block_1/mlp/kernel'] == 0.5


def test_layer_id_fn_returning_a_non_id_is_a_config_error():
    params, _ = params_and_grads(LAYER_SHAPES)
    tx = optim.adamw(0.1, layer_decay=0.9, layer_id_fn=lambda path: 'block')
    with pytest.raises(config_lib.ConfigError,
                       match="for parameter 'decode_head/kernel' it returned 'block'"):
        tx.init(params)


# ----------------------------------------------------------------------------------------------
# Configs, optimizer state and checkpoints.


def test_config_options_reach_the_optimizer():
    config = config_lib.load(EXPERIMENT, [
        "optimizer.lr_multipliers={'decoder': 10.0}", 'optimizer.weight_decay=0.0',
        'schedule.warmup_steps=0', 'num_steps=100'])
    tx, schedule = optim.make(config)
    params, grads = params_and_grads({'encoder/kernel': (2, 2), 'decoder/kernel': (2, 2)})
    (updates,) = run_updates(tx, params, grads)
    ratio = updates['decoder/kernel'] / adamw_by_hand(
        flat(params)['decoder/kernel'], flat(grads)['decoder/kernel'], steps=1,
        lr_at=lambda c: float(schedule(c)), factor=1.0, decayed=False, wd=0.0)[0]
    np.testing.assert_allclose(ratio, 10.0, rtol=1e-5)


def test_without_groups_the_state_is_the_plain_optimizers():
    """Checkpoints of runs from before the groups existed still restore."""
    params, _ = params_and_grads(SHAPES)
    plain = optax.adamw(1e-3, weight_decay=1e-4, mask=optim.decay_mask)
    assert (jax.tree.structure(optim.adamw(1e-3).init(params))
            == jax.tree.structure(plain.init(params)))


def test_grouped_optimizer_state_checkpoints_and_restores(tmp_path):
    params, grads = params_and_grads(SHAPES)
    tx = optim.adamw(1e-3, lr_multipliers={'decode_head': 10.0}, layer_decay=0.9,
                     layer_id_fn=lambda path: 0 if path.startswith('backbone') else None)
    state = {'params': params, 'opt_state': tx.update(grads, tx.init(params), params)[1]}
    mngr = checkpoint.manager(str(tmp_path / 'ckpt'), asynchronous=False)
    checkpoint.save(mngr, 1, state)
    mngr.wait_until_finished()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state),
                                                  jax.tree.map(lambda _: device, state))
    restored = checkpoint.restore(mngr, abstract)
    mngr.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
