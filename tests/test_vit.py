"""ViT / DINOv2 encoders, the linear and Segmenter heads: the model contract, position-embedding
resizing against torch, parity with Hugging Face `transformers` after importing its checkpoints
(torch and transformers are test-only oracles: those tests skip without them), clear errors for
the wrong checkpoint, layer-wise LR decay and a frozen backbone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segjax import optim, pretrained
from segjax.models import segmenter, vit
from segjax.pth import PretrainedError

# Tiny encoders, small enough to compile in a second or two on a busy CPU.
TINY_VIT = {'patch_size': 8, 'hidden_size': 32, 'depth': 2, 'num_heads': 2, 'image_size': 32}
HF_TINY = {'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
           'image_size': 32, 'patch_size': 8}


def _fast_jit(fn, *args, **kwargs):
    """fn compiled for args without XLA's backend optimisations (3-4x faster to compile)."""
    return jax.jit(fn).lower(*args, **kwargs).compile({'xla_backend_optimization_level': 0})


def _images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _random_variables(model, shape, *args) -> dict:
    """Variables drawn in numpy (BatchNorm variances 1): faster than compiling `init`."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), *args))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == 'var':
            return np.ones(leaf.shape, np.float32)
        return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _zeros_like_variables(model, shape) -> dict:
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


# ---------------------------------------------------------------------------------------------
# Position embeddings: the bicubic resize equals torch's.

@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('in_size, out_size', [(4, 7), (5, 3), (37, 16), (14, 32), (6, 6)])
def test_bicubic_resize_matrix_equals_torch_interpolate(in_size, out_size, antialias):
    torch = pytest.importorskip('torch')
    grid = np.random.default_rng(0).normal(size=(in_size, in_size + 1)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid)[None, None], size=(out_size, out_size + 2), mode='bicubic',
        align_corners=False, antialias=antialias)[0, 0].numpy()
    rows = vit.bicubic_resize_matrix(in_size, out_size, antialias=antialias)
    cols = vit.bicubic_resize_matrix(in_size + 1, out_size + 2, antialias=antialias)
    np.testing.assert_allclose(rows @ grid @ cols.T, expected, atol=1e-5)


def test_bicubic_resize_matrix_by_hand():
    # Torch's a = -0.75 kernel at offset 0.5: weights (-0.09375, 0.59375, 0.59375, -0.09375).
    # Doubling 4 -> 8: output 1 samples x = 0.25, output 2 x = 0.75.
    weights = vit.bicubic_resize_matrix(4, 8)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    kernel = vit._cubic(np.array([1.5, 0.5, 0.5, 1.5]), -0.75)
    np.testing.assert_allclose(kernel, [-0.09375, 0.59375, 0.59375, -0.09375])
    # Output 3 samples x = 1.25: taps 0..3 at distances 1.25, 0.25, 0.75, 1.75.
    np.testing.assert_allclose(weights[3], vit._cubic(np.array([1.25, 0.25, 0.75, 1.75]), -0.75))
    np.testing.assert_array_equal(vit.bicubic_resize_matrix(5, 5), np.eye(5))


# ---------------------------------------------------------------------------------------------
# The model contract.

def test_encoder_shapes_registers_and_intermediate_layers():
    model = vit.VisionTransformer(**TINY_VIT, num_registers=4, layer_scale=1e-5)
    images = jax.ShapeDtypeStruct((2, 40, 56, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    params = variables['params']
    assert params['pos_embed'].shape == (1, 1 + 4 * 4, 32)
    assert params['register_tokens'].shape == (1, 4, 32)
    assert params['block0']['layer_scale1'].shape == (32,)
    assert jax.eval_shape(model.apply, variables, images).shape == (2, 5, 7, 32)
    outputs = jax.eval_shape(functools.partial(model.apply, layers=(0, -1)), variables, images)
    assert [(p.shape, c.shape) for p, c in outputs] == [((2, 5, 7, 32), (2, 32))] * 2
    # Counted on transformers 5.23: ViTModel(add_pooling_layer=False) 85,798,656 (ViT-B/16's
    # 86M), Dinov2Model(image_size=518, patch_size=14, 384 wide) without mask_token 22,056,192.
    for variant, count in ((vit.ViTB16, 85_798_656), (vit.DINOv2S14, 22_056_192)):
        shapes = jax.eval_shape(variant().init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
        assert sum(x.size for x in jax.tree.leaves(shapes)) == count


@pytest.mark.parametrize('make', [vit.DINOv2LinearS14, segmenter.SegmenterViTS16],
                         ids=['linear', 'segmenter'])
def test_bfloat16_compute_keeps_float32_params_and_logits(make):
    images = jax.ShapeDtypeStruct((1, 64, 80, 3), jnp.float32)
    model = make(num_classes=5, dtype=jnp.bfloat16)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits = jax.eval_shape(model.apply, variables, images)
    assert logits.shape == (1, 64, 80, 5) and logits.dtype == jnp.float32


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match='smaller than one 8x8 patch'):
        jax.eval_shape(vit.VisionTransformer(**TINY_VIT).init, jax.random.key(0),
                       jnp.zeros((1, 4, 32, 3)))


@pytest.mark.parametrize('make', [
    functools.partial(vit.ViTLinear, backbone=functools.partial(vit.VisionTransformer,
                                                                **TINY_VIT),
                      layers=(-2, -1), use_cls_token=True),
    functools.partial(segmenter.Segmenter, backbone=functools.partial(vit.VisionTransformer,
                                                                      **TINY_VIT),
                      decoder_size=16, decoder_depth=1),
], ids=['linear', 'segmenter'])
def test_heads_give_logits_at_input_resolution_and_every_parameter_a_gradient(make):
    model = make(num_classes=3)
    images = jnp.asarray(_images((2, 24, 32, 3)))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 24, 32)))
    variables = _random_variables(model, images.shape)
    assert set(variables['params']) == {'backbone', 'decode_head'}

    def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                                mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    logits = _fast_jit(model.apply, variables, images)(variables, images)
    assert logits.shape == (2, 24, 32, 3) and logits.dtype == jnp.float32
    grads = _fast_jit(jax.grad(loss), variables['params'])(variables['params'])
    zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
            if not float(jnp.abs(g).max()) > 0]
    assert not zero


def test_segmenter_masks_follow_the_paper():
    """Masks = LayerNorm over classes of cosine similarities of projected patches and classes."""
    head = segmenter.MaskTransformer(num_classes=3, decoder_size=8, depth=1)
    patches = jnp.asarray(_images((1, 2, 2, 8)))
    variables = _random_variables(head, patches.shape, False)
    apply = jax.jit(functools.partial(head.apply, train=False))
    masks = apply(variables, patches)
    # Without the final LayerNorm (scale 1, bias 0) the masks are cosines in [-1, 1].
    params = jax.tree.map(np.copy, variables['params'])
    params['mask_norm'] = {'scale': np.ones(3, np.float32), 'bias': np.zeros(3, np.float32)}
    normed = apply({'params': params}, patches)
    np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-5)
    assert masks.shape == (1, 2, 2, 3)


def test_drop_path_drops_whole_branches_only_in_training():
    x = jnp.asarray(_images((16, 5, 8)))
    block = vit.TransformerBlock(num_heads=2, drop_path=1.0, layer_scale=0.5)
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x, False))
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.1, np.float32), variables)
    rngs = {'dropout': jax.random.key(1)}

    def run(module, train):
        return jax.jit(functools.partial(module.apply, train=train))(variables, x, rngs=rngs)

    np.testing.assert_array_equal(run(block, True), x)  # rate 1: every branch dropped
    assert float(jnp.abs(run(block, False) - x).min()) > 0
    half = vit.TransformerBlock(num_heads=2, drop_path=0.5, layer_scale=0.5)
    out = np.asarray(run(half, True))
    same = np.all(out == np.asarray(x), axis=(1, 2))
    assert same.any() and not same.all()


def test_drop_path_rises_linearly_over_blocks(monkeypatch):
    rates = []
    original = vit.TransformerBlock.__call__

    def record(self, x, train):
        rates.append(self.drop_path)
        return original(self, x, train)

    monkeypatch.setattr(vit.TransformerBlock, '__call__', record)
    model = vit.VisionTransformer(**{**TINY_VIT, 'depth': 5}, drop_path_rate=0.4)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4])


# ---------------------------------------------------------------------------------------------
# Optimizer: layer-wise decay and a frozen backbone.

def test_vit_layer_id_gives_beit_layer_decay():
    model = vit.ViTLinear(num_classes=3, backbone=functools.partial(vit.VisionTransformer,
                                                                    **TINY_VIT))
    params = _random_variables(model, (1, 32, 32, 3))['params']
    factors = optim.lr_factors(params, layer_decay=0.5, layer_id_fn=vit.vit_layer_id)
    flat = {optim.parameter_path(p): f for p, f in jax.tree_util.tree_leaves_with_path(factors)}
    # Depth 2: embeddings id 0, blocks 1-2, top = 3; the final norm and the head at 1.
    assert flat['backbone/pos_embed'] == flat['backbone/patch_embed_kernel'] == 0.5 ** 3
    assert flat['backbone/cls_token'] == 0.5 ** 3
    assert flat['backbone/block0/attention/query/kernel'] == 0.5 ** 2
    assert flat['backbone/block1/fc2/bias'] == 0.5
    assert flat['backbone/norm/scale'] == flat['decode_head/classifier/kernel'] == 1.0
    assert vit.vit_layer_id('backbone/register_tokens') == 0
    assert vit.vit_layer_id('decode_head/block0/fc1/kernel') is None  # Segmenter's decoder


def test_frozen_backbone_stays_bit_identical_under_adamw_with_weight_decay():
    model = vit.ViTLinear(num_classes=3, frozen_backbone=True, drop_path_rate=0.5,
                          backbone=functools.partial(vit.VisionTransformer, **TINY_VIT))
    images = jnp.asarray(_images((2, 32, 32, 3)))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 32, 32)))
    variables = _random_variables(model, images.shape)
    tx = optim.adamw(1e-2, weight_decay=0.5, lr_multipliers={'backbone': 0.0})

    def step(params, opt_state, batch_stats):
        def loss(params):
            logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                          images, train=True, mutable=['batch_stats'],
                                          rngs={'dropout': jax.random.key(3)})
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                                 labels[..., None], -1)), updates
        grads, updates = jax.grad(loss, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), opt_state, updates['batch_stats'], grads

    params, opt_state = variables['params'], tx.init(variables['params'])
    step = jax.jit(step)
    for _ in range(2):
        params, opt_state, batch_stats, grads = step(params, opt_state,
                                                     variables['batch_stats'])
    jax.tree.map(np.testing.assert_array_equal, params['backbone'],
                 variables['params']['backbone'])
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['backbone']))
    head_moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                              params['decode_head'], variables['params']['decode_head'])
    assert all(v > 0 for v in jax.tree.leaves(head_moved))


# ---------------------------------------------------------------------------------------------
# Parity with transformers (test-only oracle).

def _hf_encoder(kind: str, **config):
    """A transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel with every parameter
    randomised (its own init leaves biases at 0, norms at 1 and LayerScale constant, which
    would hide a swapped bias, norm or scale)."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    classes = {'vit': (transformers.ViTConfig, transformers.ViTModel),
               'dinov2': (transformers.Dinov2Config, transformers.Dinov2Model),
               'dinov2_registers': (transformers.Dinov2WithRegistersConfig,
                                    transformers.Dinov2WithRegistersModel)}
    config_class, model_class = classes[kind]
    model = model_class(config_class(**config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            noise = 0.1 * torch.randn_like(parameter)
            parameter.add_(noise if parameter.ndim > 1 else 3 * noise)
    return model


def _hf_features(model, images: np.ndarray, layers=()) -> tuple[np.ndarray, list]:
    """(last patch tokens [B,h,w,D], [(normed patch tokens, normed class token) per layer])."""
    import torch
    patch = model.config.patch_size
    height, width = images.shape[1] // patch, images.shape[2] // patch
    extra = {'interpolate_pos_encoding': True} if model.config.model_type == 'vit' else {}
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True,
                    **extra)
        skip = 1 + getattr(model.config, 'num_register_tokens', 0)

        def patches(tokens):
            return tokens[:, skip:].numpy().reshape(len(images), height, width, -1)

        normed = [model.layernorm(out.hidden_states[i % model.config.num_hidden_layers + 1])
                  for i in layers]
        return patches(out.last_hidden_state), [(patches(t), t[:, 0].numpy()) for t in normed]


def _save_both(model, folder) -> list:
    """model.safetensors as save_pretrained writes it (the hub's names) and pytorch_model.bin
    as torch.save(model.state_dict()) (transformers >= 5's module names)."""
    import torch
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / 'pytorch_model.bin')
    return [folder / 'model.safetensors', folder / 'pytorch_model.bin']


def _check_parity(hf, ours, tmp_path, shapes, layers=(0,)):
    """Last-layer patch tokens at every shape (the first: the native grid; the others: position
    embeddings resized), and the normed tokens of `layers` at the last shape."""
    saved = _save_both(hf, tmp_path)
    last = jax.jit(ours.apply)
    for shape in shapes:
        images = _images(shape)
        expected, expected_layers = _hf_features(hf, images, layers)
        for path in saved:
            variables = pretrained.load_into(_zeros_like_variables(ours, shape), path)
            np.testing.assert_allclose(last(variables, images), expected, atol=1e-4, rtol=0,
                                       err_msg=f'{path} {shape}')
        assert np.abs(expected).max() > 1.0  # features of a size where 1e-4 is a real test
    outputs = jax.jit(functools.partial(ours.apply, layers=tuple(layers)))(variables, images)
    for (patches, cls), (hf_patches, hf_cls) in zip(outputs, expected_layers, strict=True):
        np.testing.assert_allclose(patches, hf_patches, atol=1e-4, rtol=0)
        np.testing.assert_allclose(cls, hf_cls, atol=1e-4, rtol=0)


def test_vit_features_equal_transformers_vitmodel_at_any_size(tmp_path):
    hf = _hf_encoder('vit', **HF_TINY, intermediate_size=128)
    ours = vit.VisionTransformer(**TINY_VIT, layer_norm_eps=1e-12)
    _check_parity(hf, ours, tmp_path, [(2, 32, 32, 3), (1, 56, 40, 3)])


def test_dinov2_features_equal_transformers_dinov2model_at_any_size(tmp_path):
    hf = _hf_encoder('dinov2', **HF_TINY)
    ours = vit.VisionTransformer(**TINY_VIT, layer_scale=1.0, layer_norm_eps=1e-6)
    _check_parity(hf, ours, tmp_path, [(2, 32, 32, 3), (1, 48, 24, 3), (1, 19, 17, 3)])


def test_dinov2_with_registers_features_equal_transformers(tmp_path):
    hf = _hf_encoder('dinov2_registers', **HF_TINY, num_register_tokens=4)
    ours = vit.VisionTransformer(**TINY_VIT, layer_scale=1.0, layer_norm_eps=1e-6,
                                 num_registers=4, antialias_position=True)
    # 24x48: the grid shrinks along one axis (the antialiased filter widens) and grows along
    # the other.
    _check_parity(hf, ours, tmp_path, [(1, 32, 32, 3), (1, 24, 48, 3)], layers=(0, 1))


@pytest.mark.slow  # ViT-S/16 and DINOv2-S/14 at their real shapes: 15 s here, more when busy
def test_real_size_vit_s16_and_dinov2_s14_features_equal_transformers(tmp_path):
    hf = _hf_encoder('vit', hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                     intermediate_size=1536, image_size=224, patch_size=16)
    _check_parity(hf, vit.ViTS16(), tmp_path / 'vit', [(1, 224, 224, 3), (1, 64, 96, 3)],
                  layers=(-4,))
    hf = _hf_encoder('dinov2', hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                     image_size=518, patch_size=14)
    _check_parity(hf, vit.DINOv2S14(), tmp_path / 'dinov2', [(1, 70, 98, 3)], layers=(-4,))


def test_classification_checkpoint_loads_the_backbone_of_a_segmenter(tmp_path):
    """google/vit-base-patch16-224's layout (ViTForImageClassification: `vit.*` and an
    ImageNet `classifier`): the encoder is filled, the classifier and the head are not."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        **HF_TINY, intermediate_size=128, num_labels=10)).eval()
    hf.save_pretrained(tmp_path)
    model = segmenter.Segmenter(num_classes=3, decoder_size=16, decoder_depth=1,
                                backbone=functools.partial(vit.VisionTransformer, **TINY_VIT))
    images = _images((1, 32, 32, 3))
    variables = _random_variables(model, images.shape)
    loaded = pretrained.load_into(variables, tmp_path / 'model.safetensors')
    jax.tree.map(np.testing.assert_array_equal, loaded['params']['decode_head'],
                 jax.tree.map(np.asarray, variables['params']['decode_head']))
    encoder = vit.VisionTransformer(**TINY_VIT)
    ours = encoder.apply({'params': loaded['params']['backbone']}, images)
    expected, _ = _hf_features(hf.vit, images)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_wrong_checkpoint_names_sizes_keys_and_shapes(tmp_path):
    pytest.importorskip('torch')
    path = _save_both(_hf_encoder('dinov2', **HF_TINY), tmp_path)[0]
    # Another width: the message leads with both encoders and lists the shapes.
    wide = vit.VisionTransformer(**{**TINY_VIT, 'hidden_size': 64}, layer_scale=1.0)
    with pytest.raises(PretrainedError) as info:
        pretrained.load_into(_zeros_like_variables(wide, (1, 32, 32, 3)), path)
    message = str(info.value)
    assert str(path) in message and 'nothing was loaded' in message
    assert ('the file holds a ViT with hidden size 32, 8x8 patches, 2 blocks, a 4x4 position '
            'grid, 0 register tokens, LayerScale but the model\'s encoder is a ViT with hidden '
            'size 64') in message
    assert ('encoder.layer.0.attention.attention.query.weight (32, 32) -> '
            'params/block0/attention/query/kernel (64, 64)') in message
    # A DINOv2 file into a plain ViT: LayerScale has no place.
    plain = vit.VisionTransformer(**TINY_VIT)
    with pytest.raises(PretrainedError, match=r'encoder.layer.0.layer_scale1.lambda1 \(32,\) -> '
                       r'params/block0/layer_scale1'):
        pretrained.load_into(_zeros_like_variables(plain, (1, 32, 32, 3)), path)
    # A register model without registers in the file: the missing parameter is named.
    registers = vit.VisionTransformer(**TINY_VIT, layer_scale=1.0, num_registers=4)
    with pytest.raises(PretrainedError, match=r'params/register_tokens \(1, 4, 32\)'):
        pretrained.load_into(_zeros_like_variables(registers, (1, 32, 32, 3)), path)


def test_vit_names_map_both_ways_of_naming():
    name = pretrained.vit_to_segjax_path
    assert name('encoder.layer.3.attention.attention.query.weight') == \
        'block3/attention/query/kernel'
    assert name('vit.layers.3.attention.q_proj.weight') == 'block3/attention/query/kernel'
    assert name('encoder.layer.0.intermediate.dense.bias') == 'block0/fc1/bias'
    assert name('encoder.layer.0.output.dense.weight') == 'block0/fc2/kernel'
    assert name('dinov2.encoder.layer.1.norm2.weight') == 'block1/norm2/scale'
    assert name('layernorm.weight') == 'norm/scale'
    assert name('encoder.layer.1.layer_scale2.lambda1') == 'block1/layer_scale2'
    assert name('pooler.dense.weight') is None
