"""SegFormer: the model contract and its blocks, parity with Hugging Face `transformers` after
importing its checkpoints (torch and transformers are test-only oracles: those tests skip
without them), encoder-only and mismatched checkpoints, and hostile `.safetensors` files."""

import functools
import json
import struct
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import pretrained
from segjax.models import segformer
from segjax.pth import PretrainedError
from segjax.safetensors import read_safetensors

B0 = {'depths': [2, 2, 2, 2], 'hidden_sizes': [32, 64, 160, 256], 'decoder_hidden_size': 256}
B2 = {'depths': [3, 4, 6, 3], 'hidden_sizes': [64, 128, 320, 512], 'decoder_hidden_size': 768}


def _zeros_like_variables(model, shape=(1, 64, 64, 3)) -> dict:
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)


def _random_variables(model, shape, train_arg: bool = False) -> dict:
    """Variables drawn in numpy (BatchNorm variances 1): compiling `init` takes longer than
    the tests themselves (as in tests/test_models.py)."""
    extra = {'train': False} if train_arg else {}
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), **extra))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == 'var':
            return np.ones(leaf.shape, np.float32)
        return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _fast_jit(fn, *args, **kwargs):
    """fn compiled for args without XLA's backend optimisations (3-4x faster to compile)."""
    return jax.jit(fn).lower(*args, **kwargs).compile({'xla_backend_optimization_level': 0})


def _images(shape=(2, 64, 64, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The model contract and its blocks.

# A SegFormer small enough to compile and run in a second or two on a busy CPU.
TINY = {'hidden_sizes': (8, 16, 16, 16), 'depths': (1, 1, 1, 1), 'num_heads': (1, 2, 2, 4),
        'decoder_channels': 16}


def test_b0_logits_at_input_resolution_and_stage_strides():
    model = segformer.SegFormerB0(num_classes=5)
    images = jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    logits = jax.eval_shape(model.apply, variables, images)
    assert logits.shape == (2, 64, 48, 5) and logits.dtype == jnp.float32
    assert set(variables) == {'params', 'batch_stats'}
    assert set(variables['params']) == {'backbone', 'decode_head'}
    features = jax.eval_shape(segformer.MiTB0().apply,
                              {'params': variables['params']['backbone']}, images)
    # Strides 4, 8, 16, 32 (rounded up, as the padded strided convolutions give).
    assert [f.shape for f in features] == [(2, 16, 12, 32), (2, 8, 6, 64), (2, 4, 3, 160),
                                           (2, 2, 2, 256)]
    # SegFormer-B0 for ADE20K's 150 classes: 3,752,694 parameters, counted on transformers
    # 5.23's SegformerForSemanticSegmentation (the paper rounds it to 3.8M).
    ade = jax.eval_shape(segformer.SegFormerB0(num_classes=150).init, jax.random.key(0), images)
    assert sum(leaf.size for leaf in jax.tree.leaves(ade['params'])) == 3_752_694


def test_bfloat16_compute_keeps_float32_params_and_logits():
    images = jnp.asarray(_images((1, 64, 64, 3)))
    model = segformer.SegFormer(num_classes=3, **TINY)
    variables = _random_variables(model, images.shape)
    low = segformer.SegFormer(num_classes=3, dtype=jnp.bfloat16, **TINY)
    abstract = jax.eval_shape(low.init, jax.random.key(0), images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape,
                                                                     variables)
    logits = _fast_jit(low.apply, variables, images)(variables, images)
    reference = _fast_jit(model.apply, variables, images)(variables, images)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert float(jnp.abs(logits - reference).max()) < 0.1 * float(jnp.abs(reference).max())


def test_drop_path_drops_whole_residual_branches_only_in_training():
    x = jnp.asarray(_images((16, 8, 8, 16)))
    block = segformer.MiTBlock(num_heads=2, sr_ratio=2, drop_path=1.0)
    variables = _random_variables(block, x.shape, train_arg=True)
    rngs = {'dropout': jax.random.key(1)}

    def run(module, train):
        apply = functools.partial(module.apply, train=train)
        return _fast_jit(apply, variables, x, rngs=rngs)(variables, x, rngs=rngs)

    # Rate 1 drops both branches of every example: the block is the identity.
    np.testing.assert_array_equal(run(block, True), x)
    assert float(jnp.abs(run(block, False) - x).min()) > 0
    # Rate 0.5: one draw per example and branch; where both are dropped the example is x.
    half = segformer.MiTBlock(num_heads=2, sr_ratio=2, drop_path=0.5)
    out = run(half, True)
    unchanged = np.all(np.asarray(out) == np.asarray(x), axis=(1, 2, 3))
    changed_everywhere = np.all(np.asarray(out) != np.asarray(x), axis=(1, 2, 3))
    assert unchanged.any() and changed_everywhere.any()
    assert np.all(unchanged | changed_everywhere)
    # Rate 0 in training is the evaluation output.
    none = segformer.MiTBlock(num_heads=2, sr_ratio=2, drop_path=0.0)
    np.testing.assert_array_equal(run(none, True), run(none, False))


def test_drop_path_rises_linearly_over_all_blocks(monkeypatch):
    rates = []
    original = segformer.MiTBlock.__call__

    def record(self, x, train):
        rates.append(self.drop_path)
        return original(self, x, train)

    monkeypatch.setattr(segformer.MiTBlock, '__call__', record)
    model = segformer.MixTransformer(depths=(1, 2, 1, 1), drop_path_rate=0.4)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3, 0.4])


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match='smaller than its sequence reduction ratio 8'):
        jax.eval_shape(segformer.SegFormerB0(num_classes=2).init, jax.random.key(0),
                       jnp.zeros((1, 16, 16, 3)))


def test_every_parameter_gets_a_gradient():
    # 64x64: every attention then has several keys (one key gets all the weight, and its
    # query and key projections no gradient).
    model = segformer.SegFormer(num_classes=3, **TINY)
    images = jnp.asarray(_images((2, 64, 64, 3)))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 64, 64)))
    variables = _random_variables(model, images.shape)

    def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                                mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    grads = _fast_jit(jax.grad(loss), variables['params'])(variables['params'])
    norms = {'/'.join(k.key for k in path): float(jnp.abs(g).max())
             for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert all(np.isfinite(v) for v in norms.values())
    assert not [path for path, v in norms.items() if v == 0.0]


# ---------------------------------------------------------------------------------------------
# Parity with transformers (test-only oracle).

def _hf_model(config: dict, num_labels: int = 5, classification: bool = False):
    """A transformers SegFormer with every parameter and BN statistic randomised (its own init
    leaves biases at 0 and norms at 1, which would hide a mixed-up bias or norm)."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.SegformerConfig(num_labels=num_labels, **config)
    cls = (transformers.SegformerForImageClassification if classification
           else transformers.SegformerForSemanticSegmentation)
    model = cls(hf_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            noise = 0.1 * torch.randn_like(parameter)
            parameter.add_(noise if parameter.ndim > 1 else 3 * noise)
        if not classification:
            norm = model.decode_head.batch_norm
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return model


def _hf_logits(model, images: np.ndarray) -> np.ndarray:
    """transformers' stride-4 logits resized to the input with torch's bilinear
    (align_corners=False), which segjax's resize_bilinear equals (tests/test_resize.py)."""
    import torch
    with torch.no_grad():
        logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits
        logits = torch.nn.functional.interpolate(logits, size=images.shape[1:3],
                                                 mode='bilinear', align_corners=False)
    return logits.numpy().transpose(0, 2, 3, 1)


def _save_both(model, folder) -> list:
    """model.safetensors as save_pretrained writes it (the hub's names) and pytorch_model.bin
    as torch.save(model.state_dict()) (transformers >= 5's own module names)."""
    import torch
    model.save_pretrained(folder)
    torch.save(model.state_dict(), folder / 'pytorch_model.bin')
    return [folder / 'model.safetensors', folder / 'pytorch_model.bin']


def _check_parity(hf_config: dict, segjax_model, tmp_path, shape):
    hf = _hf_model(hf_config)
    images = _images(shape)
    expected = _hf_logits(hf, images)
    forward = jax.jit(segjax_model.apply)
    for path in _save_both(hf, tmp_path):
        variables = pretrained.load_into(_zeros_like_variables(segjax_model), path)
        logits = np.asarray(forward(variables, images))
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0, err_msg=str(path))
    assert np.abs(expected).max() > 1.0  # logits of a size where 1e-4 is a real test


def test_b0_logits_equal_transformers_after_import(tmp_path):
    _check_parity(B0, segformer.SegFormerB0(num_classes=5), tmp_path, (2, 64, 64, 3))


@pytest.mark.slow  # ~20-30 s on a busy 2-core CPU (B2's 27M parameters, saved twice)
@pytest.mark.long
def test_b2_logits_equal_transformers_after_import(tmp_path):
    _check_parity(B2, segformer.SegFormerB2(num_classes=5), tmp_path, (1, 64, 64, 3))


def test_encoder_checkpoint_loads_the_backbone_and_keeps_the_decoder(tmp_path):
    torch = pytest.importorskip('torch')
    hf = _hf_model(B0, num_labels=1000, classification=True)  # nvidia/mit-b0's layout
    hf.save_pretrained(tmp_path)
    model = segformer.SegFormerB0(num_classes=4)
    images = _images((1, 64, 64, 3))
    variables = _random_variables(model, images.shape)
    loaded = pretrained.load_into(variables, tmp_path / 'model.safetensors')
    jax.tree.map(np.testing.assert_array_equal, loaded['params']['decode_head'],
                 jax.tree.map(np.asarray, variables['params']['decode_head']))
    features = jax.jit(segformer.MiTB0().apply)({'params': loaded['params']['backbone']},
                                                images)
    with torch.no_grad():
        hidden = hf.segformer(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                              output_hidden_states=True).hidden_states
    for ours, theirs in zip(features, hidden, strict=True):
        np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_another_number_of_classes_is_an_error_unless_the_classifier_is_skipped(tmp_path):
    pytest.importorskip('torch')
    path = _save_both(_hf_model(B0, num_labels=5), tmp_path)[0]
    model = segformer.SegFormerB0(num_classes=7)
    variables = _random_variables(model, (1, 64, 64, 3))
    with pytest.raises(PretrainedError) as info:
        pretrained.load_into(variables, path)
    message = str(info.value)
    assert str(path) in message and 'nothing was loaded' in message
    assert ('decode_head.classifier.weight (1, 1, 256, 5) -> params/decode_head/classifier/kernel '
            '(1, 1, 256, 7)') in message
    assert "skip=('decode_head.classifier.',)" in message
    loaded = pretrained.load_into(variables, path, skip=('decode_head.classifier.',))
    np.testing.assert_array_equal(loaded['params']['decode_head']['classifier']['kernel'],
                                  variables['params']['decode_head']['classifier']['kernel'])
    file = read_safetensors(path)
    np.testing.assert_array_equal(loaded['params']['decode_head']['linear_fuse']['kernel'],
                                  file['decode_head.linear_fuse.weight'].transpose(2, 3, 1, 0))


def test_another_mit_size_names_the_differing_shapes(tmp_path):
    pytest.importorskip('torch')
    path = _save_both(_hf_model(B0), tmp_path)[0]
    model = segformer.SegFormerB1(num_classes=5)
    with pytest.raises(PretrainedError, match=r'the file holds a MiT with hidden sizes '
                       r'\(32, 64, 160, 256\) and 2-2-2-2 blocks but the model is a MiT with '
                       r'hidden sizes \(64, 128, 320, 512\)'):
        pretrained.load_into(_zeros_like_variables(model), path)


def test_segformer_names_map_both_ways_of_naming():
    assert (pretrained.segformer_to_segjax_name('segformer.encoder.block.1.0.attention.self.sr')
            == 'backbone/block1_0/attention/sr')
    assert (pretrained.segformer_to_segjax_name('segformer.stages.1.blocks.0.attention.'
                                                'sequence_reduction.sequence_reduction')
            == 'backbone/block1_0/attention/sr')
    assert pretrained.segformer_to_segjax_name('decode_head.linear_c.3.proj') == \
        'decode_head/linear_c3'
    assert pretrained.segformer_to_segjax_name('classifier') is None


# ---------------------------------------------------------------------------------------------
# Hostile .safetensors files.

_FLOATS = np.arange(4, dtype='<f4').tobytes()


def _safetensors(header, data: bytes = _FLOATS, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + data


def _entry(dtype='F32', shape=(4,), offsets=(0, 16)) -> dict:
    return {'dtype': dtype, 'shape': list(shape), 'data_offsets': list(offsets)}


HOSTILE = [
    ('header_length_huge', struct.pack('<Q', 1 << 62) + b'{}', 'does not fit'),
    ('header_length_past_file', struct.pack('<Q', 100) + b'{}', 'does not fit'),
    ('too_short', b'\x01\x00', 'too short'),
    ('empty', b'', 'too short'),
    ('bad_json', _safetensors(None, raw_header=b'{"w": '), 'not JSON'),
    ('not_utf8', _safetensors(None, raw_header=b'{"\xff\xfe": 1}'), 'not JSON'),
    ('deep_json', _safetensors(None, raw_header=b'[' * 100_000), 'not JSON'),
    ('header_a_list', _safetensors([1, 2]), 'a list, not a JSON object'),
    ('duplicate_name', _safetensors(None, raw_header=(
        b'{"w": ' + json.dumps(_entry()).encode() + b', "w": '
        + json.dumps(_entry()).encode() + b'}')), 'appear twice'),
    ('metadata_not_strings', _safetensors({'__metadata__': {'a': 1}, 'w': _entry()}),
     '__metadata__'),
    ('entry_not_a_dict', _safetensors({'w': 3}), "tensor 'w': expected"),
    ('entry_extra_field', _safetensors({'w': {**_entry(), 'x': 1}}), "tensor 'w': expected"),
    ('unknown_dtype', _safetensors({'w': _entry(dtype='F8_E4M3', shape=(16,))}),
     "dtype 'F8_E4M3'"),
    ('negative_shape', _safetensors({'w': _entry(shape=(-1, 4))}), 'malformed tensor shape'),
    ('bool_shape', _safetensors({'w': _entry(shape=(True, 4))}), 'malformed tensor shape'),
    ('float_shape', _safetensors({'w': _entry(shape=(4.0,))}), 'malformed tensor shape'),
    ('too_many_dims', _safetensors({'w': _entry(shape=(1,) * 33)}), 'malformed tensor shape'),
    ('offsets_three', _safetensors({'w': _entry(offsets=(0, 8, 16))}), 'malformed data_offsets'),
    ('offsets_negative', _safetensors({'w': _entry(offsets=(-16, 0))}),
     'malformed data_offsets'),
    ('offsets_past_end', _safetensors({'w': _entry(shape=(8,), offsets=(0, 32))}),
     'inconsistent offsets 0..32'),
    ('offsets_reversed', _safetensors({'w': _entry(offsets=(16, 0))}), 'inconsistent offsets'),
    ('wrong_dtype_size', _safetensors({'w': _entry(dtype='F64')}), 'holds 32 bytes'),
    ('shape_overflows', _safetensors({'w': _entry(shape=(2**40, 2**40))}), 'inconsistent'),
    ('overlapping', _safetensors({'a': _entry(shape=(3,), offsets=(0, 12)),
                                  'b': _entry(shape=(3,), offsets=(4, 16))}),
     "'b' at 4..16 overlaps"),
    ('aliasing', _safetensors({'a': _entry(), 'b': _entry()}), 'overlaps'),
    ('hole', _safetensors({'a': _entry(shape=(2,), offsets=(0, 8)),
                           'b': _entry(shape=(1,), offsets=(12, 16))}), 'leaves a hole'),
    ('trailing_data', _safetensors({'w': _entry(shape=(2,), offsets=(0, 8))}),
     'cover 8 of the 16'),
]


@pytest.mark.parametrize('name, raw, pattern', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_safetensors_are_refused_without_allocating(tmp_path, name, raw, pattern):
    path = tmp_path / f'{name}.safetensors'
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(PretrainedError, match=pattern) as info:
            pretrained.read_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 8 << 20, f'{peak} bytes allocated for a {len(raw)}-byte file'


def test_safetensors_written_by_the_safetensors_package_read_back_exactly(tmp_path):
    numpy_io = pytest.importorskip('safetensors.numpy')
    import ml_dtypes
    rng = np.random.default_rng(0)
    tensors = {'f32': rng.normal(size=(3, 5)).astype(np.float32),
               'f16': rng.normal(size=(7,)).astype(np.float16),
               'i64': rng.integers(-9, 9, (2, 2, 2)).astype(np.int64),
               'u8': rng.integers(0, 255, (4,)).astype(np.uint8),
               'flags': rng.integers(0, 2, (5,)).astype(np.bool_),
               'scalar': np.array(3.5, np.float64), 'empty': np.zeros((0, 3), np.float32)}
    numpy_io.save_file(tensors, tmp_path / 'w.safetensors', metadata={'format': 'np'})
    read = read_safetensors(tmp_path / 'w.safetensors')
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and read[name].shape == value.shape
        np.testing.assert_array_equal(read[name], value)
    # bfloat16 by hand (numpy has no bfloat16 for the package's numpy writer).
    bf16 = np.array([1.5, -2.0, 0.25], ml_dtypes.bfloat16)
    (tmp_path / 'bf.safetensors').write_bytes(_safetensors(
        {'b': _entry('BF16', (3,), (0, 6))}, bf16.tobytes()))
    np.testing.assert_array_equal(read_safetensors(tmp_path / 'bf.safetensors')['b'], bf16)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='no weights file'):
        read_safetensors(tmp_path / 'nothing.safetensors')
