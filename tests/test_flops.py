"""Tests for cratemae.flops: hand figures for Base, and XLA's cost analysis of plain-jnp blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cratemae import flops
from cratemae import models

BASE = {
    'image_size': 224,
    'patch_size': 16,
    'channels': 3,
    'encoder_block': 'crate',
    'decoder_block': 'crate',
    'width': 768,
    'depth': 12,
    'heads': 12,
    'decoder_width': 768,
    'decoder_depth': 12,
    'decoder_heads': 12,
    'mask_ratio': 0.75,
    'encoder_sees_mask_tokens': True,
}


def test_base_hand_figures():
    # docs/model.md §8.12: 25.6 GFLOP forward, 76.7 GFLOP per train step per image.
    np.testing.assert_allclose(flops.forward_flops(BASE), 25.6e9, rtol=0.01)
    np.testing.assert_allclose(flops.train_flops(BASE), 76.7e9, rtol=0.01)
    # Per encoder block: 5 N d^2 + 2 N^2 d multiply-adds (docs/model.md §8.12: about 0.64 GMAC).
    n, d = 197, 768
    enc = sum(v for k, v in flops.forward_breakdown(BASE).items() if k.startswith('encoder/'))
    assert enc == 12 * 2 * (5 * n * d * d + 2 * n * n * d)
    # FAIR MAE-Base (visible-only ViT encoder, dec512d8b): 58.5 GFLOP per train step (docs/model.md §8.12).
    fair = dict(
        BASE,
        encoder_block='vit',
        decoder_block='vit',
        decoder_width=512,
        decoder_depth=8,
        encoder_sees_mask_tokens=False,
    )
    np.testing.assert_allclose(flops.train_flops(fair), 58.5e9, rtol=0.01)


def test_mask_awareness_and_fused_ista():
    visible = dict(BASE, encoder_sees_mask_tokens=False)
    assert flops.token_counts(visible) == (196, 50, 197)
    assert flops.token_counts(visible, mask_ratio=0.9) == (196, 20, 197)  # int(19.6) + 1
    assert flops.token_counts(BASE) == (196, 197, 197)
    assert flops.forward_flops(visible) < flops.forward_flops(BASE)
    assert 'decoder_embed' in flops.forward_breakdown(visible)
    fused = flops.forward_breakdown(dict(BASE, fused_ista=True), batch_size=256)
    np.testing.assert_allclose(fused['encoder/ista'], 12 * 2 * (197 * 768**2 + 768**3 / 256))


def test_mfu_and_peak_table():
    assert flops.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
    assert flops.peak_flops('NVIDIA H100 PCIe') == 756e12
    assert flops.peak_flops('NVIDIA H200') == 989e12
    assert flops.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
    assert flops.peak_flops('TPU v5 lite') == 197e12
    assert flops.peak_flops('TPU v5') == 459e12
    assert flops.peak_flops('TPU v6 lite') == 918e12
    assert flops.peak_flops('TPU v4') == 275e12
    assert flops.peak_flops('cpu') is None
    # The H200 anchor of docs/performance.md: 2,388 img/s on one H200 at 76.7 GFLOP/img is 18.6% MFU.
    step_s = 256 / 2388
    np.testing.assert_allclose(flops.mfu(flops.train_flops(BASE) * 256, step_s, 'NVIDIA H200', 1), 0.186, atol=0.002)
    assert flops.mfu(1e9, 1.0, 'cpu', 8) is None
    assert flops.mfu(1e9, 1.0, 'cpu', 1, peak=1e10) == pytest.approx(0.1)


def _ln(x):
    m = x.mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5)


def _mssa(y, u, wo, bo, heads):
    n, d = y.shape
    w = (y @ u).reshape(n, heads, d // heads)
    a = jax.nn.softmax(jnp.einsum('nhk,mhk->hnm', w, w) / np.sqrt(d // heads), -1)
    return jnp.einsum('hnm,mhk->nhk', a, w).reshape(n, d) @ wo + bo


def _crate_encoder_block(p, z, heads=4):
    """One CRATE encoder layer (docs/model.md §2.5) for one image, plain jnp."""
    z = z + _mssa(_ln(z), p['u'], p['wo'], p['bo'], heads)
    v, dic = _ln(z), p['d']
    return jax.nn.relu(v + 0.1 * (v @ dic - (v @ dic.T) @ dic) - 0.05)


def _crate_decoder_block(p, z, heads=4):
    """One CRATE decoder layer (docs/model.md §2.6): G = LN(Y) A^T; G - MSSA(LN(G))."""
    g = _ln(z) @ p['a']
    return g - _mssa(_ln(g), p['u'], p['wo'], p['bo'], heads)


def _xla_flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.parametrize(
    'kind,block', [('crate_encoder', _crate_encoder_block), ('crate_decoder', _crate_decoder_block)]
)
def test_block_against_xla_cost_analysis(kind, block):
    n, d = 65, 128
    keys = jax.random.split(jax.random.key(0), 6)
    p = {name: jax.random.normal(k, (d, d)) for name, k in zip(['u', 'wo', 'd', 'a'], keys)}
    p['bo'] = jnp.zeros((d,))
    z = jax.random.normal(keys[-1], (n, d))
    analytic = sum(flops.block_flops(kind, n, d).values())
    fwd = _xla_flops(block, p, z)
    # value_and_grad, as in a train step (plain grad lets XLA drop forward work the gradient
    # does not need), and a random cotangent (with sum(), dot(x, ones) becomes a reduce).
    r = jax.random.normal(keys[-2], (n, d))
    loss = lambda p, z: (block(p, z) * r).sum()
    train = _xla_flops(jax.value_and_grad(loss, argnums=(0, 1)), p, z)
    # XLA also counts LayerNorm/softmax/ReLU element ops (a few %), never fewer matmul FLOPs.
    assert 1.0 <= fwd / analytic < 1.06, fwd / analytic
    assert 3.0 <= train / analytic < 3.2, train / analytic


@pytest.mark.slow  # compiles a whole model forward and backward twice
@pytest.mark.parametrize(
    'overrides',
    [
        # reference CRATE-MAE with an unrolled scan
        {'depth': 2, 'decoder_depth': 2, 'scan_unroll': 2},
        # visible-only ViT encoder, decoder_embed, CRATE decoder of another width
        {
            'depth': 1,
            'decoder_depth': 1,
            'encoder_sees_mask_tokens': False,
            'encoder_block': 'vit',
            'decoder_width': 64,
            'decoder_heads': 2,
        },
    ],
)
def test_model_against_xla_cost_analysis(overrides):
    cfg = models.default_model_config()
    cfg.update(
        dict(
            {
                'image_size': 32,
                'patch_size': 4,
                'channels': 3,
                'width': 128,
                'heads': 4,
                'decoder_width': 128,
                'decoder_heads': 4,
            },
            **overrides,
        )
    )
    models.apply_platform_defaults(cfg, jax.default_backend())  # as the engine does: count what is compiled
    model, batch = models.build(cfg), 2
    images = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    noise = jax.random.uniform(jax.random.key(1), (batch, 64))
    params = model.init({'params': jax.random.key(2)}, images, noise=noise)['params']
    fwd = _xla_flops(lambda p, x, n: model.apply({'params': p}, x, noise=n), params, images, noise)
    loss = lambda p, x, n: model.apply({'params': p}, x, noise=n)['loss']
    train = _xla_flops(jax.value_and_grad(loss), params, images, noise)
    # XLA (a scan body is counted once, hence depth 1 or an unrolled scan) adds the element ops:
    # LayerNorm, softmax, GELU, masking, loss; measured 4-9 % above the matmul count here.
    fwd_ratio = fwd / batch / flops.forward_flops(cfg, batch)  # batch: fused ISTA's D^T D is once per step
    train_ratio = train / batch / flops.train_flops(cfg, batch)
    assert 1.0 <= fwd_ratio < 1.12 and 1.0 <= train_ratio < 1.12, (fwd_ratio, train_ratio)
