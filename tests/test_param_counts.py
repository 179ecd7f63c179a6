"""Parameter counts (docs/model.md §1), the Flax tree's shapes against the torch layout, and initialisers (docs/model.md §2.9)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cratemae.models
import experiments

try:
    import numpy_reference as ref
    from test_model_parity import small_config
    from test_model_parity import to_torch_layout
except ImportError:  # tests/ imported as a package
    from tests import numpy_reference as ref
    from tests.test_model_parity import small_config
    from tests.test_model_parity import to_torch_layout

# name -> (all params incl. frozen pos-embs and unused decoder_embed, trainable params used by the forward)
SPEC_COUNTS = {
    'crate_mae_tiny': (11_555_328, 11_555_328 - 151_296 - 147_840),
    'crate_mae_small': (25_405_824, 24_846_528),
    'crate_mae_base': (44_638_464, 43_745_280),
    'crate_mae_large': (154_274_560, 154_274_560 - 403_456 - 1_049_600),
    'mae_vit_base': (143_790_336, 143_790_336 - 302_592 - 590_592),
    'fair_mae_base': (111_907_840, 111_655_680),  # decoder_embed is used here; only pos-embs are frozen
}


def _param_shapes(cfg):
    model = cratemae.models.build(cfg)
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'masking': jax.random.key(1)}, images))[
        'params'
    ]


@pytest.mark.parametrize('name', sorted(SPEC_COUNTS))
def test_count_params_matches_spec(name):
    cfg = experiments.get_config(name).model
    total, used = SPEC_COUNTS[name]
    assert cratemae.models.count_params(cfg) == total
    assert cratemae.models.count_params(cfg, include_unused=False) == used
    assert ref.reference_param_count(cfg) == total  # independent count from the torch state-dict shapes


@pytest.mark.parametrize('name', sorted(SPEC_COUNTS))
def test_flax_tree_size_and_torch_shapes(name):
    """The Flax tree (eval_shape, nothing allocated) holds exactly the used trainables, leaf by leaf."""
    cfg = experiments.get_config(name).model
    shapes = _param_shapes(cfg)
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == SPEC_COUNTS[name][1]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
    # Zero-stride views: the layout mapping runs without allocating the model.
    views = jax.tree_util.tree_map(lambda x: np.broadcast_to(np.float64(0), x.shape), shapes)
    got = {k: v.shape for k, v in to_torch_layout(views, cfg).items()}
    want = ref.reference_param_shapes(cfg)
    unstored = {'pos_embed', 'decoder_pos_embed'}
    if cfg.encoder_sees_mask_tokens:
        unstored |= {'decoder_embed.weight', 'decoder_embed.bias'}
    assert set(got) == set(want) - unstored
    for k, shape in got.items():
        assert shape == tuple(want[k]), k


def test_registry_block_types():
    """Spec §1 / §3 item 8: the baselines' block types, widths and qkv bias."""
    vit = experiments.get_config('mae_vit_base').model
    assert (vit.encoder_block, vit.decoder_block, vit.encoder_sees_mask_tokens, vit.qkv_bias) == (
        'vit',
        'vit',
        True,
        False,
    )
    assert (vit.decoder_depth, vit.decoder_width, vit.decoder_heads) == (8, 768, 16)
    fair = experiments.get_config('fair_mae_base').model
    assert (fair.encoder_sees_mask_tokens, fair.qkv_bias, fair.decoder_width, fair.decoder_depth) == (
        False,
        True,
        512,
        8,
    )
    for name in ('crate_mae_small', 'crate_mae_base'):
        c = experiments.get_config(name).model
        assert (c.block_norm_eps, c.final_norm_eps, c.ista_step, c.ista_lambda) == (1e-5, 1e-6, 0.1, 0.5)
        assert (c.image_size, c.patch_size, c.mask_ratio) == (224, 16, 0.75)


# ----------------------------------------------------------------------------------------------------------------
# Initialisers (docs/model.md §2.9) on a width-768 model with two layers each (one jit-compiled init).


@pytest.fixture(scope='module')
def init_params():
    cfg = small_config(
        width=768, heads=12, decoder_width=768, decoder_heads=12, patch_size=16, depth=2, decoder_depth=2
    )
    model = cratemae.models.build(cfg)
    images = jnp.zeros((1, 32, 32, 3), jnp.float32)
    init = jax.jit(lambda: model.init({'params': jax.random.key(0), 'masking': jax.random.key(1)}, images))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(init()['params']))


def _check_uniform(w, bound, name):
    """U(-bound, bound): max |w| at the bound, mean 0 and std bound/sqrt(3) within 5 standard errors."""
    w = np.asarray(w, np.float64).ravel()
    n, std = w.size, bound / math.sqrt(3)
    assert np.abs(w).max() <= bound * (1 + 1e-6), name
    assert np.abs(w).max() > 0.98 * bound, name  # uniform, not a narrower distribution
    assert abs(w.mean()) < 5 * std / math.sqrt(n), name
    assert w.std() == pytest.approx(std, rel=5 * 0.45 / math.sqrt(n)), name  # se(std)/std = sqrt(0.8/4n)


def test_init_uniform_bounds(init_params):
    p, d = init_params, 768
    kaiming = math.sqrt(6 / d)  # D and A: kaiming_uniform(a=0), U(+-sqrt(6/d)), std sqrt(2/d)
    xavier = math.sqrt(6 / (d + d))  # every d x d Linear, and decoder_pred (768 -> 768)
    for layer in range(2):
        _check_uniform(p['encoder']['layers']['ista']['dictionary'][layer], kaiming, 'D')
        _check_uniform(p['decoder']['layers']['unsparsify']['kernel'][layer], kaiming, 'A')
        for part in ('encoder', 'decoder'):
            _check_uniform(p[part]['layers']['mssa']['qkv']['kernel'][layer], xavier, part + ' qkv')
            _check_uniform(p[part]['layers']['mssa']['out']['kernel'][layer], xavier, part + ' out')
    _check_uniform(p['decoder_pred']['kernel'], math.sqrt(6 / (d + 768)), 'decoder_pred')
    _check_uniform(p['patch_embed']['kernel'], math.sqrt(6 / (768 + d)), 'patch_embed kernel')
    _check_uniform(p['patch_embed']['bias'], 1 / math.sqrt(16 * 16 * 3), 'patch_embed bias (Conv2d default)')


def test_init_layers_differ_and_zero_biases(init_params):
    p = init_params
    for path in (
        ('encoder', 'ista', 'dictionary'),
        ('encoder', 'mssa', 'qkv', 'kernel'),
        ('decoder', 'unsparsify', 'kernel'),
        ('decoder', 'mssa', 'out', 'kernel'),
    ):
        leaf = p[path[0]]['layers']
        for k in path[1:]:
            leaf = leaf[k]
        assert not np.allclose(leaf[0], leaf[1]), path  # the scan gives every layer its own draw
    for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(p):
        names = [str(getattr(k, 'key', '')) for k in leaf_path]
        if names[-1] == 'scale':
            assert np.all(leaf == 1), names
        elif names[-1] == 'bias' and names[0] != 'patch_embed':
            assert np.all(leaf == 0), names


def test_init_tokens(init_params):
    """cls and mask tokens: plain N(0, 0.02^2), not truncated (some entries beyond 2 sigma)."""
    for name in ('cls_token', 'mask_token'):
        t = init_params[name].astype(np.float64).ravel()
        assert t.std() == pytest.approx(0.02, rel=5 / math.sqrt(2 * t.size)), name
        assert abs(t.mean()) < 5 * 0.02 / math.sqrt(t.size), name
        assert np.abs(t).max() > 0.04, name
    assert not np.allclose(init_params['cls_token'], init_params['mask_token'])
