"""The layers of the masked autoencoders: CRATE encoder and decoder layers, ViT layers, and the scanned stack.

The CRATE layers declare parameters and call the operators of ``cratemae.ops``; each sows its intermediate tokens
(and attention maps with the einsum attention) into the 'intermediates' collection for the white-box diagnostics.
This costs nothing unless that collection is made mutable. Layers are stacked with ``nn.scan``, so a depth-12
encoder compiles one layer.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cratemae import ops

xavier = nn.initializers.xavier_uniform()
# The reference's ISTA dictionary D and decoder A are raw nn.Parameters initialised by torch's kaiming_uniform_
# (a=0, fan_in=d): U(-sqrt(6/d), sqrt(6/d)).
_kaiming_uniform = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
# Xavier-uniform on the conv weight's [d, C*p*p] view, not Flax's receptive-field fans.
patch_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(0.02)

_REMAT_POLICIES = {
    'full': None,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def conv_bias_init(fan_in):
    """torch Conv2d's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), kept by the reference."""
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class MSSA(nn.Module):
    """Multi-head subspace self-attention: concat_k(softmax(W_k W_k^T / sqrt(h)) W_k) W_o^T + b_o, W = Y U^T."""

    heads: int
    attention: str = 'einsum'
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_pad: int = 0  # pad the tokens to a multiple of this inside attention (dot_product_attention, cudnn)

    @nn.compact
    def __call__(self, y):
        width = y.shape[-1]
        w = nn.Dense(
            width, use_bias=False, kernel_init=xavier, dtype=self.dtype, param_dtype=self.param_dtype, name='qkv'
        )(y)
        self.sow('intermediates', 'projection', w)
        out, probs = ops.subspace_attention(w, self.heads, self.attention, self.attention_pad)
        if probs is not None:
            self.sow('intermediates', 'attention', probs)
        return nn.Dense(width, kernel_init=xavier, dtype=self.dtype, param_dtype=self.param_dtype, name='out')(out)


class ISTA(nn.Module):
    """ISTA sparsification step Z = ReLU(V + eta (V D - V D^T D) - eta lambda), D of shape (d, d)."""

    step: float = 0.1
    lam: float = 0.5
    fused: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, v):
        width = v.shape[-1]
        dictionary = self.param('dictionary', _kaiming_uniform, (width, width), self.param_dtype)
        return ops.ista(v.astype(self.dtype), dictionary.astype(self.dtype), self.step, self.lam, self.fused)


class _Layer(nn.Module):
    """Common fields of the scanned layers; ``__call__(x, _) -> (x, None)`` is the nn.scan signature."""

    heads: int
    norm_eps: float = 1e-5
    ista_step: float = 0.1
    ista_lambda: float = 0.5
    fused_ista: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    attention: str = 'einsum'
    attention_pad: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def norm(self, name):
        return nn.LayerNorm(
            epsilon=self.norm_eps, use_fast_variance=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def mssa(self, name='mssa'):
        return MSSA(self.heads, self.attention, self.dtype, self.param_dtype, self.attention_pad, name=name)


class CrateEncoderLayer(_Layer):
    """Z^{l+1/2} = Z + MSSA(LN1(Z));  Z^{l+1} = ISTA(LN2(Z^{l+1/2})) (no residual around ISTA)."""

    @nn.compact
    def __call__(self, z, _=None):
        z = z + self.mssa()(self.norm('norm1')(z))
        self.sow('intermediates', 'mssa_out', z)
        z = ISTA(self.ista_step, self.ista_lambda, self.fused_ista, self.dtype, self.param_dtype, name='ista')(
            self.norm('norm2')(z)
        )
        self.sow('intermediates', 'ista_out', z)
        return z, None


class CrateDecoderLayer(_Layer):
    """Approximate inverse of an encoder layer: G = LN1(Y) A^T;  Y+ = G - MSSA(LN2(G)) (note the minus sign)."""

    @nn.compact
    def __call__(self, y, _=None):
        g = nn.Dense(
            y.shape[-1],
            use_bias=False,
            kernel_init=_kaiming_uniform,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='unsparsify',
        )(self.norm('norm1')(y))
        y = g - self.mssa()(self.norm('norm2')(g))
        self.sow('intermediates', 'tokens', y)
        return y, None


class VitLayer(_Layer):
    """Pre-LN ViT block: X + Attn(LN1(X)), then X + MLP(LN2(X)) with an exact-GELU MLP (timm ``Block``)."""

    @nn.compact
    def __call__(self, x, _=None):
        width = x.shape[-1]
        dense = lambda features, name, bias=True: nn.Dense(  # noqa: E731
            features, use_bias=bias, kernel_init=xavier, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        y = self.norm('norm1')(x)
        q, k, v = jnp.split(dense(3 * width, 'qkv', self.qkv_bias)(y), 3, axis=-1)
        b, n, _ = q.shape
        heads = lambda t: t.reshape(b, n, self.heads, width // self.heads)  # noqa: E731
        if self.attention != 'einsum':
            scale = 1.0 / (width // self.heads) ** 0.5
            attn = ops.dot_product_attention(heads(q), heads(k), heads(v), scale, self.attention, self.attention_pad)
        else:
            logits = jnp.einsum('bqkh,bskh->bkqs', heads(q), heads(k), preferred_element_type=jnp.float32)
            probs = jax.nn.softmax(logits / (width // self.heads) ** 0.5, axis=-1)
            self.sow('intermediates', 'attention', probs)
            attn = jnp.einsum('bkqs,bskh->bqkh', probs.astype(v.dtype), heads(v))
        x = x + dense(width, 'proj')(attn.reshape(b, n, width))
        self.sow('intermediates', 'mssa_out', x)
        y = nn.gelu(dense(int(width * self.mlp_ratio), 'fc1')(self.norm('norm2')(x)), approximate=False)
        x = x + dense(width, 'fc2')(y)
        self.sow('intermediates', 'tokens', x)
        return x, None


_LAYERS = {
    ('crate', 'encoder'): CrateEncoderLayer,
    ('crate', 'decoder'): CrateDecoderLayer,
    ('vit', 'encoder'): VitLayer,
    ('vit', 'decoder'): VitLayer,
}


class Stack(nn.Module):
    """``depth`` layers of one kind under nn.scan (one compiled layer), with an optional remat policy."""

    block: str
    role: str
    depth: int
    layer_kwargs: Any
    remat: str = 'none'
    unroll: int = 1

    @nn.compact
    def __call__(self, x):
        layer = _LAYERS[(self.block, self.role)]
        if self.remat != 'none':
            layer = nn.remat(layer, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        scanned = nn.scan(
            layer,
            variable_axes={'params': 0, 'intermediates': 0},
            split_rngs={'params': True},
            length=self.depth,
            unroll=self.unroll,
        )
        x, _ = scanned(**dict(self.layer_kwargs), name='layers')(x, None)
        return x
