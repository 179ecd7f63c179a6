"""White-box measures: known answers of the pure functions, and their wiring to the model's intermediates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from cratemae import diagnostics as dg
from cratemae import export
from cratemae import models
from cratemae import ops

try:
    import whitebox_reference as wref
except ImportError:  # tests/ imported as a package
    from tests import whitebox_reference as wref

EPS = dg.CODING_RATE_EPS
_coding_rate_tokens_form = wref.coding_rate_tokens


# ----------------------------------------------------------------------------------------------------------------
# Coding rate.


def test_coding_rate_of_zero_tokens_is_zero():
    np.testing.assert_allclose(dg.coding_rate(jnp.zeros((3, 2, 5, 4))), np.zeros(3), atol=1e-6)


def test_coding_rate_of_identical_tokens():
    # X_k^T X_k = N u u^T has the one eigenvalue N: R_k = 1/2 log(1 + (h/(N eps)) N) = 1/2 log(1 + h/eps).
    k, n, h = 3, 7, 4
    u = np.array([1.0, -2.0, 0.5, 3.0])
    x = np.broadcast_to(u, (1, k, n, h)) * 2.5  # the scale must not matter
    np.testing.assert_allclose(dg.coding_rate(x), [k * 0.5 * np.log(1 + h / EPS)], rtol=1e-5)


def test_coding_rate_of_orthonormal_tokens():
    # X_k X_k^T = I_N: R_k = N/2 log(1 + h/(N eps)).
    k, n, h = 2, 3, 5
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(h, h)))
    x = np.stack([q[:n] * np.array([[1.0], [0.3], [4.0]]) for _ in range(k)])[None]  # row scales are normalised away
    np.testing.assert_allclose(dg.coding_rate(x), [k * n / 2 * np.log(1 + h / (n * EPS))], rtol=1e-5)


@pytest.mark.parametrize('n,h', [(17, 8), (4, 8), (8, 8)])
def test_coding_rate_gram_form_equals_token_form(n, h):
    x = np.random.default_rng(n).normal(size=(2, 3, n, h))
    np.testing.assert_allclose(dg.coding_rate(x), _coding_rate_tokens_form(x), rtol=2e-5)


def test_logdet_spd_matches_numpy():
    a = np.random.default_rng(4).normal(size=(3, 6, 6))
    m = np.eye(6) + 5.0 * a @ a.transpose(0, 2, 1)
    np.testing.assert_allclose(dg.logdet_spd(m), np.linalg.slogdet(m)[1], rtol=1e-5)


def test_compressed_tokens_have_lower_coding_rate():
    rng = np.random.default_rng(1)
    spread = rng.normal(size=(1, 1, 32, 8))
    low_rank = spread[..., :2] @ rng.normal(size=(2, 8))  # the same tokens squeezed onto a 2-D subspace
    assert float(dg.coding_rate(low_rank)[0]) < float(dg.coding_rate(spread)[0])


def test_split_heads_takes_contiguous_column_blocks():
    w = jnp.arange(2 * 3 * 6, dtype=jnp.float32).reshape(2, 3, 6)
    heads = dg.split_heads(w, 3)
    assert heads.shape == (2, 3, 3, 2)
    np.testing.assert_array_equal(heads[:, 1], w[:, :, 2:4])


def _u_blocks(kernel, heads):
    d = kernel.shape[0]
    return [kernel[:, k * (d // heads) : (k + 1) * (d // heads)] for k in range(heads)]


def test_coding_rate_in_subspaces_equals_orthonormalised_n_by_n_form():
    # Independent route: QR-orthonormalise each U_k, project, N x N logdet in float64 (tests/whitebox_reference.py).
    rng = np.random.default_rng(5)
    d, heads, n = 12, 3, 9
    kernel = rng.normal(size=(d, d)) * rng.uniform(0.2, 3.0, size=(1, d))  # columns of very different lengths
    y = rng.normal(size=(2, n, d)) * rng.uniform(0.5, 2.0, size=(2, n, 1))
    w = dg.split_heads(jnp.asarray(y @ kernel, jnp.float32), heads)
    got = dg.coding_rate_in_subspaces(w, dg.subspace_gram(kernel, heads))
    np.testing.assert_allclose(got, wref.coding_rate_orthonormal(y, _u_blocks(kernel, heads)), rtol=1e-4)


def test_paper_variant_ignores_how_u_stretches_its_subspaces_and_sees_token_norms():
    rng = np.random.default_rng(6)
    d, heads, n = 8, 2, 10
    kernel = rng.normal(size=(d, d))
    y = rng.normal(size=(1, n, d))
    # U_k -> U_k M_k (an invertible h x h mix of its columns) keeps span(U_k): the paper variant is unchanged, the
    # reference's measure (non-orthonormal U, normalised tokens) is not.
    mix = np.kron(
        np.eye(heads),
        np.array([[1.0, 0.0, 0.0, 0.0], [5.0, 0.1, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.2]]),
    )
    stretched = kernel @ mix
    rate = lambda k: dg.coding_rate_in_subspaces(dg.split_heads(y @ k, heads), dg.subspace_gram(k, heads))  # noqa
    np.testing.assert_allclose(rate(stretched), rate(kernel), rtol=1e-4)
    ref_rate = lambda k: dg.coding_rate(dg.split_heads(y @ k, heads))  # noqa: E731
    assert abs(float(ref_rate(stretched)[0]) - float(ref_rate(kernel)[0])) > 1.0
    # Shrinking every token lowers the paper variant (the reference's normalisation hides it).
    assert (
        float(rate(kernel)[0])
        - float(
            dg.coding_rate_in_subspaces(dg.split_heads(0.1 * y @ kernel, heads), dg.subspace_gram(kernel, heads))[0]
        )
        > 1.0
    )
    np.testing.assert_allclose(ref_rate(kernel), dg.coding_rate(dg.split_heads(0.1 * y @ kernel, heads)), rtol=1e-5)


def test_subspace_gram_takes_the_head_column_blocks():
    kernel = np.random.default_rng(7).normal(size=(6, 6))
    gram = dg.subspace_gram(kernel, 3)
    for k, u in enumerate(_u_blocks(kernel, 3)):
        np.testing.assert_allclose(gram[k], u.T @ u, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Sparsity, inversion, batch statistics.


def test_sparsity_of_a_known_array():
    z = np.array([[[1.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    zeros, l1_l2 = dg.sparsity(z)
    # Sample 0: 3 zeros of 8; one-hot 1/sqrt(4) = 0.5, equal magnitudes 4/(2*2) = 1. Sample 1: all zero.
    np.testing.assert_allclose(zeros, [3 / 8, 1.0])
    np.testing.assert_allclose(l1_l2, [0.75, 0.0])


def test_relative_error_and_cosine_known_answers():
    ref = np.random.default_rng(2).normal(size=(2, 5, 4))
    np.testing.assert_allclose(dg.relative_error(ref, ref), [0, 0], atol=1e-7)
    np.testing.assert_allclose(dg.relative_error(2 * ref, ref), [1, 1], rtol=1e-6)
    np.testing.assert_allclose(dg.relative_error(np.zeros_like(ref), ref), [1, 1], rtol=1e-6)
    np.testing.assert_allclose(dg.token_cosine(3 * ref, ref), [1, 1], rtol=1e-6)
    np.testing.assert_allclose(dg.token_cosine(-ref, ref), [-1, -1], rtol=1e-6)


def test_inversion_is_zero_for_an_exact_inverse_and_pairs_layers_in_reverse():
    rng = np.random.default_rng(3)
    depth = 3
    enc_inputs = rng.normal(size=(depth, 2, 5, 4))
    dec_outputs = enc_inputs[::-1].copy()  # decoder layer L-1-l reproduces encoder layer l's input exactly
    error, cosine = dg.inversion(enc_inputs, dec_outputs)
    np.testing.assert_allclose(error, 0, atol=1e-6)
    np.testing.assert_allclose(cosine, 1, rtol=1e-6)
    dec_outputs[0] *= 2  # the first decoder layer is the inverse of the last encoder layer
    error, _ = dg.inversion(enc_inputs, dec_outputs)
    np.testing.assert_allclose(error, [[0, 0], [0, 0], [1, 1]], atol=1e-6)


def test_batch_mean_std_weights_valid_samples():
    values, valid = np.array([[1.0, 3.0, 8.0, 100.0]]), np.array([1, 1, 1, 0])
    mean, std = dg.batch_mean_std(values, valid=valid)  # unbiased by default, as torch's .std()
    np.testing.assert_allclose(mean, [4.0])
    np.testing.assert_allclose(std, [np.std([1.0, 3.0, 8.0], ddof=1)], rtol=1e-6)
    _, population = dg.batch_mean_std(values, valid=valid, ddof=0)
    np.testing.assert_allclose(population, [np.std([1.0, 3.0, 8.0])], rtol=1e-6)
    _, single = dg.batch_mean_std(values, valid=np.array([0, 1, 0, 0]))
    np.testing.assert_allclose(single, [0.0])


def test_flatten_for_logging():
    flat = dg.flatten_for_logging({'mssa_effect': np.array([1.0, 2.0]), 'mssa_effect_std': np.array([0.1, 0.2])})
    assert flat == {'whitebox/mssa_effect/layer_00': 1.0, 'whitebox/mssa_effect/layer_01': 2.0}
    assert len(dg.flatten_for_logging({'x_std': np.zeros(3)}, include_std=True)) == 3


# ----------------------------------------------------------------------------------------------------------------
# Wiring to the model.


@pytest.fixture(scope='module')
def tiny():
    config = experiments.get_config('crate_mae_test')
    model = models.build(config.model)
    images = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    params = jax.jit(model.init)({'params': jax.random.key(1), 'masking': jax.random.key(2)}, images)['params']
    inter = jax.jit(lambda p, x: dg.unmasked_intermediates(model, p, x))(params, images)
    return model, params, images, inter


def test_intermediates_are_the_layer_inputs_and_outputs(tiny):
    model, params, images, inter = tiny
    depth, n, d = model.depth, model.num_patches + 1, model.width
    for key in ('encoder_inputs', 'projection', 'mssa_out', 'ista_out', 'decoder_tokens'):
        assert inter[key].shape == (depth, 3, n, d), key
    # Z^0 = [cls; patch embeddings] + P, built by hand from the parameters.
    patches = (
        ops.patchify_cuv(images, model.patch_size)
        @ params['patch_embed']['kernel'].transpose(3, 2, 0, 1).reshape(d, -1).T
        + params['patch_embed']['bias']
    )
    cls = jnp.broadcast_to(params['cls_token'], (3, 1, d))
    z0 = jnp.concatenate([cls, patches], 1) + ops.sincos_pos_embed(d, model.grid_size)
    np.testing.assert_allclose(inter['encoder_inputs'][0], z0, atol=1e-4)
    np.testing.assert_allclose(inter['encoder_inputs'][1:], inter['ista_out'][:-1])
    # The last output through the final norm is the encode() latent.
    norm = params['encoder_norm']
    latent = dg.layer_norm(inter['ista_out'][-1], norm['scale'], norm['bias'], model.final_norm_eps)
    np.testing.assert_allclose(latent, model.apply({'params': params}, images, method=model.encode), atol=1e-5)
    # Our LN1 + U reproduces the projection each layer sowed (so "before" and "after" are measured the same way).
    layers = params['encoder']['layers']
    for i in range(depth):
        w = dg.subspace_projection(
            inter['encoder_inputs'][i],
            layers['norm1']['scale'][i],
            layers['norm1']['bias'][i],
            layers['mssa']['qkv']['kernel'][i],
            model.block_norm_eps,
        )
        np.testing.assert_allclose(w, inter['projection'][i], atol=1e-5)


def test_class_attention_matches_the_sown_attention(tiny):
    model, params, images, inter = tiny
    _, state = model.apply({'params': params}, images, method=model.encode, mutable=['intermediates'])
    probs = state['intermediates']['encoder']['layers']['mssa']['attention'][0]  # (L, B, K, N, N)
    np.testing.assert_allclose(dg.class_attention(inter['projection'], model.heads), probs[..., 0, 1:], atol=1e-6)


def test_whitebox_measures(tiny):
    model, params, images, inter = tiny
    m = dg.whitebox_measures(model, params, images, valid=jnp.ones(3))
    assert set(m) == set(dg.MEASURES) | {k + '_std' for k in dg.MEASURES}
    assert all(v.shape == (model.depth,) and np.all(np.isfinite(v)) for v in m.values())
    before = dg.coding_rate(dg.split_heads(inter['projection'], model.heads))  # (L, B): the reference's hook
    np.testing.assert_allclose(m['compression_input'], np.mean(before, 1), rtol=1e-5)
    np.testing.assert_allclose(m['compression_input_std'], np.std(before, 1, ddof=1), rtol=1e-4)
    np.testing.assert_allclose(m['sparsity_zeros'], np.mean(np.asarray(inter['ista_out']) == 0, (1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(m['sparsity_l0'], 1 - m['sparsity_zeros'], rtol=1e-6)
    assert np.all(m['sparsity_zeros'] > 0.2)  # ReLU outputs: about half zeros at init (docs/model.md §2.5)
    # Padded samples can be left out of the means.
    two = dg.whitebox_measures(model, params, images, valid=jnp.array([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(two['compression_input'], np.mean(before[:, :2], 1), rtol=1e-5)


@pytest.mark.parametrize('scale', [1.0, 1.7])
def test_whitebox_measures_match_the_float64_reference(tiny, scale):
    """Every coding-rate, effect and sparsity measure (and spread) against tests/whitebox_reference.py, which runs its
    own float64 encoder on the exported state dict and computes the reference's N x N form and a QR-orthonormalised
    paper variant. scale=1.7 perturbs the weights away from their initial conditioning."""
    model, params, images, _ = tiny
    params = jax.tree.map(lambda p: p * scale, params)
    config = experiments.get_config('crate_mae_test').model
    sd = {k: np.asarray(v) for k, v in export.to_reference_state_dict(params, config, encoder_only=True).items()}
    want = wref.layer_measures(sd, np.asarray(images), config)
    got = dg.whitebox_measures(model, params, images, paper=True)
    assert set(dg.PAPER_MEASURES) <= set(got)
    for key, value in want.items():
        is_zeros = key.startswith('sparsity')
        # A float32 ReLU may put a borderline entry on the other side of zero: 1 of the N d entries per sample.
        atol = 2.0 / (images.shape[1] // model.patch_size) ** 2 / model.width if is_zeros else 2e-3
        np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=atol, err_msg=key)


def test_effects_are_differences_of_the_three_points(tiny):
    model, params, images, _ = tiny
    m = dg.whitebox_measures(model, params, images, paper=True)
    for suffix in ('', '_paper'):
        rate = 'compression_paper_' if suffix else 'compression_'
        np.testing.assert_allclose(m['mssa_effect' + suffix], m[rate + 'mid'] - m[rate + 'input'], atol=1e-4)
        np.testing.assert_allclose(m['ista_effect' + suffix], m[rate + 'output'] - m[rate + 'mid'], atol=1e-4)


def test_encoder_only_params_give_encoder_measures(tiny):
    model, params, images, _ = tiny
    encoder_only = {k: v for k, v in params.items() if not k.startswith('decoder')}
    m = dg.whitebox_measures(model, encoder_only, images)
    assert 'inversion_error' not in m and 'compression_output' in m


def test_vit_encoder_is_rejected():
    config = experiments.get_config('crate_mae_test')
    config.unlock()
    config.model.encoder_block = 'vit'
    with pytest.raises(ValueError, match="encoder_block='crate'"):
        dg.whitebox_fn(models.build(config.model))
