"""Every performance option computes what the default path computes: forward loss and pred, and one step's gradients.

The model is crate_mae_test with patch 4: L = 49 patches, N = 50 tokens (not a multiple of 8, so every padding
variant really pads), depth 3 (so scan_unroll=2 leaves a remainder). The default path (einsum attention, no remat,
scan_unroll=1, three-matmul ISTA, float32) is the reference. Tolerances are relative to the largest magnitude of
each compared array; the measured differences are in docs/performance.md.

The padded cuDNN variant cannot run on a CPU; its padding and key-mask logic is the same code with
implementation='xla' (attention='dot_product_attention', attention_pad > 1), and a recording stand-in for
jax.nn.dot_product_attention checks that attention='cudnn' passes implementation='cudnn', the padded shapes and the
key lengths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from cratemae import benchmark
from cratemae import models
from cratemae import ops
from cratemae import sharding

F32_RTOL = 1e-5  # float32 reassociation; measured <= 5e-7 on these shapes


def _model_config(**overrides):
    cfg = experiments.get_config('crate_mae_test').model
    # The reference path (three-matmul ISTA), not the platform's choice, is what every option is compared against.
    cfg.update({'patch_size': 4, 'depth': 3, 'decoder_depth': 2, 'fused_ista': False, **overrides})
    return cfg


def _random_params(model, images, seed=0):
    """N(0, 1/fan_in) kernels, perturbed LayerNorms and tokens: every tensor matters, and no slow model.init."""
    shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'masking': jax.random.key(1)}, images))
    rng = np.random.default_rng(seed)

    def new(path, leaf):
        name = str(getattr(path[-1], 'key', ''))
        if name == 'scale':
            return jnp.asarray(1 + 0.2 * rng.normal(size=leaf.shape), jnp.float32)
        if name in ('bias', 'cls_token', 'mask_token'):
            return jnp.asarray(0.2 * rng.normal(size=leaf.shape), jnp.float32)
        fan_in = int(np.prod(leaf.shape[-4:-1])) if name == 'kernel' and len(leaf.shape) >= 4 else leaf.shape[-2]
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(new, shapes['params'])


_CACHE = {}


def _loss_pred_grads(cfg, params=None, batch=2):
    """(loss, pred, grads) of one masked-completion forward/backward with fixed noise; params shared across options."""
    model = models.build(cfg)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(batch, cfg.image_size, cfg.image_size, cfg.channels)), jnp.float32)
    noise = jnp.asarray(rng.random((batch, model.num_patches)), jnp.float32)
    params = _random_params(model, images) if params is None else params

    def loss_fn(p):
        out = model.apply({'params': p}, images, noise=noise)
        return out['loss'], out['pred']

    (loss, pred), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return params, float(loss), np.asarray(pred, np.float32), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)


def _reference(**arch):
    key = tuple(sorted(arch.items()))
    if key not in _CACHE:
        _CACHE[key] = _loss_pred_grads(_model_config(**arch))
    return _CACHE[key]


def _max_rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _compare(option, rtol, **arch):
    params, loss, pred, grads = _reference(**arch)
    _, got_loss, got_pred, got_grads = _loss_pred_grads(_model_config(**arch, **option), params)
    assert jax.tree.structure(got_grads) == jax.tree.structure(grads)  # no option adds or drops a parameter
    assert got_loss == pytest.approx(loss, rel=rtol)
    assert _max_rel(got_pred, pred) <= rtol
    worst = max(jax.tree.leaves(jax.tree.map(_max_rel, got_grads, grads)))
    assert worst <= rtol, f'gradient differs by {worst:.2e} (relative to each leaf\'s largest entry)'
    return got_loss, got_pred, got_grads


# Each case is one XLA compile of forward + backward; the options are paired so that every value is covered once.
@pytest.mark.slow  # compiles a train step per option
@pytest.mark.parametrize(
    'option',
    [
        {'attention': 'dot_product_attention', 'remat': 'full', 'scan_unroll': 2},
        {'attention': 'dot_product_attention', 'attention_pad': 64, 'remat': 'dots_saveable', 'scan_unroll': 3},
        {'attention': 'dot_product_attention', 'attention_pad': 8, 'remat': 'dots_with_no_batch_dims_saveable'},
        {'fused_ista': True},
    ],
    ids=['dpa-full-unroll2', 'dpa-pad64-dots-unroll3', 'dpa-pad8-dotsnobatch', 'fused-ista'],
)
def test_float32_options_match_the_default_path(option):
    _compare(option, F32_RTOL)


@pytest.mark.slow  # compiles several models
def test_padded_attention_in_vit_blocks_and_visible_only_encoder():
    """ViT blocks use the same padded kernel; the visible-only encoder has N_e = 13 tokens (pad 16), decoder 50."""
    arch = {
        'encoder_block': 'vit',
        'decoder_block': 'vit',
        'encoder_sees_mask_tokens': False,
        'qkv_bias': True,
        'depth': 1,
        'decoder_depth': 1,
    }
    _compare({'attention': 'dot_product_attention', 'attention_pad': 16}, F32_RTOL, **arch)


def test_bfloat16_compute_is_close():
    """bf16 matmuls (8-bit mantissa), fp32 params, LayerNorm statistics and softmax: loose agreement only."""
    params, loss, pred, grads = _reference()
    _, got_loss, got_pred, got_grads = _loss_pred_grads(_model_config(dtype='bfloat16'), params)
    assert got_loss == pytest.approx(loss, rel=1e-2)
    assert _max_rel(got_pred, pred) < 5e-2
    g, want = (np.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (got_grads, grads))
    assert np.linalg.norm(g - want) / np.linalg.norm(want) < 5e-2
    assert g @ want / (np.linalg.norm(g) * np.linalg.norm(want)) > 0.995


def test_padding_masks_keys_at_the_op_level():
    """Padded dot_product_attention equals einsum attention for N = 197 (CRATE-MAE-Base's tokens) and pads 64/128."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(2, 197, 4 * 16)), jnp.float32)
    want, _ = ops.subspace_attention(w, 4, 'einsum')
    for pad in (0, 8, 64, 128):
        got, probs = jax.jit(lambda x, p=pad: ops.subspace_attention(x, 4, 'dot_product_attention', p))(w)
        assert probs is None and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * float(jnp.abs(want).max()))
    assert ops.padded_length(197, 64) == ops.padded_length(197, 128) == 256
    assert ops.padded_length(50, 64) == 64 and ops.padded_length(197, 0) == ops.padded_length(197, 1) == 197


def test_cudnn_option_passes_the_padded_shapes_and_key_lengths(monkeypatch):
    """On CPU a stand-in records what attention='cudnn' asks of jax.nn.dot_product_attention and answers with XLA."""
    real = jax.nn.dot_product_attention
    calls = []

    def recording(q, k, v, *, implementation=None, **kwargs):
        calls.append(dict(shape=q.shape, implementation=implementation, **kwargs))
        return real(q, k, v, implementation='xla', **kwargs)

    monkeypatch.setattr(jax.nn, 'dot_product_attention', recording)
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(2, 197, 64)), jnp.float32)
    want, _ = ops.subspace_attention(w, 4, 'einsum')
    got, _ = ops.subspace_attention(w, 4, 'cudnn', 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6 * float(jnp.abs(want).max()))
    (call,) = calls
    assert call['implementation'] == 'cudnn' and call['shape'] == (2, 256, 4, 16)
    np.testing.assert_array_equal(np.asarray(call['key_value_seq_lengths']), [197, 197])
    assert call['scale'] == pytest.approx(0.25)
    calls.clear()
    ops.subspace_attention(w, 4, 'cudnn', 0)  # no padding: no lengths, so cuDNN runs its unmasked kernel
    assert calls[0]['shape'] == (2, 197, 4, 16) and 'key_value_seq_lengths' not in calls[0]


@pytest.mark.parametrize(
    'overrides,message',
    [
        ({'attention': 'cudnn'}, 'bfloat16'),
        ({'attention': 'einsum', 'attention_pad': 64}, 'dot_product_attention'),
        ({'attention': 'dot_product_attention', 'attention_pad': -1}, 'non-negative'),
        ({'attention': 'flash'}, 'choose one of'),
        (
            {
                'attention': 'cudnn',
                'dtype': 'bfloat16',
                'width': 36,
                'heads': 3,
                'decoder_width': 36,
                'decoder_heads': 3,
            },
            'multiples of 8',
        ),
    ],
)
def test_invalid_attention_options_are_rejected_at_config_time(overrides, message):
    cfg = _model_config(**overrides)
    with pytest.raises(ValueError, match=message):
        models.validate_model_config(cfg)


def test_cudnn_config_validates_and_builds_without_a_gpu():
    cfg = _model_config(attention='cudnn', attention_pad=64, dtype='bfloat16')
    models.validate_model_config(cfg)
    assert models.build(cfg).attention_pad == 64


@pytest.mark.slow  # compiles the step twice
def test_donation_does_not_change_the_step():
    """The benchmark's step with and without donating the state: bit-identical state after two steps."""
    config = experiments.get_config('crate_mae_test')
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    results = []
    for donate in (True, False):
        state, step, batch_sharding = benchmark.build(config, mesh, donate)
        batch = benchmark.synthetic_batch(config, 16, batch_sharding)
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((float(metrics['loss']), jax.device_get(state.params)))
    assert results[0][0] == results[1][0]
    jax.tree.map(np.testing.assert_array_equal, results[0][1], results[1][1])
