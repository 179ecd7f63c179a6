"""Known-answer tests for cratemae.ops against the independent float64 NumPy reference (tests/numpy_reference.py)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from cratemae import ops

try:
    import numpy_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import numpy_reference as ref


def _rng(seed=0):
    return np.random.default_rng(seed)


def _f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Position embedding.


@pytest.mark.parametrize('width,grid', [(64, 4), (768, 14), (576, 14)])
def test_sincos_pos_embed_matches_reference(width, grid):
    got = np.asarray(ops.sincos_pos_embed(width, grid))
    want = ref.sincos_pos_embed(width, grid)
    assert got.dtype == np.float32 and got.shape == (1 + grid * grid, width)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)


def test_sincos_pos_embed_known_values():
    """Column j in the first half, row i in the second; sin then cos; row 0 zero (float64 formula, float32 tol)."""
    width, grid = 64, 5
    q = width // 4
    got = np.asarray(ops.sincos_pos_embed(width, grid), np.float64)
    assert np.all(got[0] == 0)
    omega = 10000.0 ** (-np.arange(q) / q)
    for i in range(grid):
        for j in range(grid):
            row = got[1 + i * grid + j]
            np.testing.assert_allclose(row[:q], np.sin(j * omega), atol=1e-6)
            np.testing.assert_allclose(row[q : 2 * q], np.cos(j * omega), atol=1e-6)
            np.testing.assert_allclose(row[2 * q : 3 * q], np.sin(i * omega), atol=1e-6)
            np.testing.assert_allclose(row[3 * q :], np.cos(i * omega), atol=1e-6)
    # The patch at row 0, column 1 differs from the one at row 1, column 0 in the first half only.
    assert got[1 + 1, 0] == pytest.approx(math.sin(1.0), abs=1e-6)
    assert got[1 + grid, 0] == 0.0 and got[1 + grid, 2 * q] == pytest.approx(math.sin(1.0), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Patches.


def _coded_images(b=2, side=8, c=3):
    """x[b, y, x, c] = 1000 b + 100 y + 10 x + c ... scaled so each entry names its own coordinates."""
    bb, yy, xx, cc = np.meshgrid(np.arange(b), np.arange(side), np.arange(side), np.arange(c), indexing='ij')
    return (10000 * bb + 100 * yy + xx + 0.01 * cc * 10).astype(np.float64)


def test_patchify_uvc_known_answer():
    p = 4
    x = _coded_images(side=8)
    got = np.asarray(ops.patchify(_f32(x), p))
    assert got.shape == (2, 4, p * p * 3)
    g = 2
    for i in range(g):
        for j in range(g):
            for u in range(p):
                for v in range(p):
                    for c in range(3):
                        assert got[1, i * g + j, (u * p + v) * 3 + c] == np.float32(x[1, p * i + u, p * j + v, c])
    np.testing.assert_array_equal(got, ref.patchify(x, p).astype(np.float32))


def test_patchify_cuv_known_answer_and_differs_from_uvc():
    p = 4
    x = _coded_images(side=8)
    got = np.asarray(ops.patchify_cuv(_f32(x), p))
    for c in range(3):
        for u in range(p):
            for v in range(p):
                assert got[0, 3, (c * p + u) * p + v] == np.float32(x[0, p + u, p + v, c])
    np.testing.assert_array_equal(got, ref.patchify_cuv(x, p).astype(np.float32))
    assert not np.array_equal(got, np.asarray(ops.patchify(_f32(x), p)))


def test_unpatchify_inverts_patchify():
    x = _rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    patches = ops.patchify(jnp.asarray(x), 8)
    np.testing.assert_array_equal(np.asarray(ops.unpatchify(patches, 8, 3)), x)
    np.testing.assert_array_equal(ref.unpatchify(ref.patchify(x, 8), 8, 3), x)


def test_patch_embedding_conv_layout():
    """Conv order (c, u, v) with the torch [d, C, p, p] weight == the conv definition == Flax Conv on W^(2,3,1,0)."""
    import flax.linen as nn

    rng = _rng(2)
    p, d = 4, 8
    x = rng.normal(size=(2, 16, 16, 3))
    w = rng.normal(size=(d, 3, p, p))
    b = rng.normal(size=(d,))
    want = ref.patch_embed(x, w, b)
    via_cuv = np.asarray(ops.patchify_cuv(_f32(x), p)) @ w.reshape(d, -1).T.astype(np.float32) + b
    ref.assert_close(via_cuv, want, 1e-5, 'patchify_cuv @ W')
    conv = nn.Conv(d, (p, p), strides=(p, p), padding='VALID')
    params = {'params': {'kernel': _f32(w.transpose(2, 3, 1, 0)), 'bias': _f32(b)}}
    out = np.asarray(conv.apply(params, _f32(x))).reshape(2, -1, d)
    ref.assert_close(out, want, 1e-5, 'flax conv')


# ----------------------------------------------------------------------------------------------------------------
# Masking.


@pytest.mark.parametrize(
    'length,ratio,keep', [(196, 0.75, 49), (196, 0.9, 19), (196, 0.0, 196), (16, 0.75, 4), (64, 0.9, 6)]
)
def test_num_kept(length, ratio, keep):
    assert ops.num_kept(length, ratio) == keep == ref.num_keep(length, ratio)


@pytest.mark.parametrize('ratio', [0.75, 0.9])
def test_random_masking_matches_reference(ratio):
    rng = _rng(3)
    noise = rng.random((4, 196)).astype(np.float32)
    noise[0, :20] = 0.5  # ties: the stable sort keeps the lower index first
    ids_keep, ids_restore, mask = ops.random_masking(jnp.asarray(noise), ratio)
    r_mask, r_keep, r_restore = ref.random_masking(noise, ratio)
    keep = ref.num_keep(196, ratio)
    assert ids_keep.shape == (4, keep)
    np.testing.assert_array_equal(np.asarray(ids_keep), r_keep)
    np.testing.assert_array_equal(np.asarray(ids_restore), r_restore)
    np.testing.assert_array_equal(np.asarray(mask), r_mask)
    assert np.all(np.asarray(mask).sum(1) == 196 - keep)


def test_random_masking_keeps_smallest_noise():
    noise = np.array([[0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]], np.float32)
    ids_keep, ids_restore, mask = ops.random_masking(jnp.asarray(noise), 0.75)
    np.testing.assert_array_equal(np.asarray(ids_keep), [[1, 5]])
    np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 1, 1, 1, 0, 1, 1]])
    order = np.argsort(noise[0])
    np.testing.assert_array_equal(np.asarray(ids_restore)[0][order], np.arange(8))


# ----------------------------------------------------------------------------------------------------------------
# Loss.


@pytest.mark.parametrize('norm_pix', [False, True])
def test_loss_matches_reference(norm_pix):
    rng = _rng(4)
    p = 2  # 12 values per patch, so biased and unbiased variance differ by 12/11
    x = rng.normal(size=(3, 8, 8, 3)) * 2 + 0.5
    pred = rng.normal(size=(3, 16, 12))
    mask = np.zeros((3, 16))
    mask[0, :5] = mask[1, 3:4] = mask[2, 7:16] = 1.0  # unequal counts: pooled over the batch, not per sample
    got = float(ops.masked_reconstruction_loss(_f32(pred), ops.patchify(_f32(x), p), _f32(mask), norm_pix=norm_pix))
    want = ref.mae_loss(x, pred, mask, p, norm_pix_loss=norm_pix)
    assert got == pytest.approx(want, rel=1e-5)
    if norm_pix:  # the test can tell unbiased from biased variance
        t = ref.patchify(x, p)
        tb = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
        biased = (((pred - tb) ** 2).mean(-1) * mask).sum() / mask.sum()
        assert abs(biased - want) > 1e-3 * want
        assert got != pytest.approx(biased, rel=1e-4)


def test_loss_known_answer():
    pred = np.zeros((1, 4, 3), np.float32)
    target = np.array([[[1, 1, 1], [2, 2, 2], [3, 3, 3], [0, 0, 6]]], np.float32)
    mask = np.array([[1, 0, 1, 1]], np.float32)
    got = float(ops.masked_reconstruction_loss(_f32(pred), _f32(target), _f32(mask)))
    assert got == pytest.approx((1 + 9 + 12) / 3, rel=1e-6)
    # norm_pix: patch [0, 0, 6] -> mean 2, unbiased var 12 -> (t - 2)/sqrt(12 + 1e-6); constant patches -> 0.
    got = float(ops.masked_reconstruction_loss(_f32(pred), _f32(target), _f32(mask), norm_pix=True))
    z = (np.array([0, 0, 6.0]) - 2) / np.sqrt(12 + 1e-6)
    assert got == pytest.approx((z**2).mean() / 3, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# White-box operators.


def _tokens(rng, b=2, n=17, d=48):
    return rng.normal(size=(b, n, d))


@pytest.mark.parametrize('heads', [4, 3])  # head dims 12 and 16 (h != 64)
def test_subspace_attention_and_mssa(heads):
    rng = _rng(5)
    y = _tokens(rng)
    d = y.shape[-1]
    u = rng.normal(size=(d, d)) / math.sqrt(d)  # torch [out, in]
    wo = rng.normal(size=(d, d)) / math.sqrt(d)
    bo = rng.normal(size=(d,)) * 0.1
    want, attn, proj = ref.mssa(y, u, wo, bo, heads)
    got = ops.mssa(_f32(y), _f32(u.T), _f32(wo.T), _f32(bo), heads)
    ref.assert_close(got, want, 1e-5, 'mssa')
    o, a = ops.subspace_attention(_f32(proj), heads)
    ref.assert_close(a, attn, 1e-5, 'attention')
    want_o = np.einsum('bknm,bkmh->bknh', attn, proj.reshape(2, 17, heads, -1).transpose(0, 2, 1, 3))
    want_o = want_o.transpose(0, 2, 1, 3).reshape(2, 17, d)
    ref.assert_close(o, want_o, 1e-5, 'O')
    o2, _ = ops.subspace_attention(_f32(proj), heads, implementation='dot_product_attention')
    ref.assert_close(o2, want_o, 1e-5, 'O (dot_product_attention)')


@pytest.mark.parametrize('fused', [False, True])
def test_ista(fused):
    rng = _rng(6)
    v = _tokens(rng)
    d = v.shape[-1]
    dic = rng.uniform(-1, 1, size=(d, d)) * math.sqrt(6 / d)
    want = ref.ista(v, dic, 0.1, 0.5)
    assert 0.2 < (want == 0).mean() < 0.8  # the threshold is active
    got = np.asarray(ops.ista(_f32(v), _f32(dic), 0.1, 0.5, fused=fused))
    ref.assert_close(got, want, 2e-5 if fused else 1e-5, 'ista fused=%s' % fused)
    # D is used untransposed: the transposed dictionary gives a different answer.
    assert np.abs(ref.ista(v, dic.T, 0.1, 0.5) - want).max() > 1e-2


def test_ista_known_answer():
    """D = 0: ReLU(v - eta lambda); D = I: V D - V D^T D = 0 as well."""
    v = np.array([[[0.01, 0.05, 0.06, -1.0, 2.0]]])
    for dic in (np.zeros((5, 5)), np.eye(5)):
        got = np.asarray(ops.ista(_f32(v), _f32(dic), 0.1, 0.5))
        np.testing.assert_allclose(got, np.maximum(v - 0.05, 0), atol=1e-7)


def test_decoder_inverse_steps():
    """G = LN1(Y) A^T (unsparsify), then Y+ = G - MSSA'(LN2 G)."""
    rng = _rng(7)
    y = _tokens(rng)
    d = y.shape[-1]
    a = rng.normal(size=(d, d)) / math.sqrt(d)
    g_want = ref.unsparsify(y, a)
    g = ops.unsparsify(_f32(y), _f32(a.T))
    ref.assert_close(g, g_want, 1e-5, 'unsparsify')
    u = rng.normal(size=(d, d)) / math.sqrt(d)
    wo = rng.normal(size=(d, d)) / math.sqrt(d)
    bo = rng.normal(size=(d,)) * 0.1
    gam, bet = 1 + 0.1 * rng.normal(size=d), 0.1 * rng.normal(size=d)
    want = ref.decoder_compress_inverse(g_want, gam, bet, 1e-5, u, wo, bo, 4)
    ln = ref.layer_norm(np.asarray(g, np.float64), gam, bet, 1e-5)
    got = np.asarray(g) - np.asarray(ops.mssa(_f32(ln), _f32(u.T), _f32(wo.T), _f32(bo), 4))
    ref.assert_close(got, want, 1e-5, 'G - MSSA(LN G)')
