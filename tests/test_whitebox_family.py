"""CRATE-alpha's overcomplete sparse coding and ToST's TSSA as CRATE-MAE options, against float64 NumPy.

The reference (tests/numpy_reference.py) is written from the papers' equations in column form with explicit loops;
docs/model.md §7 says where the official code differs from the papers and which one we follow.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from cratemae import models
from cratemae import ops
from cratemae.models import layers

try:
    import numpy_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import numpy_reference as ref

OPTIONS = [(a, s) for a in models.ATTENTION_OPERATORS for s in models.SPARSE_BLOCKS]
NEW_OPTIONS = [o for o in OPTIONS if o != ('mssa', 'ista')]  # the default is covered by test_model_parity
# Each whole-model combination compiles a model twice (a few seconds each on a shared core): one stays in the fast
# suite, the others are slow.
MODEL_OPTIONS = [pytest.param(*o, marks=() if o == ('tssa', 'crate_alpha') else pytest.mark.slow) for o in OPTIONS]


def _f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


def _tokens(seed, b=2, n=17, d=24):
    return np.random.default_rng(seed).normal(size=(b, n, d))


@pytest.mark.parametrize('steps', [1, 2, 3])
def test_overcomplete_sparse_coding_matches_reference(steps):
    rng = np.random.default_rng(steps)
    x = _tokens(steps)
    d = x.shape[-1]
    dic, dec = (rng.uniform(-1, 1, size=(d, 4 * d)) * math.sqrt(6 / d) for _ in range(2))
    code = ref.overcomplete_sparse_code(x, dic, 0.1, 0.1, steps)
    assert code.shape == (2, 17, 4 * d) and 0.2 < (code == 0).mean() < 0.8  # the threshold is active
    ref.assert_close(ops.overcomplete_sparse_code(_f32(x), _f32(dic), 0.1, 0.1, steps), code, 1e-5, 'code')
    want = ref.overcomplete_sparse_coding(x, dic, dec, 0.1, 0.1, steps)
    got = ops.overcomplete_sparse_coding(_f32(x), _f32(dic), _f32(dec), 0.1, 0.1, steps)
    ref.assert_close(got, want, 1e-5, 'x_hat')
    # The decoding dictionary is its own: decoding with D instead gives another answer.
    assert np.abs(ref.overcomplete_sparse_coding(x, dic, dic, 0.1, 0.1, steps) - want).max() > 1e-2


def test_overcomplete_sparse_code_known_answer():
    """D = [I 0]: the first step is max(eta x - eta lambda, 0) on the first d atoms; the second adds eta (x - z1)."""
    x = np.array([[[0.5, 2.0, -1.0]]])
    dic = np.concatenate([np.eye(3), np.zeros((3, 9))], axis=1)
    z1 = np.maximum(0.1 * x - 0.01, 0)
    z2 = np.maximum(z1 + 0.1 * (x - z1) - 0.01, 0)
    for steps, want in ((1, z1), (2, z2)):
        got = np.asarray(ops.overcomplete_sparse_code(_f32(x), _f32(dic), 0.1, 0.1, steps))
        np.testing.assert_allclose(got[..., :3], want, atol=1e-7)
        assert np.all(got[..., 3:] == 0)


@pytest.mark.parametrize('heads', [2, 4])
def test_token_statistics_attention_and_objective_match_reference(heads):
    rng = np.random.default_rng(heads)
    w = _tokens(heads + 10)
    tau = rng.uniform(0.5, 2.0, size=heads)
    want, pi = ref.token_statistics_attention(w, tau, heads)
    got, got_pi = ops.token_statistics_attention(_f32(w), _f32(tau), heads)
    ref.assert_close(got, want, 1e-5, 'TSSA')
    ref.assert_close(got_pi, pi, 1e-5, 'membership')
    np.testing.assert_allclose(pi.sum(-1), 1.0)
    assert pi.std() > 1e-3  # the memberships are not uniform, so the head weighting is exercised
    ref.assert_close(ops.tssa_objective(_f32(w), _f32(pi), heads), ref.tssa_objective(w, pi, heads), 1e-5, 'R_var')
    d = w.shape[-1]
    u, wo = rng.normal(size=(2, d, d)) / math.sqrt(d)
    bo = 0.1 * rng.normal(size=d)
    want_full = ref.linear(ref.token_statistics_attention(ref.linear(w, u), tau, heads)[0], wo, bo)
    ref.assert_close(ops.tssa(_f32(w), _f32(u.T), _f32(tau), _f32(wo.T), _f32(bo), heads), want_full, 1e-5, 'tssa')


def test_tssa_is_n_times_the_negative_gradient_of_its_objective():
    """O = -n dR_var/dW with Pi held fixed: the derivation that makes TSSA a compression step."""
    w = _f32(_tokens(3, n=33))
    tau = _f32(np.array([1.0, 1.5, 0.7]))
    out, pi = ops.token_statistics_attention(w, tau, 3)
    grad = jax.grad(lambda v: ops.tssa_objective(v, pi, 3).sum())(w)
    ref.assert_close(out, -33 * np.asarray(grad), 1e-5, 'O vs -n grad')


@pytest.mark.parametrize('n', [17, 197])
def test_one_tssa_step_lowers_its_objective_at_initialisation(n):
    """ToST's unrolled step Z + TSSA(Z) with the output projection tied to U (the paper's form) lowers R_var at a
    fresh TSSA layer's initialisation, with Pi recomputed after the step (float64 reference measures it)."""
    rng = np.random.default_rng(n)
    y = rng.normal(size=(4, n, 64))
    y = (y - y.mean(-1, keepdims=True)) / y.std(-1, keepdims=True)
    params = layers.TSSA(4).init(jax.random.key(n), _f32(y))['params']
    kernel = np.asarray(params['qkv']['kernel'], np.float64)  # U^T
    tau = np.asarray(params['temperature'], np.float64)
    w = y @ kernel
    out, pi = ref.token_statistics_attention(w, tau, 4)
    before = ref.tssa_objective(w, pi, 4)
    stepped = y + np.asarray(ops.tssa(_f32(y), _f32(kernel), _f32(tau), _f32(kernel.T), _f32(np.zeros(64)), 4))
    w_after = stepped @ kernel
    after = ref.tssa_objective(w_after, ref.token_statistics_attention(w_after, tau, 4)[1], 4)
    assert np.all(after < before - 0.1 * np.abs(before).mean() * 0.1), (before, after)


def _config(attention_operator, sparse_block, visible_only=False):
    cfg = experiments.get_config('crate_mae_test').model
    cfg.unlock()
    cfg.update(attention_operator=attention_operator, sparse_block=sparse_block, sparse_steps=2, ista_lambda=0.1)
    if visible_only:
        cfg.update(encoder_sees_mask_tokens=False, decoder_width=24, decoder_heads=3)
    return cfg


@pytest.mark.parametrize('attention_operator,sparse_block', NEW_OPTIONS)
def test_layers_match_reference(attention_operator, sparse_block):
    cfg = _config(attention_operator, sparse_block)
    params = models.random_params(cfg, seed=1)
    kwargs = dict(
        heads=cfg.heads,
        ista_lambda=0.1,
        attention_operator=attention_operator,
        sparse_block=sparse_block,
        sparse_expansion=4,
        sparse_steps=2,
    )
    ref_cfg = dict(cfg, heads=cfg.heads, decoder_heads=cfg.decoder_heads)
    z = _tokens(7, n=17, d=cfg.width)
    for stack, layer_cls, reference in (
        ('encoder', layers.CrateEncoderLayer, ref.crate_encoder_layer_options),
        ('decoder', layers.CrateDecoderLayer, ref.crate_decoder_layer_options),
    ):
        layer0 = jax.tree.map(lambda x: x[0], params[stack]['layers'])
        got, _ = layer_cls(**kwargs).apply({'params': layer0}, _f32(z))
        ref.assert_close(got, reference(z, layer0, ref_cfg), 2e-5, f'{stack} {attention_operator}/{sparse_block}')


@pytest.mark.parametrize('attention_operator,sparse_block', MODEL_OPTIONS)
def test_shapes_and_param_counts_with_masking_and_visible_only(attention_operator, sparse_block):
    images = _f32(np.random.default_rng(0).uniform(size=(3, 28, 28, 1)))
    for visible_only in (False, True):
        cfg = _config(attention_operator, sparse_block, visible_only)
        params = models.random_params(cfg, seed=0)
        assert sum(x.size for x in jax.tree.leaves(params)) == models.count_params(cfg, include_unused=False)
        out = models.build(cfg).apply({'params': params}, images, rngs={'masking': jax.random.key(2)})
        n = 1 + ops.num_kept(16, cfg.mask_ratio) if visible_only else 17  # the tokens the encoder's operators see
        assert out['latent'].shape == (3, n, cfg.width) and out['pred'].shape == (3, 16, 49)
        assert np.isfinite(float(out['loss']))
        assert ('tssa' in params['encoder']['layers']) == (attention_operator == 'tssa')
        assert ('sparse_coding' in params['decoder']['layers']) == (sparse_block == 'crate_alpha')


def test_crate_alpha_parameter_count_formula():
    """Per CRATE layer: U, W_o, b_o (2d^2 + d), D and D_1 (2 * 4d * d), two LayerNorms (4d); TSSA adds K."""
    d, k = 32, 2
    base = models.count_params(_config('mssa', 'ista'), include_unused=False)
    alpha = models.count_params(_config('mssa', 'crate_alpha'), include_unused=False)
    tost = models.count_params(_config('tssa', 'ista'), include_unused=False)
    layers_both_sides = 4  # crate_mae_test: 2 encoder + 2 decoder layers
    assert alpha - base == layers_both_sides * (8 * d * d - d * d)
    assert tost - base == layers_both_sides * k


@pytest.mark.parametrize(
    'overrides,message',
    [
        (dict(attention_operator='linear'), "attention_operator='linear'"),
        (dict(sparse_block='mlp'), "sparse_block='mlp'"),
        (dict(sparse_steps=0), 'sparse_steps=0'),
        (dict(attention_operator='tssa', attention='dot_product_attention'), 'TSSA has no n x n attention'),
        (dict(sparse_block='crate_alpha', encoder_block='vit', decoder_block='vit'), "set one to 'crate'"),
    ],
)
def test_invalid_operator_options_are_rejected_at_config_time(overrides, message):
    cfg = _config('mssa', 'ista')
    cfg.update(overrides)
    with pytest.raises(ValueError, match='Invalid model config') as err:
        models.validate_model_config(cfg)
    assert message in str(err.value)


def test_reference_export_refuses_the_new_operators_and_orbax_round_trips(tmp_path):
    from cratemae import export
    from cratemae.evaluate import checkpoints

    cfg = _config('tssa', 'crate_alpha')
    params = models.random_params(cfg, seed=3)
    with pytest.raises(ValueError, match="attention_operator='tssa', sparse_block='crate_alpha'.*--format=orbax"):
        export.to_reference_state_dict(params, cfg)
    # Visible-only (the mnist entries' forward): the refusal names --format=orbax, not --encoder_only, which has no
    # reference layout for these operators either.
    visible_only = cfg.copy_and_resolve_references()
    visible_only.encoder_sees_mask_tokens = False
    with pytest.raises(ValueError, match="attention_operator='tssa'.*--format=orbax") as refused:
        export.to_reference_state_dict(params, visible_only)
    assert '--encoder_only' not in str(refused.value)
    ckpt = checkpoints.Checkpoint(params, cfg, 'random', 'random-init')
    loaded = checkpoints.load(export.export_checkpoint(ckpt, 'orbax', tmp_path / 'params'), encoder_only=False)
    assert loaded.model_config.attention_operator == 'tssa' and loaded.model_config.sparse_block == 'crate_alpha'
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(checkpoints.CheckpointError, match="model.attention_operator: checkpoint 'tssa', config 'mssa'"):
        checkpoints.check_architecture(cfg, _config('mssa', 'crate_alpha'))


def test_whitebox_measures_of_the_new_operators():
    """Coding rate and sparsity apply unchanged (sparsity of CRATE-alpha's code); TSSA adds its own objective."""
    from cratemae import diagnostics

    cfg = _config('tssa', 'crate_alpha')
    params = models.random_params(cfg, seed=4)
    model = models.build(cfg)
    images = _f32(np.random.default_rng(1).uniform(size=(3, 28, 28, 1)))
    measures = diagnostics.whitebox_measures(model, params, images)
    assert set(diagnostics.TSSA_MEASURES) <= set(measures)
    inter = diagnostics.unmasked_intermediates(model, params, images)
    code = np.asarray(inter['sparse_code'])
    assert code.shape == (2, 3, 17, 4 * cfg.width)
    np.testing.assert_allclose(measures['sparsity_zeros'], (code == 0).mean(axis=(1, 2, 3)), rtol=1e-6)
    want = [
        ref.tssa_objective(inter['projection'][layer], inter['membership'][layer], cfg.heads).mean()
        for layer in range(2)
    ]
    ref.assert_close(measures['tssa_objective_input'], want, 1e-5, 'R_var at the TSSA input')


def test_flops_of_the_new_operators():
    from cratemae import flops

    base = flops.forward_breakdown(_config('mssa', 'ista'))
    both = flops.forward_breakdown(_config('tssa', 'crate_alpha'))
    n, d = 17, 32  # crate_mae_test: 4 x 4 patches + cls, width 32, depth 2 on each side
    assert base['encoder/attention'] == 2 * 2.0 * 2 * n * n * d and both['encoder/attention'] == 2 * 2.0 * n * d
    assert both['encoder/sparse_coding'] == 2 * 2.0 * (2 * 2 * n * d * 4 * d) and 'encoder/ista' not in both
    assert both['decoder/sparse_coding'] == both['encoder/sparse_coding'] and 'decoder/unsparsify' not in both
    assert both['encoder/qkv'] == base['encoder/qkv']


FAMILY_ENTRIES = {  # reference counting (frozen position tables included); the docstrings quote these
    'crate_alpha_mae_tiny': 36_327_936,
    'crate_alpha_mae_small': 81_144_192,
    'crate_alpha_mae_base': 143_728_896,
    'tost_mae_tiny': 11_555_472,
    'tost_mae_small': 25_406_112,
    'tost_mae_base': 44_638_752,
}


@pytest.mark.parametrize('name', sorted(FAMILY_ENTRIES))
def test_registry_entries_of_the_family(name):
    cfg = experiments.get_config(name).model
    assert models.count_params(cfg) == FAMILY_ENTRIES[name]
    assert f'{FAMILY_ENTRIES[name]:,} parameters' in experiments.describe(name)
    model = models.build(cfg)
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: models.init_params(model, x, seed=0), images)  # nothing allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == models.count_params(cfg, include_unused=False)
    base = experiments.get_config(name.replace('crate_alpha_mae', 'crate_mae').replace('tost_mae', 'crate_mae')).model
    changed = {k for k in cfg if cfg[k] != base[k]}
    want = {'attention_operator'} if name.startswith('tost') else {'sparse_block', 'ista_lambda'}
    assert changed == want


def test_mnist_entries_change_only_the_operator_keys():
    base = experiments.get_config('crate_mae_mnist')  # the default run: the side by side uses its data and budget
    for name, want in (
        ('tost_mae_mnist', {'attention_operator'}),
        ('crate_alpha_mae_mnist', {'sparse_block', 'ista_lambda'}),
    ):
        cfg = experiments.get_config(name)
        assert {f'model.{k}' for k in cfg.model if cfg.model[k] != base.model[k]} == {f'model.{k}' for k in want}
        for section in ('data', 'optim', 'train'):
            assert cfg[section].to_dict() == base[section].to_dict()
