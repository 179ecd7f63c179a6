"""Looking inside the white box: what each CRATE-MAE layer does, measured on a batch, and reconstructions.

Every measure is a pure function of arrays (its equation in the docstring); ``whitebox_measures`` runs the model once
without masking and returns all of them per layer:

  compression_before[l]  R^c of encoder layer l's input, against layer l's own subspaces (the U of its MSSA)
  compression_after[l]   R^c of encoder layer l's output (after ISTA), against the same subspaces
  sparsity_zeros[l]      fraction of exact zeros in layer l's ISTA output
  sparsity_l1_l2[l]      mean over tokens of ||z||_1 / (sqrt(d) ||z||_2) of that output
  inversion_error[l]     ||Y_{L-1-l} - Z^l|| / ||Z^l||: how far decoder layer L-1-l's output is from encoder layer l's
                         input (decoder layer L-1-l is meant to undo encoder layer l; spec §2.6)
  inversion_cosine[l]    mean per-token cosine between the same two token sets (scale-free)

(each also with a ``_std`` over the batch). Layers are numbered from 0 as in the reference's
``get_selfattention_enc(x, layer)``. Pictures of these live in ``cratemae.visualize``; ``launch/inspect.py`` writes
them for a checkpoint.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cratemae import ops

CODING_RATE_EPS = 0.01  # the reference tool's eps, used as eps (not eps^2)
MEASURES = (
    'compression_before',
    'compression_after',
    'sparsity_zeros',
    'sparsity_l1_l2',
    'inversion_error',
    'inversion_cosine',
)
_TINY = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Measures: pure functions of token arrays. Inputs may carry any leading batch axes.


def split_heads(w, heads):
    """(..., N, d) -> (..., K, N, h): head k is the contiguous column block k of W (spec §2.5), h = d / K."""
    *lead, n, d = w.shape
    return jnp.moveaxis(w.reshape(*lead, n, heads, d // heads), -2, -3)


def l2_normalize(x, axis=-1):
    """x / ||x||_2 along ``axis``; a zero vector stays zero (the reference would give NaN)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _TINY)


@jax.jit
def logdet_spd(m):
    """log det M of symmetric positive-definite matrices M (..., n, n), by Gaussian elimination without pivoting:

        det M = prod_j p_j,   p_j = the j-th pivot (diagonal of the j-th Schur complement), p_j > 0 for SPD M.

    Written in jnp (a loop of n rank-1 updates) rather than ``jnp.linalg.cholesky``: on the CPU that calls jaxlib's
    LAPACK kernel, which deadlocked here when two batched Cholesky calls ran at once on a 2-thread XLA pool (each
    waits in ``ParallelBatchMap`` for sub-tasks no free thread can run; jaxlib 0.10.2). For M = I + PSD every pivot
    is >= 1, so no pivoting is needed.
    """
    m = jnp.asarray(m, jnp.float32)
    n = m.shape[-1]
    index = jnp.arange(n)

    def eliminate(j, carry):
        a, total = carry
        pivot = jnp.take(jnp.take(a, j, axis=-1), j, axis=-1)
        column = jnp.where(index > j, jnp.take(a, j, axis=-1), 0.0)
        a = a - column[..., :, None] * column[..., None, :] / pivot[..., None, None]
        return a, total + jnp.log(pivot)

    return jax.lax.fori_loop(0, n, eliminate, (m, jnp.zeros(m.shape[:-2], jnp.float32)))[1]


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


def pca_rgb(features, components=3):
    """Per-patch RGB from the first principal components of patch features (B, L, d), fitted jointly on all B x L:

        F~ = F - mean,  F~ = U S V^T,  c = F~ V[:, :3],  rgb_j = (c_j - min c_j) / (max c_j - min c_j).

    Returns (B, L, components) float32 in [0, 1] (NumPy; the reference's PCA scripts fit sklearn PCA the same way).
    """
    f = np.asarray(features, np.float64)
    b, n, d = f.shape
    flat = f.reshape(b * n, d)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    vt = vt[:components]
    largest = np.abs(vt).argmax(1)
    vt = vt * np.sign(vt[np.arange(len(vt)), largest])[:, None]  # deterministic sign: the largest loading positive
    c = flat @ vt.T
    if c.shape[1] < components:  # fewer features than components
        c = np.pad(c, ((0, 0), (0, components - c.shape[1])))
    lo, hi = c.min(0), c.max(0)
    return ((c - lo) / np.maximum(hi - lo, _TINY)).reshape(b, n, components).astype(np.float32)


def batch_mean_std(values, valid=None):
    """Mean and standard deviation over the last (batch) axis, weighting samples by ``valid`` (B,) in {0, 1}."""
    values = jnp.asarray(values, jnp.float32)
    w = jnp.ones(values.shape[-1], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    total = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(values * w, axis=-1) / total
    var = jnp.sum(jnp.square(values - mean[..., None]) * w, axis=-1) / total
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
    out = {
        'encoder_inputs': jnp.concatenate([jnp.asarray(z0, jnp.float32)[None], ista_out[:-1]], axis=0),
        'projection': f32(enc['mssa']['projection']),
        'mssa_out': f32(enc['mssa_out']),
        'ista_out': ista_out,
    }
    if with_decoder:
        out['decoder_tokens'] = f32(state['intermediates']['decoder']['layers']['tokens'])
    return out


def _per_sample_measures(model, params, inter):
    """(L, B) arrays of every measure from the intermediates."""
    layers = params['encoder']['layers']
    project = jax.vmap(subspace_projection, in_axes=(0, 0, 0, 0, None))  # over layers, each with its own LN1 and U
    after = project(
        inter['ista_out'],
        layers['norm1']['scale'],
        layers['norm1']['bias'],
        layers['mssa']['qkv']['kernel'],
        model.block_norm_eps,
    )
    out = {
        # "before" is exactly what layer l's MSSA attends with: the sown projection of its input.
        'compression_before': coding_rate(split_heads(inter['projection'], model.heads)),
        # "after" is the layer output against the same U_l (not U_{l+1}: that would just be compression_before[l+1]).
        'compression_after': coding_rate(split_heads(after, model.heads)),
    }
    out['sparsity_zeros'], out['sparsity_l1_l2'] = sparsity(inter['ista_out'])
    if 'decoder_tokens' in inter:
        out['inversion_error'], out['inversion_cosine'] = inversion(inter['encoder_inputs'], inter['decoder_tokens'])
    return out


def whitebox_fn(model, with_decoder=True):
    """Returns fn(params, images, valid=None) -> {measure: (L,), measure + '_std': (L,)} of jax arrays.

    Pure and traceable: wrap it in ``jax.jit`` (with in_shardings for a sharded eval batch) in a training loop.
    ``valid`` (B,) excludes padded samples from the means. The inversion measures are present only when
    ``with_decoder`` and the params hold a reference-layout decoder.
    """
    check_whitebox(model)

    def fn(params, images, valid=None):
        inter = unmasked_intermediates(model, params, images, with_decoder and measures_inversion(model, params))
        out = {}
        for key, values in _per_sample_measures(model, params, inter).items():
            out[key], out[key + '_std'] = batch_mean_std(values, valid)
        return out

    return fn


@functools.lru_cache(maxsize=16)
def _jitted(model, with_decoder):
    return jax.jit(whitebox_fn(model, with_decoder))


def whitebox_measures(model, params, images, valid=None):
    """All white-box measures of ``model`` with ``params`` on ``images`` (B, H, W, C), without masking.

    Returns {name: np.ndarray (L,)} for each name of ``MEASURES`` (the inversion ones only with a decoder) and its
    ``name + '_std'`` (batch standard deviation); entry l is encoder layer l (0-based). Compiled once per model.
    """
    return {k: np.asarray(v) for k, v in jax.device_get(_jitted(model, True)(params, images, valid)).items()}


def flatten_for_logging(measures, prefix='whitebox', include_std=False):
    """{'compression_before': [r0, r1, ...], ...} -> {'whitebox/compression_before/layer_00': r0, ...} (floats)."""
    flat = {}
    for key in sorted(measures):
        if key.endswith('_std') and not include_std:
            continue
        for layer, value in enumerate(np.asarray(measures[key]).reshape(-1)):
            flat[f'{prefix}/{key}/layer_{layer:02d}'] = float(value)
    return flat


# ----------------------------------------------------------------------------------------------------------------
# Reconstructions.


def _to_pixels(images, mean, std):
    """Undo the dataset normalisation and map to uint8."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def reconstruction_panels(images, pred, mask, patch_size, mean, std, norm_pix=False):
    """Four NHWC uint8 panels per image: original, masked input, reconstruction, reconstruction with the visible
    patches pasted back. With a norm-pix model the prediction is in per-patch standardised units, so it is mapped back
    with each target patch's own mean and standard deviation (as FAIR's visualisation does)."""
    images = np.asarray(images, np.float32)
    channels = images.shape[-1]
    target = np.asarray(ops.patchify(images, patch_size))
    pred = np.asarray(pred, np.float32)
    if norm_pix:
        mu = target.mean(-1, keepdims=True)
        sigma = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
        pred = pred * sigma + mu
    mask = np.asarray(mask, np.float32)[..., None]
    grey = np.full_like(target, 0.0)
    masked = target * (1 - mask) + grey * mask
    pasted = target * (1 - mask) + pred * mask
    to_image = lambda t: np.asarray(ops.unpatchify(t, patch_size, channels))  # noqa: E731
    return [_to_pixels(x, mean, std) for x in (images, to_image(masked), to_image(pred), to_image(pasted))]


def reconstruction_grid(images, pred, mask, patch_size, mean, std, norm_pix=False, pad=2):
    """One uint8 HWC picture: a row per image, columns original / masked / reconstruction / reconstruction+visible."""
    panels = reconstruction_panels(images, pred, mask, patch_size, mean, std, norm_pix)
    n, h, w, c = panels[0].shape
    grid = np.full((n * (h + pad) + pad, 4 * (w + pad) + pad, c), 255, np.uint8)
    for row in range(n):
        for col, panel in enumerate(panels):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            grid[top : top + h, left : left + w] = panel[row]
    return grid
