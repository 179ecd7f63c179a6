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


class TSSA(nn.Module):
    """Token statistics self-attention (ToST): O(Y U^T) W_o^T + b_o with the per-head temperature tau (K,) (ops.tssa)."""

    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y):
        width = y.shape[-1]
        w = nn.Dense(
            width, use_bias=False, kernel_init=xavier, dtype=self.dtype, param_dtype=self.param_dtype, name='qkv'
        )(y)
        self.sow('intermediates', 'projection', w)
        # ToST starts tau at 1 and keeps it out of weight decay; 1-dim, so our optimizer's rule (>= 2 dims) does too.
        temperature = self.param('temperature', nn.initializers.ones, (self.heads,), self.param_dtype)
        out, membership = ops.token_statistics_attention(w, temperature, self.heads)
        self.sow('intermediates', 'membership', membership)
        return nn.Dense(width, kernel_init=xavier, dtype=self.dtype, param_dtype=self.param_dtype, name='out')(out)


class OvercompleteSparseCoding(nn.Module):
    """CRATE-alpha's block z_K(x) D_1^T: ``steps`` ISTA steps from zero in D (d, expansion*d), decoded by D_1."""

    expansion: int = 4
    steps: int = 2
    step: float = 0.1
    lam: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1], self.expansion * x.shape[-1])
        # CRATE-alpha's Flax model: kaiming_uniform on (d, m), fan_in = d: U(-sqrt(6/d), sqrt(6/d)).
        dictionary = self.param('dictionary', _kaiming_uniform, shape, self.param_dtype).astype(self.dtype)
        decoding = self.param('decoding_dictionary', _kaiming_uniform, shape, self.param_dtype).astype(self.dtype)
        code = ops.overcomplete_sparse_code(x.astype(self.dtype), dictionary, self.step, self.lam, self.steps)
        self.sow('intermediates', 'code', code)
        return code @ decoding.T


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
    attention_operator: str = 'mssa'  # or 'tssa' (CRATE blocks only)
    sparse_block: str = 'ista'  # or 'crate_alpha' (CRATE blocks only)
    sparse_expansion: int = 4
    sparse_steps: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def norm(self, name):
        return nn.LayerNorm(
            epsilon=self.norm_eps, use_fast_variance=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def mssa(self, name='mssa'):
        return MSSA(self.heads, self.attention, self.dtype, self.param_dtype, self.attention_pad, name=name)

    def compress(self):
        """The compression operator: MSSA (module 'mssa') or TSSA (module 'tssa')."""
        if self.attention_operator == 'tssa':
            return TSSA(self.heads, self.dtype, self.param_dtype, name='tssa')
        return self.mssa()

    def overcomplete(self):
        return OvercompleteSparseCoding(
            self.sparse_expansion,
            self.sparse_steps,
            self.ista_step,
            self.ista_lambda,
            self.dtype,
            self.param_dtype,
            name='sparse_coding',
        )


class CrateEncoderLayer(_Layer):
    """Z^{l+1/2} = Z + MSSA(LN1(Z));  Z^{l+1} = ISTA(LN2(Z^{l+1/2})) (no residual around ISTA).

    attention_operator='tssa' puts TSSA in MSSA's place; sparse_block='crate_alpha' makes the second half
    Z^{l+1} = Z^{l+1/2} + z_K(LN2(Z^{l+1/2})) D_1^T (with its residual, as CRATE-alpha). The sown names stay
    'mssa_out' and 'ista_out' (the half-step and the layer output) whichever operators fill them.
    """

    @nn.compact
    def __call__(self, z, _=None):
        z = z + self.compress()(self.norm('norm1')(z))
        self.sow('intermediates', 'mssa_out', z)
        if self.sparse_block == 'crate_alpha':
            z = z + self.overcomplete()(self.norm('norm2')(z))
        else:
            z = ISTA(self.ista_step, self.ista_lambda, self.fused_ista, self.dtype, self.param_dtype, name='ista')(
                self.norm('norm2')(z)
            )
        self.sow('intermediates', 'ista_out', z)
        return z, None


class CrateDecoderLayer(_Layer):
    """Approximate inverse of an encoder layer: G = LN1(Y) A^T;  Y+ = G - MSSA(LN2(G)) (note the minus sign).

    Ours for the successors' operators (docs/model.md §7): attention_operator='tssa' subtracts TSSA in MSSA's place;
    sparse_block='crate_alpha' replaces the linear A by the decoder's own overcomplete block with its residual,
    G = Y + z_K(LN1(Y)) D_1^T.
    """

    @nn.compact
    def __call__(self, y, _=None):
        if self.sparse_block == 'crate_alpha':
            g = y + self.overcomplete()(self.norm('norm1')(y))
            y = g - self.compress()(self.norm('norm2')(g))
            self.sow('intermediates', 'tokens', y)
            return y, None
        g = nn.Dense(
            y.shape[-1],
            use_bias=False,
            kernel_init=_kaiming_uniform,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='unsparsify',
        )(self.norm('norm1')(y))
        y = g - self.compress()(self.norm('norm2')(g))
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
