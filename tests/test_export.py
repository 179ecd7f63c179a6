"""Tests for cratemae.export: the reference (Ma-Lab-Berkeley/CRATE crate_ae) state-dict layout, round trips, files.

The expected key/shape table below is written independently from the spec (§1, §2.10), not from export.py.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

import experiments
from cratemae import export
from cratemae import models
from cratemae import ops

BF16 = np.dtype(ml_dtypes.bfloat16)


def _model_config(name, **overrides):
    cfg = ml_collections.ConfigDict(experiments.get_config(name).model.to_dict())
    cfg.update(overrides)
    return cfg


def _init(cfg, abstract=False):
    model = models.build(cfg)
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    init = lambda: model.init({'params': jax.random.PRNGKey(0), 'masking': jax.random.PRNGKey(1)}, images)
    return (jax.eval_shape(init) if abstract else jax.jit(init)())['params']


def _randomized(params, seed=0):
    """Params with every leaf random, so that no transpose or copy mistake can hide behind ones/zeros."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.fixture(scope='module')
def tiny_fresh():
    """A freshly initialised tiny CRATE-MAE (unequal encoder/decoder depths) and its config."""
    cfg = _model_config('crate_mae_test', decoder_depth=3)
    return cfg, _init(cfg)


@pytest.fixture(scope='module')
def tiny(tiny_fresh):
    cfg, params = tiny_fresh
    return cfg, _randomized(params)


def _spec_table(d, depth, dec_depth, p=16, c=3, n=197):
    """{torch key: shape} of the reference MAE_CRATE state dict, docs/model.md §2.10."""
    t = {
        'patch_embed.proj.weight': (d, c, p, p),
        'patch_embed.proj.bias': (d,),
        'cls_token': (1, 1, d),
        'mask_token': (1, 1, d),
        'pos_embed': (1, n, d),
        'decoder_pos_embed': (1, n, d),
        'norm.weight': (d,),
        'norm.bias': (d,),
        'decoder_embed.weight': (d, d),
        'decoder_embed.bias': (d,),
        'decoder_norm.weight': (d,),
        'decoder_norm.bias': (d,),
        'decoder_pred.weight': (p * p * c, d),
        'decoder_pred.bias': (p * p * c,),
    }
    for i in range(depth):
        b = f'blocks.{i}.layers.0.'
        t.update(
            {
                b + '0.norm.weight': (d,),
                b + '0.norm.bias': (d,),
                b + '0.fn.qkv.weight': (d, d),
                b + '0.fn.to_out.0.weight': (d, d),
                b + '0.fn.to_out.0.bias': (d,),
                b + '1.norm.weight': (d,),
                b + '1.norm.bias': (d,),
                b + '1.fn.weight': (d, d),
            }
        )
    for i in range(dec_depth):
        b = f'decoder_blocks.{i}.layers.0.'
        t.update(
            {
                b + '0.norm.weight': (d,),
                b + '0.norm.bias': (d,),
                b + '0.fn.weight': (d, d),
                b + '1.norm.weight': (d,),
                b + '1.norm.bias': (d,),
                b + '1.fn.qkv.weight': (d, d),
                b + '1.fn.to_out.0.weight': (d, d),
                b + '1.fn.to_out.0.bias': (d,),
            }
        )
    return t


# ----------------------------------------------------------------------------------------------------------------
# Layout.


@pytest.mark.parametrize(
    'name,d,depth,total',
    [
        ('crate_mae_tiny', 384, 12, 11_555_328),
        ('crate_mae_small', 576, 12, 25_405_824),
        ('crate_mae_base', 768, 12, 44_638_464),
        ('crate_mae_large', 1024, 24, 154_274_560),
    ],
)
def test_keys_and_shapes_equal_the_reference(name, d, depth, total):
    cfg = _model_config(name)
    sd = export.to_reference_state_dict(_init(cfg, abstract=True), cfg)
    expected = _spec_table(d, depth, depth)
    assert {k: v.shape for k, v in sd.items()} == expected
    assert len(sd) == 14 + 16 * depth
    assert sum(int(np.prod(s)) for s in expected.values()) == total  # docs/model.md §1 "All params"
    assert sum(v.size for v in sd.values()) == total
    assert all(v.dtype == np.float32 for v in sd.values())
    assert export.reference_shapes(cfg) == expected


def test_key_order_follows_the_reference_state_dict():
    cfg = _model_config('crate_mae_base')
    keys = list(export.reference_shapes(cfg))
    assert keys[:8] == [
        'cls_token',
        'pos_embed',
        'mask_token',
        'decoder_pos_embed',
        'patch_embed.proj.weight',
        'patch_embed.proj.bias',
        'blocks.0.layers.0.0.norm.weight',
        'blocks.0.layers.0.0.norm.bias',
    ]
    assert keys[-2:] == ['decoder_pred.weight', 'decoder_pred.bias']


def test_encoder_only_keys():
    cfg = _model_config('crate_mae_base')
    sd = export.to_reference_state_dict(_init(cfg, abstract=True), cfg, encoder_only=True)
    full = _spec_table(768, 12, 12)
    expected = {
        k: s for k, s in full.items() if not k.startswith(('decoder', 'decoder_blocks.')) and k != 'decoder_pos_embed'
    }
    assert {k: v.shape for k, v in sd.items()} == expected
    assert 'mask_token' in sd and 'pos_embed' in sd and 'norm.weight' in sd


def test_tensor_layouts(tiny):
    cfg, p = tiny
    sd = export.to_reference_state_dict(p, cfg)
    np.testing.assert_array_equal(sd['patch_embed.proj.weight'], p['patch_embed']['kernel'].transpose(3, 2, 0, 1))
    enc, dec = p['encoder']['layers'], p['decoder']['layers']
    np.testing.assert_array_equal(sd['blocks.1.layers.0.0.fn.qkv.weight'], enc['mssa']['qkv']['kernel'][1].T)
    np.testing.assert_array_equal(sd['blocks.1.layers.0.0.fn.to_out.0.weight'], enc['mssa']['out']['kernel'][1].T)
    np.testing.assert_array_equal(sd['blocks.1.layers.0.1.norm.weight'], enc['norm2']['scale'][1])
    np.testing.assert_array_equal(sd['blocks.0.layers.0.1.fn.weight'], enc['ista']['dictionary'][0])  # D as is
    np.testing.assert_array_equal(sd['decoder_blocks.2.layers.0.0.fn.weight'], dec['unsparsify']['kernel'][2].T)
    np.testing.assert_array_equal(sd['decoder_blocks.2.layers.0.1.fn.to_out.0.bias'], dec['mssa']['out']['bias'][2])
    np.testing.assert_array_equal(sd['decoder_pred.weight'], p['decoder_pred']['kernel'].T)
    np.testing.assert_array_equal(sd['norm.bias'], p['encoder_norm']['bias'])
    table = ops.sincos_pos_embed(cfg.width, cfg.image_size // cfg.patch_size)[None]
    np.testing.assert_array_equal(sd['pos_embed'], table)
    np.testing.assert_array_equal(sd['decoder_pos_embed'], table)
    assert not sd['decoder_embed.weight'].any() and not sd['decoder_embed.bias'].any()
    assert all(v.flags.c_contiguous for v in sd.values())


def test_unsupported_architectures_are_refused():
    for name in ('fair_mae_base', 'mae_vit_base'):
        cfg = _model_config(name)
        with pytest.raises(ValueError, match='No reference state-dict layout'):
            export.to_reference_state_dict(_init(cfg, abstract=True), cfg)
        with pytest.raises(ValueError, match='No reference state-dict layout'):
            export.from_reference_state_dict({}, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Round trips.


def _assert_trees_equal(a, b, dtype=np.float32):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert y.dtype == dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), y)


def test_state_dict_round_trip_is_exact(tiny):
    cfg, p = tiny
    sd = export.to_reference_state_dict({'params': p}, cfg)
    _assert_trees_equal(p, export.from_reference_state_dict(sd, cfg))
    wrapped = {'model': {'module.' + k: v for k, v in sd.items()}, 'epoch': 7}  # DDP + MAE checkpoint wrapper
    _assert_trees_equal(p, export.from_reference_state_dict(wrapped, cfg))


def test_round_trip_of_a_fresh_init_is_exact(tiny_fresh):
    cfg, params = tiny_fresh  # jax arrays straight from model.init
    back = export.from_reference_state_dict(export.to_reference_state_dict(params, cfg), cfg)
    _assert_trees_equal(params, back)


def test_encoder_only_round_trip(tiny):
    cfg, p = tiny
    full = export.to_reference_state_dict(p, cfg)
    enc = export.from_reference_state_dict(full, cfg, encoder_only=True)  # decoder tensors are ignored
    assert set(enc) == {'patch_embed', 'cls_token', 'mask_token', 'encoder', 'encoder_norm'}
    _assert_trees_equal({k: p[k] for k in enc}, enc)
    enc_sd = export.to_reference_state_dict(p, cfg, encoder_only=True)
    _assert_trees_equal(enc, export.from_reference_state_dict(enc_sd, cfg, encoder_only=True))
    with pytest.raises(ValueError, match=r'Missing keys \(\d+\): decoder_pos_embed, decoder_embed.weight'):
        export.from_reference_state_dict(enc_sd, cfg)


def test_bfloat16_export_and_import(tiny):
    cfg, p = tiny
    sd = export.to_reference_state_dict(p, cfg, dtype='bfloat16')
    assert {v.dtype for v in sd.values()} == {BF16}
    back = export.from_reference_state_dict(sd, cfg, dtype=None)
    _assert_trees_equal(jax.tree.map(lambda x: np.asarray(x).astype(BF16), p), back, dtype=BF16)


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_file_round_trip(tmp_path, tiny, suffix, dtype):
    cfg, p = tiny
    sd = export.to_reference_state_dict(p, cfg, dtype=dtype)
    path = tmp_path / f'crate{suffix}'
    save = export.save_safetensors if suffix == '.safetensors' else export.save_npz
    meta = export.make_metadata(cfg, step=123)
    save(path, sd, meta)
    save(path, sd, meta)  # overwriting is fine
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    loaded, loaded_meta = export.load_state_dict(path)
    assert loaded_meta == meta and loaded_meta['step'] == '123'
    assert list(loaded) == list(sd) or set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == np.dtype(BF16 if dtype == 'bfloat16' else np.float32), k
        assert loaded[k].dtype.kind != 'V' or loaded[k].dtype == BF16
        np.testing.assert_array_equal(loaded[k], v)
    rebuilt = export.model_config_from_metadata(loaded_meta)
    assert rebuilt.to_dict() == cfg.to_dict()
    assert jax.tree.map(np.shape, _init(rebuilt, abstract=True)) == jax.tree.map(np.shape, p)
    back = export.from_reference_state_dict(loaded, rebuilt, dtype=None)
    _assert_trees_equal(
        jax.tree.map(lambda x: np.asarray(x).astype(loaded['cls_token'].dtype), p),
        back,
        dtype=loaded['cls_token'].dtype,
    )


def test_metadata_must_be_strings(tmp_path, tiny):
    cfg, p = tiny
    with pytest.raises(TypeError, match='step'):
        export.save_safetensors(tmp_path / 'x.safetensors', export.to_reference_state_dict(p, cfg), {'step': 1})


# ----------------------------------------------------------------------------------------------------------------
# Errors.


def test_wrong_architecture_errors_name_keys_and_shapes(tiny):
    cfg, p = tiny
    sd = export.to_reference_state_dict(p, cfg)
    fewer_layers = _model_config('crate_mae_test', decoder_depth=2)
    with pytest.raises(
        ValueError,
        match=r'Unexpected keys \(8\): decoder_blocks\.2\.layers\.0\.0\.norm\.weight'
        r'.*3 decoder blocks',
    ):
        export.from_reference_state_dict(sd, fewer_layers)
    wider = _model_config('crate_mae_test', width=64, decoder_width=64, decoder_depth=3)
    with pytest.raises(ValueError, match=r'Mismatched shapes .*cls_token \(expected \(1, 1, 64\), got \(1, 1, 32\)\)'):
        export.from_reference_state_dict(sd, wider)
    broken = dict(sd)
    del broken['blocks.1.layers.0.1.fn.weight']
    broken['blocks.0.attn.qkv.weight'] = np.zeros((96, 32), np.float32)  # a timm ViT block key
    with pytest.raises(ValueError) as err:
        export.from_reference_state_dict(broken, cfg)
    msg = str(err.value)
    assert 'Missing keys (1): blocks.1.layers.0.1.fn.weight' in msg
    assert 'Unexpected keys (1): blocks.0.attn.qkv.weight' in msg and 'timm ViT' in msg


def test_params_that_do_not_fit_the_config_are_refused(tiny):
    cfg, p = tiny
    with pytest.raises(ValueError, match='expects 4 stacked decoder layers'):
        export.to_reference_state_dict(p, _model_config('crate_mae_test', decoder_depth=4))
    with pytest.raises(ValueError, match='expects'):
        export.to_reference_state_dict(p, _model_config('crate_mae_test', width=64, decoder_width=64))


def test_modified_pos_embed_warns_and_is_ignored(tiny):
    cfg, p = tiny
    sd = export.to_reference_state_dict(p, cfg)
    sd['decoder_pos_embed'] = sd['decoder_pos_embed'] + 1.0
    with pytest.warns(UserWarning, match='decoder_pos_embed differs'):
        back = export.from_reference_state_dict(sd, cfg)
    _assert_trees_equal(p, back)


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
def test_truncated_and_missing_files(tmp_path, tiny, suffix):
    cfg, p = tiny
    path = tmp_path / f'ckpt{suffix}'
    save = export.save_safetensors if suffix == '.safetensors' else export.save_npz
    save(path, export.to_reference_state_dict(p, cfg), export.make_metadata(cfg))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f'{path}.*truncated or corrupt'):
        export.load_state_dict(path)
    with pytest.raises(FileNotFoundError, match='nothing'):
        export.load_state_dict(tmp_path / f'nothing{suffix}')


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ValueError, match='Unsupported checkpoint file type'):
        export.load_state_dict(tmp_path / 'ckpt.h5')


def test_a_visible_only_encoder_exports_its_encoder_alone():
    # The default job's forward (FAIR's: the encoder sees the visible patches only) keeps the reference's encoder
    # tensors but adds a decoder_embed the reference lacks: the full export is refused with the way out named, the
    # encoder export round-trips exactly and the encoder computes the same features from it.
    cfg = _model_config('crate_mae_test', encoder_sees_mask_tokens=False)
    p = _randomized(_init(cfg))
    assert 'decoder_embed' in p
    with pytest.raises(ValueError, match='--encoder_only.*--format=orbax'):
        export.to_reference_state_dict(p, cfg)
    with pytest.raises(ValueError, match='--encoder_only'):
        export.from_reference_state_dict({}, cfg)
    enc_sd = export.to_reference_state_dict(p, cfg, encoder_only=True)
    assert set(enc_sd) == set(export.reference_shapes(_model_config('crate_mae_test'), encoder_only=True))
    enc = export.from_reference_state_dict(enc_sd, cfg, encoder_only=True)
    _assert_trees_equal({k: p[k] for k in enc}, enc)
    model = models.build(cfg)
    images = jnp.asarray(
        np.random.default_rng(0).random((2, cfg.image_size, cfg.image_size, cfg.channels)), jnp.float32
    )
    want = model.apply({'params': p}, images, method=model.encode)
    got = model.apply({'params': {**p, **enc}}, images, method=model.encode)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
