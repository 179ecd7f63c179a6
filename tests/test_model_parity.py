"""Forward parity of cratemae.models against the independent float64 NumPy reference.

Flax params are converted to the reference torch state-dict layout by a mapping written here from the contract's
parameter table and docs/model.md §2.10 (deliberately independent of cratemae/export.py). Parameters are randomised away
from their init (LayerNorm scales != 1, biases != 0, large cls/mask tokens) so that every tensor matters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cratemae.models
import experiments

try:
    import numpy_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import numpy_reference as ref

RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Flax -> torch layout (docs/model.md §2.10, contract "Flax parameter tree").

_CRATE_ENC = {  # flax path under encoder/layers -> (torch suffix under blocks.i., transpose?)
    ('norm1', 'scale'): ('layers.0.0.norm.weight', False),
    ('norm1', 'bias'): ('layers.0.0.norm.bias', False),
    ('mssa', 'qkv', 'kernel'): ('layers.0.0.fn.qkv.weight', True),
    ('mssa', 'out', 'kernel'): ('layers.0.0.fn.to_out.0.weight', True),
    ('mssa', 'out', 'bias'): ('layers.0.0.fn.to_out.0.bias', False),
    ('norm2', 'scale'): ('layers.0.1.norm.weight', False),
    ('norm2', 'bias'): ('layers.0.1.norm.bias', False),
    ('ista', 'dictionary'): ('layers.0.1.fn.weight', False),  # D is stored untransposed
}
_CRATE_DEC = {
    ('norm1', 'scale'): ('layers.0.0.norm.weight', False),
    ('norm1', 'bias'): ('layers.0.0.norm.bias', False),
    ('unsparsify', 'kernel'): ('layers.0.0.fn.weight', True),
    ('norm2', 'scale'): ('layers.0.1.norm.weight', False),
    ('norm2', 'bias'): ('layers.0.1.norm.bias', False),
    ('mssa', 'qkv', 'kernel'): ('layers.0.1.fn.qkv.weight', True),
    ('mssa', 'out', 'kernel'): ('layers.0.1.fn.to_out.0.weight', True),
    ('mssa', 'out', 'bias'): ('layers.0.1.fn.to_out.0.bias', False),
}
_VIT = {  # timm Block names
    ('norm1', 'scale'): ('norm1.weight', False),
    ('norm1', 'bias'): ('norm1.bias', False),
    ('qkv', 'kernel'): ('attn.qkv.weight', True),
    ('qkv', 'bias'): ('attn.qkv.bias', False),
    ('proj', 'kernel'): ('attn.proj.weight', True),
    ('proj', 'bias'): ('attn.proj.bias', False),
    ('norm2', 'scale'): ('norm2.weight', False),
    ('norm2', 'bias'): ('norm2.bias', False),
    ('fc1', 'kernel'): ('mlp.fc1.weight', True),
    ('fc1', 'bias'): ('mlp.fc1.bias', False),
    ('fc2', 'kernel'): ('mlp.fc2.weight', True),
    ('fc2', 'bias'): ('mlp.fc2.bias', False),
}


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, 'items'):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v, np.float64)
    return out


def to_torch_layout(params, cfg):
    """Flax params -> {torch name: float64 array}; every Flax leaf must be consumed exactly once."""
    flat = _flat(params)
    sd = {}

    def take(path):
        return flat.pop(path)

    sd['patch_embed.proj.weight'] = take(('patch_embed', 'kernel')).transpose(3, 2, 0, 1)  # (p,p,C,d)->(d,C,p,p)
    sd['patch_embed.proj.bias'] = take(('patch_embed', 'bias'))
    sd['cls_token'] = take(('cls_token',))
    sd['mask_token'] = take(('mask_token',))
    sd['norm.weight'] = take(('encoder_norm', 'scale'))
    sd['norm.bias'] = take(('encoder_norm', 'bias'))
    sd['decoder_norm.weight'] = take(('decoder_norm', 'scale'))
    sd['decoder_norm.bias'] = take(('decoder_norm', 'bias'))
    sd['decoder_pred.weight'] = take(('decoder_pred', 'kernel')).T
    sd['decoder_pred.bias'] = take(('decoder_pred', 'bias'))
    if not cfg.encoder_sees_mask_tokens:
        sd['decoder_embed.weight'] = take(('decoder_embed', 'kernel')).T
        sd['decoder_embed.bias'] = take(('decoder_embed', 'bias'))
    for part, torch_prefix, depth, kind, table in (
        ('encoder', 'blocks', cfg.depth, cfg.encoder_block, _CRATE_ENC),
        ('decoder', 'decoder_blocks', cfg.decoder_depth, cfg.decoder_block, _CRATE_DEC),
    ):
        table = _VIT if kind == 'vit' else table
        for fpath, (tname, transpose) in table.items():
            key = (part, 'layers') + fpath
            if key not in flat:
                assert fpath == ('qkv', 'bias') and not cfg.qkv_bias, key
                continue
            stacked = take(key)
            assert stacked.shape[0] == depth, (key, stacked.shape)
            for i in range(depth):
                w = stacked[i]
                sd['%s.%d.%s' % (torch_prefix, i, tname)] = w.T if transpose else w
    assert not flat, 'unmapped Flax params: %s' % sorted(flat)
    return sd


def random_params(shapes, seed):
    """Random values for every leaf of the (eval_shape) param tree; no model.init (slow op-by-op on CPU).

    LN scale 1 + 0.2 N, biases 0.1 N, cls/mask tokens 0.5 N, kernels and dictionaries N / sqrt(fan_in).
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def new(path, leaf):
        names = [str(getattr(k, 'key', '')) for k in path]
        shape = leaf.shape
        if names[-1] == 'scale':
            v = 1 + 0.2 * rng.normal(size=shape)
        elif names[-1] == 'bias':
            v = 0.1 * rng.normal(size=shape)
        elif names[-1] in ('cls_token', 'mask_token'):
            v = 0.5 * rng.normal(size=shape)
        else:
            fan_in = int(np.prod(shape[:3])) if 'patch_embed' in names else shape[-2]
            v = rng.normal(size=shape) / np.sqrt(fan_in)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_unflatten(treedef, [new(p, l) for p, l in leaves])


def shrink_stream(params, factor=1e-3):
    """Scales every param by factor except the kernels that read a normalised input (qkv, fc1, D, A, heads).

    With images scaled too, every LayerNorm input then has variance ~1e-6, comparable to eps, so a wrong eps
    (1e-5 vs 1e-6) changes the outputs by O(1) instead of O(1e-6).
    """
    keep = {'qkv', 'fc1', 'ista', 'unsparsify', 'decoder_pred', 'decoder_embed'}

    def scale(path, x):
        names = {str(getattr(k, 'key', '')) for k in path}
        last = str(getattr(path[-1], 'key', ''))
        return x if last in ('kernel', 'dictionary') and keep & names else x * factor

    return jax.tree_util.tree_map_with_path(scale, params)


def small_config(**overrides):
    cfg = experiments.get_config('crate_mae_base').model
    cfg.unlock()
    # The reference path (three-matmul ISTA) unless a test asks for an option; the platform's choice is not tested here.
    base = dict(
        image_size=32,
        patch_size=8,
        width=64,
        heads=4,
        depth=2,
        decoder_width=64,
        decoder_heads=4,
        decoder_depth=2,
        fused_ista=False,
    )
    base.update(overrides)
    cfg.update(base)
    cfg.lock()
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Running both implementations.

_CACHE = {}


def _setup(cfg, batch=2, seed=0, variant=None):
    key = (cfg.to_json(), batch, seed, variant)
    if key not in _CACHE:
        model = cratemae.models.build(cfg)
        rng = np.random.default_rng(seed)
        images = rng.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
        shapes = jax.eval_shape(
            lambda: model.init(
                {'params': jax.random.key(seed), 'masking': jax.random.key(seed + 1)}, jnp.asarray(images)
            )
        )
        params = random_params(shapes['params'], seed + 2)
        if variant == 'small_stream':
            params, images = shrink_stream(params), images * 1e-3
        elif variant == 'offset':
            params = dict(params, patch_embed=dict(params['patch_embed'], bias=params['patch_embed']['bias'] + 300.0))
        sd = to_torch_layout(jax.device_get(params), cfg)
        _CACHE[key] = (model, {'params': params}, images, sd)
    return _CACHE[key]


def _noise(cfg, batch, seed=10):
    length = (cfg.image_size // cfg.patch_size) ** 2
    return np.random.default_rng(seed).random((batch, length)).astype(np.float32)


def _check_latent(got, want, ids_keep, visible_only, rtol=RTOL):
    """Latent check. The visible-only latent may list the visible tokens in noise order (FAIR) or sorted."""
    if not visible_only:
        ref.assert_close(got, want, rtol, 'latent')
        return
    try:
        ref.assert_close(got, want, rtol, 'latent (noise order)')
    except AssertionError:
        order = np.argsort(ids_keep, axis=1)
        sorted_want = np.concatenate([want[:, :1], np.take_along_axis(want[:, 1:], order[:, :, None], axis=1)], axis=1)
        ref.assert_close(got, sorted_want, rtol, 'latent (patch order)')


def run_and_compare(cfg, mask_ratio, batch=2, seed=0, rtol=RTOL, intermediates=False, variant=None):
    model, variables, images, sd = _setup(cfg, batch, seed, variant)
    noise = _noise(cfg, batch)
    want = ref.forward(sd, images, noise, mask_ratio, cfg)
    fn = jax.jit(
        lambda v, x, n: model.apply(v, x, noise=n, mask_ratio=mask_ratio, train=True, mutable=['intermediates'])
    )
    out, state = fn(variables, jnp.asarray(images), jnp.asarray(noise))
    np.testing.assert_array_equal(np.asarray(out['mask']), want['mask'])
    assert float(out['loss']) == pytest.approx(want['loss'], rel=rtol)
    ref.assert_close(out['pred'], want['pred'], rtol, 'pred')
    _check_latent(np.asarray(out['latent']), want['latent'], want['ids_keep'], not cfg.encoder_sees_mask_tokens, rtol)
    if intermediates:
        _compare_intermediates(state['intermediates'], want, rtol)
    return out, want


def _find(tree, *names):
    """The sown value at the first path whose keys end with names (sow stores a 1-tuple)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [getattr(k, 'key', None) for k in path]
        keys = [k for k in keys if k is not None]
        if keys[-len(names) :] == list(names):
            return np.asarray(leaf)
    return None


def _compare_intermediates(inter, want, rtol):
    enc = want['encoder']
    checks = [
        (('encoder', 'attention'), 'attention', enc),
        (('encoder', 'mssa_out'), 'mssa_out', enc),
        (('encoder', 'ista_out'), 'ista_out', enc),
    ]
    for names, rkey, layers in checks:
        got = _find(inter.get(names[0], {}), names[1])
        assert got is not None, 'missing intermediate %s' % (names,)
        ref.assert_close(got, np.stack([l[rkey] for l in layers]), rtol, '/'.join(names))
    proj = _find(inter.get('encoder', {}), 'qkv')
    if proj is None:  # the model names the shared projection 'projection' (contract says 'qkv')
        proj = _find(inter.get('encoder', {}), 'mssa', 'projection')
    assert proj is not None, 'missing shared-projection intermediate'
    ref.assert_close(proj, np.stack([l['qkv'] for l in enc]), rtol, 'encoder qkv projection')
    tokens = _find(inter.get('decoder', {}), 'tokens')
    assert tokens is not None, 'missing decoder tokens'
    ref.assert_close(tokens, np.stack(want['decoder']), rtol, 'decoder tokens')


# ----------------------------------------------------------------------------------------------------------------
# Tests.


def test_layout_mapping_covers_every_param():
    cfg = small_config()
    _, variables, _, sd = _setup(cfg)
    shapes = ref.reference_param_shapes(cfg)
    missing = set(shapes) - set(sd)
    assert missing == {'pos_embed', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias'}
    for k, v in sd.items():
        assert v.shape == shapes[k], k


# Each case costs one XLA compile (~2-3 s on 2 cores), so the grid is sparse: every option is covered once.
@pytest.mark.parametrize('mask_ratio,norm_pix', [(0.75, False), (0.9, True)])
def test_crate_mae_parity(mask_ratio, norm_pix):
    """image 32, patch 8 (L = 16), width 64, 4 heads (h = 16), depth 2 / 2; also every sown intermediate."""
    cfg = small_config(norm_pix_loss=norm_pix)
    run_and_compare(cfg, mask_ratio, intermediates=True)


def test_crate_mae_parity_other_heads():
    """patch 4 (L = 64), width 96; encoder 6 heads (h = 16), decoder 2 heads (h = 48), depth 3 / 2, batch 3."""
    cfg = small_config(
        patch_size=4, width=96, heads=6, depth=3, decoder_width=96, decoder_heads=2, decoder_depth=2, norm_pix_loss=True
    )
    run_and_compare(cfg, 0.75, batch=3)


_CRATE_EPS = dict(ista_lambda=0.0)  # lambda = 0 so that ISTA of a tiny V is not all zero
_VIT_EPS = dict(encoder_block='vit', decoder_block='vit', decoder_depth=1, decoder_heads=8, block_norm_eps=1e-6)


@pytest.mark.parametrize('overrides', [_CRATE_EPS, _VIT_EPS], ids=['crate', 'vit'])
def test_layer_norm_eps_at_small_activation_scale(overrides):
    """Activations ~1e-3 so the block (1e-5 crate / 1e-6 timm) and final (1e-6) LayerNorm eps both matter."""
    cfg = small_config(**overrides)
    out, want = run_and_compare(cfg, 0.75, variant='small_stream')
    _, _, images, sd = _setup(cfg, variant='small_stream')
    for key in ('block_norm_eps', 'final_norm_eps'):  # the check is sensitive to either eps
        wrong = small_config(**dict(overrides, **{key: 1e-5 if cfg[key] == 1e-6 else 1e-6}))
        moved = ref.forward(sd, images, _noise(cfg, 2), 0.75, wrong)['pred']
        assert np.abs(moved - want['pred']).max() > 1e-4 * np.abs(want['pred']).max(), key


@pytest.mark.parametrize('overrides', [{}, _VIT_EPS], ids=['crate', 'vit'])
def test_layer_norm_two_pass_variance(overrides):
    """Tokens with a channel mean of ~300 and std ~1.

    In float32, E[x^2] - E[x]^2 then errs by ~3 % in the variance, the two-pass form by ~1e-7. The embedding
    itself carries float32 rounding of ~300 * 6e-8 = 2e-5 relative to the std, hence rtol 2e-4 here.
    """
    run_and_compare(small_config(**overrides), 0.75, rtol=2e-4, variant='offset')


@pytest.mark.parametrize(
    'option',
    [
        dict(attention='dot_product_attention', remat='full', scan_unroll=2),
        dict(fused_ista=True, remat='dots_saveable'),
    ],
)
def test_crate_mae_parity_implementation_options(option):
    cfg = small_config(**option)
    run_and_compare(cfg, 0.75, rtol=3e-5 if option.get('fused_ista') else RTOL)


def test_encode_matches_reference_without_masking():
    cfg = small_config()
    model, variables, images, sd = _setup(cfg)
    got = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, jnp.asarray(images))
    want = ref.encode(sd, images, cfg)
    ref.assert_close(got, want, RTOL, 'encode')
    # r = 0 in the reference forward: every patch kept, so no mask token enters and the latent is the same.
    fwd = ref.forward(sd, images, _noise(cfg, images.shape[0]), 0.0, cfg)
    assert fwd['mask'].sum() == 0
    ref.assert_close(fwd['latent'], want, 1e-12, 'reference r=0 vs encode')


def test_mask_token_and_cls_matter():
    """Sanity of the test itself: the reference output moves when the mask token or the class token moves."""
    cfg = small_config()
    _, _, images, sd = _setup(cfg)
    noise = _noise(cfg, images.shape[0])
    base = ref.forward(sd, images, noise, 0.75, cfg)['loss']
    rng = np.random.default_rng(5)
    for key in ('mask_token', 'cls_token'):
        sd2 = dict(sd)
        sd2[key] = sd[key] + 0.1 * rng.normal(size=sd[key].shape)  # not a constant: LN would remove it
        assert abs(ref.forward(sd2, images, noise, 0.75, cfg)['loss'] - base) > 1e-6 * abs(base)


def test_mae_vit_parity():
    """'mae_vit_base' style: timm ViT blocks in the CRATE-MAE forward (mask tokens in the encoder)."""
    cfg = small_config(
        encoder_block='vit',
        decoder_block='vit',
        decoder_depth=1,
        decoder_heads=8,
        block_norm_eps=1e-6,
        qkv_bias=False,
        norm_pix_loss=True,
    )
    run_and_compare(cfg, 0.9)


def test_fair_mae_parity():
    """'fair_mae_base' style: visible-only ViT encoder, decoder_embed to a narrower decoder, qkv bias on."""
    cfg = small_config(
        encoder_block='vit',
        decoder_block='vit',
        decoder_width=32,
        decoder_heads=4,
        decoder_depth=1,
        block_norm_eps=1e-6,
        qkv_bias=True,
        encoder_sees_mask_tokens=False,
        norm_pix_loss=True,
    )
    run_and_compare(cfg, 0.75)


def test_crate_visible_only_parity():
    """CRATE blocks with the FAIR-style visible-only encoder (the ablation)."""
    cfg = small_config(encoder_sees_mask_tokens=False, decoder_width=48, decoder_heads=3)
    run_and_compare(cfg, 0.75)


def test_encode_vit_and_visible_only():
    for cfg in (
        small_config(encoder_block='vit', decoder_block='vit', block_norm_eps=1e-6),
        small_config(
            encoder_block='vit',
            decoder_block='vit',
            decoder_width=32,
            block_norm_eps=1e-6,
            qkv_bias=True,
            encoder_sees_mask_tokens=False,
        ),
    ):
        model, variables, images, sd = _setup(cfg)
        got = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, jnp.asarray(images))
        ref.assert_close(got, ref.encode(sd, images, cfg), RTOL, 'encode %s' % cfg.encoder_sees_mask_tokens)


@pytest.mark.slow  # a full-size CRATE-MAE-Small in float64 and in Flax
def test_crate_mae_small_full_size():
    """The registry's CRATE-MAE-Small at 224 px (197 tokens, h = 48), batch 1, once: about 10 s on 2 CPU cores."""
    run_and_compare(experiments.get_config('crate_mae_small').model, 0.75, batch=1)
