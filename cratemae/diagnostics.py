"""Looking inside the white box: what each CRATE-MAE encoder layer does, measured on a batch (measures only; the
pictures of them are ``cratemae.visualize``).

Encoder layer l (numbered from 0) maps Z^l -> Z^{l+1/2} = Z^l + MSSA(LN1(Z^l)) -> Z^{l+1} = ISTA(LN2(Z^{l+1/2})).
``whitebox_measures`` runs the model once without masking and returns, per layer:

  compression_input[l]   R^c(LN1(Z^l) U_l^T): the MSSA input in layer l's subspaces. This is the reference's hook
                         (a forward hook on ``qkv`` of block l) and the curve of its layer-wise figure.
  compression_mid[l]     R^c(LN1(Z^{l+1/2}) U_l^T): the MSSA output Z^{l+1/2}, same LN1 and U_l.
  compression_output[l]  R^c(LN1(Z^{l+1}) U_l^T): the layer (ISTA) output, same LN1 and U_l.
  mssa_effect[l]         compression_mid - compression_input (negative = the MSSA step compressed)
  ista_effect[l]         compression_output - compression_mid (what the ISTA step did to the same rate)
  sparsity_zeros[l]      fraction of exact zeros of Z^{l+1} (the reference's l0 measure)
  sparsity_l0[l]         1 - sparsity_zeros = ||Z^{l+1}||_0 / (N d), the value the reference's sparsity plot shows
  sparsity_l1_l2[l]      mean over tokens of ||z||_1 / (sqrt(d) ||z||_2) of Z^{l+1}
  inversion_error[l]     ||Y^{L-l} - Z^l|| / ||Z^l||: decoder layer L-1-l's output against encoder layer l's input
  inversion_cosine[l]    mean per-token cosine between the same two token sets (scale-free)

With the successors' operators (docs/model.md §7) the same measures apply unchanged, with TSSA's U_l in MSSA's
place; for CRATE-alpha's sparse coding the sparsity measures are those of its code z_K (width 4d), since the layer
output Z^{l+1} = Z^{l+1/2} + D_1 z_K is not sparse. A TSSA encoder adds ToST's own objective
(``ops.tssa_objective``, Pi of the layer's input held fixed):

  tssa_objective_input[l]  R_var(LN1(Z^l) U_l^T, Pi_l)       tssa_objective_mid[l]  R_var(LN1(Z^{l+1/2}) U_l^T, Pi_l)
  tssa_effect[l]           mid - input (negative = the TSSA step lowered the objective it descends)

and with ``paper=True`` also ``compression_paper_{input,mid,output}`` and ``{mssa,ista}_effect_paper``: the same
three points without the per-token normalisation and with each U_k replaced by an orthonormal basis of its span
(``coding_rate_in_subspaces``), which separates U's conditioning from compression. Each has a ``_std`` over the batch:
the unbiased one (torch's ``.std()``, as the reference's coding-rate tool) except for the two zero-fraction measures,
whose spread is the population one (NumPy's ``np.std``, as the reference's ``cal_sparsity``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cratemae import ops

CODING_RATE_EPS = 0.01  # the reference tool's eps, used as eps (not eps^2)
POINTS = ('input', 'mid', 'output')  # MSSA input Z^l, MSSA output Z^{l+1/2}, layer output Z^{l+1}
MEASURES = (
    'compression_input',
    'compression_mid',
    'compression_output',
    'mssa_effect',
    'ista_effect',
    'sparsity_zeros',
    'sparsity_l0',
    'sparsity_l1_l2',
    'inversion_error',
    'inversion_cosine',
)
PAPER_MEASURES = (
    'compression_paper_input',
    'compression_paper_mid',
    'compression_paper_output',
    'mssa_effect_paper',
    'ista_effect_paper',
)
TSSA_MEASURES = ('tssa_objective_input', 'tssa_objective_mid', 'tssa_effect')
POPULATION_STD = ('sparsity_zeros', 'sparsity_l0')  # the reference's cal_sparsity uses np.std
_TINY = 1e-12
_LOGDET_BLOCK = 8


# ----------------------------------------------------------------------------------------------------------------
# Measures: pure functions of token arrays. Inputs may carry any leading batch axes.


def split_heads(w, heads):
    """(..., N, d) -> (..., K, N, h): head k is the contiguous column block k of W (docs/model.md §2.5), h = d / K."""
    *lead, n, d = w.shape
    return jnp.moveaxis(w.reshape(*lead, n, heads, d // heads), -2, -3)


def l2_normalize(x, axis=-1):
    """x / ||x||_2 along ``axis``; a zero vector stays zero (the reference would give NaN)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _TINY)


@jax.jit
def logdet_spd(m):
    """log det M of symmetric positive-definite matrices M (..., n, n), by Gaussian elimination without pivoting:

        det M = prod_j p_j,   p_j = the j-th pivot (top-left entry of the j-th Schur complement), p_j > 0 for SPD M.

    Written in jnp rather than ``jnp.linalg.cholesky``: on the CPU that calls jaxlib's LAPACK kernel, which
    deadlocked here when two batched Cholesky calls ran at once on a 2-thread XLA pool (each waits in
    ``ParallelBatchMap`` for sub-tasks no free thread can run; jaxlib 0.10.2). For M = I + PSD every pivot is >= 1,
    so no pivoting is needed. The pivots are eliminated in blocks of 8 (a loop each), and each block's remaining
    Schur complement is cut out before the next: about half the arithmetic of updating the whole matrix at every
    step, and a loop per block instead of n unrolled steps keeps the compile short.
    """
    a = jnp.asarray(m, jnp.float32)
    total = jnp.zeros(a.shape[:-2], jnp.float32)
    while a.shape[-1]:
        n, block = a.shape[-1], min(_LOGDET_BLOCK, a.shape[-1])
        index = jnp.arange(n)

        def eliminate(j, carry, index=index):
            a, total = carry
            pivot = jnp.take(jnp.take(a, j, axis=-1), j, axis=-1)
            column = jnp.where(index > j, jnp.take(a, j, axis=-1), 0.0)
            a = a - column[..., :, None] * column[..., None, :] / pivot[..., None, None]
            return a, total + jnp.log(pivot)

        a, total = jax.lax.fori_loop(0, block, eliminate, (a, total))
        a = a[..., block:, block:]
    return total


@functools.partial(jax.jit, static_argnames='eps')
def coding_rate(x, eps=CODING_RATE_EPS):
    """Compression term R^c of per-head token sets, summed over heads (the reference's ``vis_utils/coding_rate.py``).

    x: (..., K, N, h). Each token vector is l2-normalised over h, giving X_k (N, h), and

        R_k = 1/2 logdet(I_N + (h / (N eps)) X_k X_k^T) = 1/2 logdet(I_h + (h / (N eps)) X_k^T X_k),
        R^c = sum_k R_k.

    The two forms are equal (Sylvester's determinant identity); the h x h one is used (cheaper when N > h), in
    float32 (the matrix is I plus a PSD Gram, so well conditioned). Lower R^c = tokens concentrated on fewer
    directions within each head's subspace. Known answers: zero tokens give 0; N identical unit tokens give
    K/2 log(1 + h/eps); N <= h orthonormal tokens give K N/2 log(1 + h/(N eps)). Returns (...) float32.
    """
    x = l2_normalize(jnp.asarray(x, jnp.float32))
    n, h = x.shape[-2:]
    gram = jnp.einsum('...nh,...ng->...hg', x, x, precision=jax.lax.Precision.HIGHEST)
    return 0.5 * jnp.sum(logdet_spd(jnp.eye(h, dtype=jnp.float32) + (h / (n * eps)) * gram), axis=-1)


def coding_rate_in_subspaces(w, u_gram, eps=CODING_RATE_EPS):
    """The paper's compression term with orthonormal subspaces and no per-token normalisation, summed over heads.

    w: (..., K, N, h), the tokens' coordinates W_k = Y U_k in the (not orthonormal) bases U_k (d, h) of the K
    subspaces; u_gram: (K, h, h), U_k^T U_k. With Q_k = U_k (U_k^T U_k)^{-1/2}, an orthonormal basis of span(U_k),
    and X_k = Y Q_k = W_k (U_k^T U_k)^{-1/2}:

        R_k = 1/2 logdet(I_h + (h / (N eps)) X_k^T X_k)
            = 1/2 [logdet(U_k^T U_k + (h / (N eps)) W_k^T W_k) - logdet(U_k^T U_k)],     R^c = sum_k R_k.

    Any orthonormal basis of span(U_k) gives the same R_k (X_k changes by an h x h rotation), so this depends on the
    subspaces only, not on how U stretches them. The paper writes the factor h / (N eps^2); the reference's 0.01 is
    kept as that eps^2, so the constant equals the reference tool's. Unlike ``coding_rate`` the token norms count:
    tokens that shrink inside a subspace lower R_k. Returns (...) float32.
    """
    w = jnp.asarray(w, jnp.float32)
    u_gram = jnp.asarray(u_gram, jnp.float32)
    n, h = w.shape[-2:]
    gram = jnp.einsum('...nh,...ng->...hg', w, w, precision=jax.lax.Precision.HIGHEST)
    rate = logdet_spd(u_gram + (h / (n * eps)) * gram) - logdet_spd(u_gram)
    return 0.5 * jnp.sum(rate, axis=-1)


def subspace_gram(qkv_kernel, heads):
    """U_k^T U_k (K, h, h) of the K column blocks U_k (d, h) of ``qkv_kernel`` = U^T (d, d) (W_k = Y U_k)."""
    u = jnp.asarray(qkv_kernel, jnp.float32)
    d = u.shape[-1]
    u = jnp.moveaxis(u.reshape(u.shape[0], heads, d // heads), 1, 0)  # (K, d, h)
    return jnp.einsum('kdh,kdg->khg', u, u, precision=jax.lax.Precision.HIGHEST)


def layer_norm(x, scale, bias, eps):
    """LN(x) = (x - mean) / sqrt(var + eps) * scale + bias over the last axis (biased variance, as the model's)."""
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def subspace_projection(tokens, norm_scale, norm_bias, qkv_kernel, norm_eps):
    """The shared projection W = LN1(Z) U^T of an encoder layer (``qkv_kernel`` = U^T, (d, d)): (..., N, d).

    Its K column blocks W_k = LN1(Z) U_k^T are the tokens' coordinates in the layer's K subspaces, the features
    MSSA attends with and the reference's coding-rate hooks measure.
    """
    y = layer_norm(tokens, jnp.asarray(norm_scale, jnp.float32), jnp.asarray(norm_bias, jnp.float32), norm_eps)
    return jnp.einsum('...nd,de->...ne', y, jnp.asarray(qkv_kernel, jnp.float32), precision=jax.lax.Precision.HIGHEST)


def sparsity(z):
    """Two sparsity measures of tokens z (..., N, d), per sample (...):

        zeros  = #{z_nj == 0} / (N d)                          (the reference's l0 measure; its plots show 1 - zeros)
        l1_l2  = 1/N sum_n ||z_n||_1 / (sqrt(d) ||z_n||_2)      in [1/sqrt(d), 1]

    l1_l2 is 1 for a token with d equal magnitudes and 1/sqrt(d) for a one-hot token; it also sees near-zeros that
    ``zeros`` misses. A token that is entirely zero counts as 0 (maximally sparse).
    """
    z = jnp.asarray(z, jnp.float32)
    d = z.shape[-1]
    zeros = jnp.mean((z == 0).astype(jnp.float32), axis=(-2, -1))
    l1 = jnp.sum(jnp.abs(z), axis=-1)
    l2 = jnp.sqrt(jnp.sum(jnp.square(z), axis=-1))
    l1_l2 = jnp.mean(l1 / (np.sqrt(d) * jnp.maximum(l2, _TINY)), axis=-1)
    return zeros, l1_l2


def relative_error(x, ref):
    """||x - ref||_F / ||ref||_F over the last two axes (tokens, channels), per sample."""
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    num = jnp.sqrt(jnp.sum(jnp.square(x - ref), axis=(-2, -1)))
    return num / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(ref), axis=(-2, -1))), _TINY)


def token_cosine(x, ref):
    """1/N sum_n <x_n, ref_n> / (||x_n|| ||ref_n||), per sample: 1 when every token points the same way."""
    x, ref = l2_normalize(jnp.asarray(x, jnp.float32)), l2_normalize(jnp.asarray(ref, jnp.float32))
    return jnp.mean(jnp.sum(x * ref, axis=-1), axis=-1)


def inversion(encoder_inputs, decoder_outputs):
    """How well decoder layer L-1-l undoes encoder layer l, for l = 0..L-1.

    encoder_inputs[l] = Z^l (the input of encoder layer l; Z^0 is the embedded, position-coded sequence),
    decoder_outputs[j] = Y^{j+1} (the output of decoder layer j, before the final decoder norm), both (L, B, N, d):

        error[l]  = ||Y^{L-l} - Z^l||_F / ||Z^l||_F,     cosine[l] = token_cosine(Y^{L-l}, Z^l).

    Zero error means an exact inverse. Nothing in the loss asks the intermediate tokens to match (only the pixels
    after ``decoder_pred``), so the error says how literally the learned decoder inverts the encoder, layer by layer.
    Returns two (L, B) arrays.
    """
    mirrored = decoder_outputs[::-1]
    return relative_error(mirrored, encoder_inputs), token_cosine(mirrored, encoder_inputs)


def class_attention(projection, heads):
    """Class-token attention to the patches, from the shared projection W (..., N, d) (any attention implementation):

        a_k = softmax(W_k w_{k,0} / sqrt(h))[1:]      (..., K, L)

    i.e. row 0 of A_k = softmax(W_k W_k^T / sqrt(h)) without its class-token column (as the reference's
    ``get_selfattention_enc(x, layer)[:, :, 0, 1:]``). Reshape L to the (G, G) grid for a map.
    """
    w = split_heads(jnp.asarray(projection, jnp.float32), heads)
    logits = jnp.einsum('...kh,...knh->...kn', w[..., 0, :], w) / np.sqrt(w.shape[-1])
    return jax.nn.softmax(logits, axis=-1)[..., 1:]


def batch_mean_std(values, valid=None, ddof=1):
    """Mean and standard deviation over the last (batch) axis, weighting samples by ``valid`` (B,) in {0, 1}.

    ddof=1 is the unbiased estimate sum w (x - mean)^2 / (sum w - 1) (torch's ``.std()``, the reference's coding-rate
    spread), ddof=0 the population one (``np.std``); a single valid sample has spread 0.
    """
    values = jnp.asarray(values, jnp.float32)
    w = jnp.ones(values.shape[-1], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    total = jnp.sum(w)
    mean = jnp.sum(values * w, axis=-1) / jnp.maximum(total, 1.0)
    var = jnp.sum(jnp.square(values - mean[..., None]) * w, axis=-1) / jnp.maximum(total - ddof, 1.0)
    return mean, jnp.sqrt(var)


# ----------------------------------------------------------------------------------------------------------------
# The unmasked forward pass and the white-box measures of a model.


def has_decoder(params):
    """Whether a params tree holds the decoder (an encoder-only export does not)."""
    return 'decoder' in params and 'decoder_norm' in params


def check_whitebox(model):
    """Raises ValueError unless the encoder is made of CRATE layers (the measures need U and the ISTA output)."""
    if model.encoder_block != 'crate':
        raise ValueError(
            f"White-box measures need CRATE encoder layers (encoder_block='crate'), got {model.encoder_block!r}: a ViT "
            'block has no shared subspace projection and no ISTA step to measure.'
        )


def measures_inversion(model, params):
    """Inversion is measured for the reference layout: CRATE decoder of the encoder's depth reading the latent."""
    return (
        has_decoder(params)
        and model.decoder_block == 'crate'
        and model.encoder_sees_mask_tokens
        and model.decoder_depth == model.depth
    )


def attention_module(model):
    """The name of the encoder layers' compression module: 'mssa' or 'tssa' (``model.attention_operator``)."""
    return 'tssa' if getattr(model, 'attention_operator', 'mssa') == 'tssa' else 'mssa'


def _unmasked_pass(module, images, with_decoder):
    """Flax method: encoder (and decoder) on all N tokens, no masking, as the reference's ``forward_encoder(x, 0)``.

    Returns Z^0 (``MaskedAutoencoder.embed``, as ``encode`` builds it); the layers sow the rest.
    """
    z0 = module.embed(images)
    z = module.encoder(z0)
    if with_decoder:
        module.decoder(module.encoder_norm(z))  # reference layout: the decoder reads the latent directly
    return z0


def unmasked_intermediates(model, params, images, with_decoder=None):
    """Tokens of every layer on unmasked images (traceable). Returns a dict of float32 arrays:

    encoder_inputs (L, B, N, d)   Z^l, the input of encoder layer l
    projection     (L, B, N, d)   W = LN1(Z^l) U_l^T of layer l (the reference's "key" features)
    mssa_out       (L, B, N, d)   Z^{l+1/2}
    ista_out       (L, B, N, d)   Z^{l+1}
    decoder_tokens (L, B, N, d)   Y^{j+1}, output of decoder layer j (only with the decoder)
    """
    check_whitebox(model)
    if with_decoder is None:
        with_decoder = measures_inversion(model, params)
    z0, state = model.apply(
        {'params': params},
        images,
        with_decoder,
        method=_unmasked_pass,
        mutable=['intermediates'],
    )
    enc = state['intermediates']['encoder']['layers']
    f32 = lambda x: jnp.asarray(x[0], jnp.float32)  # sow stores a 1-tuple
    ista_out = f32(enc['ista_out'])
    attention = enc[attention_module(model)]
    out = {
        'encoder_inputs': jnp.concatenate([jnp.asarray(z0, jnp.float32)[None], ista_out[:-1]], axis=0),
        'projection': f32(attention['projection']),
        'mssa_out': f32(enc['mssa_out']),
        'ista_out': ista_out,
    }
    if 'membership' in attention:
        out['membership'] = f32(attention['membership'])  # (L, B, N, K)
    if 'sparse_coding' in enc:
        out['sparse_code'] = f32(enc['sparse_coding']['code'])  # (L, B, N, m)
    if with_decoder:
        out['decoder_tokens'] = f32(state['intermediates']['decoder']['layers']['tokens'])
    return out


def _per_sample_measures(model, params, inter, paper=False):
    """(L, B) arrays of every measure from the intermediates."""
    layers = params['encoder']['layers']
    kernels = layers[attention_module(model)]['qkv']['kernel']  # (L, d, d): U_l^T of each layer
    project = jax.vmap(subspace_projection, in_axes=(0, 0, 0, 0, None))  # over layers, each with its own LN1 and U
    projections = {
        # The input point is exactly what layer l's MSSA attends with: the projection it sows.
        'input': inter['projection'],
        # The later points go through the same LN1 and U_l (not U_{l+1}: against those the output point would just be
        # the next layer's input point), so the three differ only in the tokens.
        'mid': project(
            inter['mssa_out'], layers['norm1']['scale'], layers['norm1']['bias'], kernels, model.block_norm_eps
        ),
        'output': project(
            inter['ista_out'], layers['norm1']['scale'], layers['norm1']['bias'], kernels, model.block_norm_eps
        ),
    }
    rates = coding_rate(split_heads(jnp.stack([projections[p] for p in POINTS]), model.heads))  # one batched call
    out = {f'compression_{p}': rate for p, rate in zip(POINTS, rates)}
    out['mssa_effect'] = out['compression_mid'] - out['compression_input']
    out['ista_effect'] = out['compression_output'] - out['compression_mid']
    if paper:
        gram = jax.vmap(subspace_gram, in_axes=(0, None))(kernels, model.heads)[:, None]  # (L, 1, K, h, h)
        rates = coding_rate_in_subspaces(split_heads(jnp.stack([projections[p] for p in POINTS]), model.heads), gram)
        out.update({f'compression_paper_{p}': rate for p, rate in zip(POINTS, rates)})
        out['mssa_effect_paper'] = out['compression_paper_mid'] - out['compression_paper_input']
        out['ista_effect_paper'] = out['compression_paper_output'] - out['compression_paper_mid']
    if 'membership' in inter:
        objective = jax.vmap(ops.tssa_objective, in_axes=(0, 0, None))  # over layers
        out['tssa_objective_input'] = objective(projections['input'], inter['membership'], model.heads)
        out['tssa_objective_mid'] = objective(projections['mid'], inter['membership'], model.heads)
        out['tssa_effect'] = out['tssa_objective_mid'] - out['tssa_objective_input']
    out['sparsity_zeros'], out['sparsity_l1_l2'] = sparsity(inter.get('sparse_code', inter['ista_out']))
    out['sparsity_l0'] = 1.0 - out['sparsity_zeros']
    if 'decoder_tokens' in inter:
        out['inversion_error'], out['inversion_cosine'] = inversion(inter['encoder_inputs'], inter['decoder_tokens'])
    return out


def whitebox_fn(model, with_decoder=True, paper=False):
    """Returns fn(params, images, valid=None) -> {measure: (L,), measure + '_std': (L,)} of jax arrays.

    Pure and traceable: wrap it in ``jax.jit`` (with in_shardings for a sharded eval batch) in a training loop.
    ``valid`` (B,) excludes padded samples from the means. The inversion measures are present only when
    ``with_decoder`` and the params hold a reference-layout decoder; ``PAPER_MEASURES`` only with ``paper``.
    """
    check_whitebox(model)

    def fn(params, images, valid=None):
        inter = unmasked_intermediates(model, params, images, with_decoder and measures_inversion(model, params))
        out = {}
        for key, values in _per_sample_measures(model, params, inter, paper).items():
            out[key], out[key + '_std'] = batch_mean_std(values, valid, ddof=0 if key in POPULATION_STD else 1)
        return out

    return fn


@functools.lru_cache(maxsize=16)
def _jitted(model, with_decoder, paper):
    return jax.jit(whitebox_fn(model, with_decoder, paper))


def whitebox_measures(model, params, images, valid=None, paper=False):
    """All white-box measures of ``model`` with ``params`` on ``images`` (B, H, W, C), without masking.

    Returns {name: np.ndarray (L,)} for each name of ``MEASURES`` (the inversion ones only with a decoder; those of
    ``PAPER_MEASURES`` too with ``paper``) and its ``name + '_std'`` (the batch spread); entry l is encoder layer l
    (0-based). Compiled once per model.
    """
    return {k: np.asarray(v) for k, v in jax.device_get(_jitted(model, True, paper)(params, images, valid)).items()}


def flatten_for_logging(measures, prefix='whitebox', include_std=False):
    """{'compression_input': [r0, r1, ...], ...} -> {'whitebox/compression_input/layer_00': r0, ...} (floats)."""
    flat = {}
    for key in sorted(measures):
        if key.endswith('_std') and not include_std:
            continue
        for layer, value in enumerate(np.asarray(measures[key]).reshape(-1)):
            flat[f'{prefix}/{key}/layer_{layer:02d}'] = float(value)
    return flat
