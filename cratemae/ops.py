"""White-box operators of CRATE-MAE as pure functions.

Tokens are rows: Z has shape (B, N, d) with token 0 the class token and token 1 + i*G + j the patch in grid row i,
column j. A torch ``nn.Linear`` weight W (shape [out, in]) computes y = x W^T + b; every formula below is in that row
form, so a Flax Dense kernel is W^T.

The Flax modules in ``cratemae.models`` only declare parameters and call these functions, so the maths lives in one
place and can be tested against a float64 NumPy reference written from the spec.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Position embeddings, patches, masking.


def sincos_pos_embed(width: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding with a zero row for the class token.

    With q = width/4 and w_k = 10000^(-k/q), k = 0..q-1, the patch at grid row i, column j gets

        P[1 + i*G + j] = [sin(j w), cos(j w), sin(i w), cos(i w)]

    (first half encodes the column j, second half the row i), and P[0] = 0. Computed in float32 as the reference
    CRATE code does; FAIR MAE's float64 copy differs by <= 7.2e-7.

    Returns:
      (1 + grid_size**2, width) float32 array.
    """
    if width % 4:
        raise ValueError(f'sin-cos position embedding needs a width divisible by 4, got {width}.')
    q = width // 4
    omega = np.arange(q, dtype=np.float32) / np.float32(q)
    omega = np.float32(1.0) / np.float32(10000.0) ** omega
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32), indexing='ij'
    )

    def half(pos):
        angles = np.einsum('m,k->mk', pos.reshape(-1), omega).astype(np.float32)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    patches = np.concatenate([half(cols), half(rows)], axis=1)
    return np.concatenate([np.zeros((1, width), np.float32), patches], axis=0).astype(np.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Cuts NHWC images into flattened patches in (u, v, c) order (channel fastest): the loss-target layout.

    t[b, i*G + j, (u*p + v)*C + c] = x[b, i*p + u, j*p + v, c]; returns (B, L, p*p*C).
    """
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def patchify_cuv(images: jax.Array, patch_size: int) -> jax.Array:
    """Flattened patches in (c, u, v) order (channel slowest): the torch patch-embedding conv's layout.

    t[b, i*G + j, c*p*p + u*p + v] = x[b, i*p + u, j*p + v, c]; returns (B, L, C*p*p).
    """
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Inverse of ``patchify``: (B, L, p*p*C) in (u, v, c) order back to NHWC images of side sqrt(L)*p."""
    b, num_patches, _ = patches.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f'unpatchify needs a square number of patches, got {num_patches}.')
    p = patch_size
    x = patches.reshape(b, grid, grid, p, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, grid * p, grid * p, channels)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """keep = int(L * (1 - r)) in Python float arithmetic, as the reference (r = 0.9, L = 196 gives 19, not 20)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: jax.Array, mask_ratio: float):
    """Per-sample random masking from explicit noise.

    Per sample, the keep = int(L(1 - r)) patches with the smallest noise are visible, the others masked.

    Args:
      noise: (B, L) floats.
      mask_ratio: r in [0, 1).
    Returns:
      ids_keep (B, keep) int32: the visible patch indices, in ascending-noise order;
      ids_restore (B, L) int32: the rank of each patch in that order (inverts the shuffle);
      mask (B, L) float32: 1 for masked patches, 0 for visible ones.
    """
    keep = num_kept(noise.shape[1], mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1, stable=True)
    ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
    mask = (ids_restore >= keep).astype(jnp.float32)
    return ids_shuffle[:, :keep].astype(jnp.int32), ids_restore.astype(jnp.int32), mask


def _per_patch_error(pred, target, norm_pix):
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return jnp.mean(jnp.square(pred - target), axis=-1)


def masked_reconstruction_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool = False
) -> jax.Array:
    """Mean squared error over the masked patches, pooled over the batch.

    With norm_pix, each target patch is standardised: t <- (t - mean(t)) / sqrt(var(t) + 1e-6) with the unbiased
    variance (divide by P - 1), as torch's ``.var``. Then l[b, l] = mean_P (pred - t)^2 and
    loss = sum(m * l) / sum(m). Computed in float32.
    """
    return jnp.sum(_per_patch_error(pred, target, norm_pix) * mask) / jnp.sum(mask)


def per_sample_reconstruction_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix: bool = False
) -> jax.Array:
    """The same error per sample, l_b = sum_l m l[b, l] / sum_l m (B,). Every sample masks the same number of
    patches, so the mean of l_b over a batch equals ``masked_reconstruction_loss``."""
    return jnp.sum(_per_patch_error(pred, target, norm_pix) * mask, axis=-1) / jnp.sum(mask, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Compression (MSSA) and sparsification (ISTA) steps, and their decoder inverses.


ATTENTION_IMPLEMENTATIONS = ('einsum', 'dot_product_attention', 'cudnn')


def padded_length(n: int, pad_multiple: int) -> int:
    """N' = m * ceil(N / m), the token count inside attention when padding to a multiple of m (m <= 1: N' = N)."""
    return -(-n // pad_multiple) * pad_multiple if pad_multiple > 1 else n


def dot_product_attention(q, k, v, scale: float, implementation: str = 'dot_product_attention', pad_multiple: int = 0):
    """softmax_row(Q_k K_k^T * scale) V_k per head through ``jax.nn.dot_product_attention``; (B, N, K, h) in and out.

    implementation 'dot_product_attention' lets JAX choose (XLA today); 'cudnn' asks for cuDNN's fused flash kernel
    (GPU only, bf16/fp16 only; it never materialises the (B, K, N, N) logits, which is most of the memory and time
    of the einsum form at 197 tokens).

    pad_multiple m > 1 zero-pads the token axis to N' = m * ceil(N / m) inside this function only (197 -> 256 for
    m = 64 or 128), because fused kernels work on tiles of 64/128 rows and some shapes only have fast kernels when
    aligned. key_value_seq_lengths = N drops the padded keys from every softmax (their logits are replaced by a large
    negative number before the exponential, so they get exactly zero weight in float32), which makes the first N
    output rows equal the unpadded attention; the N' - N padded query rows are computed and sliced off, so they get
    no gradient.
    """
    backend = {'dot_product_attention': None, 'cudnn': 'cudnn'}[implementation]
    b, n = q.shape[:2]
    n_pad = padded_length(n, pad_multiple)
    if n_pad == n:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=backend)
    widths = ((0, 0), (0, n_pad - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))  # one pad when q, k, v are the same array (XLA CSE)
    lengths = jnp.full((b,), n, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation=backend)
    return out[:, :n]


def subspace_attention(w: jax.Array, heads: int, implementation: str = 'einsum', pad_multiple: int = 0):
    """Multi-head subspace self-attention on the shared projection W = Y U^T.

    Split W (B, N, d) into K column blocks W_k (B, N, h), h = d / K. The same block serves as query, key and value:

        A_k = softmax_row(W_k W_k^T / sqrt(h)),   O = concat_k(A_k W_k).

    Logits and softmax are computed in float32.

    Args:
      w: (B, N, d) shared projection.
      heads: K.
      implementation: 'einsum' (XLA; also returns the attention maps), 'dot_product_attention'
        (``jax.nn.dot_product_attention``, XLA today; returns no maps) or 'cudnn' (its cuDNN flash kernel; GPU, bf16).
      pad_multiple: for the two dot_product_attention forms, pad the tokens to a multiple of this inside attention
        only, with the padded keys masked (see ``dot_product_attention``); 0 or 1 = no padding.
    Returns:
      O (B, N, d) in w's dtype, and A (B, K, N, N) float32 or None.
    """
    b, n, d = w.shape
    h = d // heads
    wh = w.reshape(b, n, heads, h)
    scale = 1.0 / math.sqrt(h)
    if implementation in ('dot_product_attention', 'cudnn'):
        out = dot_product_attention(wh, wh, wh, scale, implementation, pad_multiple)
        return out.reshape(b, n, d), None
    if implementation != 'einsum':
        raise ValueError(
            f'attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}.'
        )
    logits = jnp.einsum('bqkh,bskh->bkqs', wh, wh, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bkqs,bskh->bqkh', probs.astype(w.dtype), wh)
    return out.reshape(b, n, d), probs


def mssa(y: jax.Array, qkv_kernel: jax.Array, out_kernel: jax.Array, out_bias: jax.Array, heads: int) -> jax.Array:
    """The MSSA compression step (without its residual): MSSA(Y) = concat_k(softmax(W_k W_k^T/sqrt(h)) W_k) W_o^T + b_o.

    W = Y U^T with one bias-free projection U (``qkv_kernel`` = U^T) used as query, key and value; W_o, b_o the output
    projection. In the encoder Z^{l+1/2} = Z + MSSA(LN(Z)); in the decoder it is subtracted.
    """
    out, _ = subspace_attention(y @ qkv_kernel, heads)
    return out @ out_kernel + out_bias


def ista(v: jax.Array, dictionary: jax.Array, step: float, lam: float, fused: bool = False) -> jax.Array:
    """One ISTA sparsification step, started from the normalised tokens V (no residual):

        Z = ReLU(V + eta (V D - V D^T D) - eta lambda),

    a proximal-gradient step on 1/2 ||v - D z||^2 + lambda ||z||_1 with z >= 0 (column form
    z <- ReLU(v + eta D^T (v - D v) - eta lambda)). D is the (d, d) dictionary, stored untransposed as the reference's
    ``fn.weight``.

    With ``fused``, the linear part is applied as one matrix M = I + eta (D - D^T D): Z = ReLU(V M - eta lambda).
    That is the same map but it rounds differently (about 1e-6 relative in float32). The three-matmul form is the
    reference's; a config that leaves ``model.fused_ista`` unset gets its platform's choice (fused on a CPU, where it
    is faster; ``models.PLATFORM_DEFAULTS``).
    """
    if fused:
        d = dictionary.shape[0]
        dictionary32 = dictionary.astype(jnp.float32)
        m = jnp.eye(d, dtype=jnp.float32) + step * (dictionary32 - dictionary32.T @ dictionary32)
        return jax.nn.relu(v @ m.astype(v.dtype) - step * lam)
    grad_sparse = (v @ dictionary.T) @ dictionary
    grad_dense = v @ dictionary
    return jax.nn.relu(v + step * (grad_dense - grad_sparse) - step * lam)


def unsparsify(y: jax.Array, kernel: jax.Array) -> jax.Array:
    """The decoder's linear inverse of ISTA: G = Y A^T (``kernel`` = A^T; column form g = A y)."""
    return y @ kernel


# ----------------------------------------------------------------------------------------------------------------
# The successors' operators: CRATE-alpha's overcomplete sparse coding and ToST's token-statistics attention.
# Row form as above; the MAE variants that use them are ours (docs/model.md §7).


def overcomplete_sparse_code(x: jax.Array, dictionary: jax.Array, step: float, lam: float, steps: int) -> jax.Array:
    """The non-negative sparse code of x in an overcomplete dictionary by ``steps`` unrolled ISTA steps from zero.

    D is (d, m) with m = expansion * d (CRATE-alpha: m = 4d), stored as their ``D``. Row form, z_0 = 0:

        z_{k+1} = ReLU(z_k - eta (z_k D^T - x) D - eta lambda),   k = 0 .. steps - 1

    (column form z <- ReLU(z + eta D^T (x - D z) - eta lambda): proximal gradient on 1/2 ||x - D z||^2 + lambda ||z||_1,
    z >= 0). The first step from zero is ReLU(eta x D - eta lambda). x is (..., n, d), one row per token (n is whatever
    token count the caller passes; tokens are coded independently); returns (..., n, m).
    """
    z = jax.nn.relu(step * (x @ dictionary) - step * lam)
    for _ in range(steps - 1):
        z = jax.nn.relu(z - step * ((z @ dictionary.T - x) @ dictionary) - step * lam)
    return z


def overcomplete_sparse_coding(
    x: jax.Array, dictionary: jax.Array, decoding_dictionary: jax.Array, step: float, lam: float, steps: int
) -> jax.Array:
    """CRATE-alpha's sparse-coding block (without its residual): x_hat = z_K(x) D_1^T, D_1 (d, m) its own dictionary.

    z_K is ``overcomplete_sparse_code``; decoding with a separate D_1 instead of D is CRATE-alpha's "decoupled
    dictionary". In the encoder Z^{l+1} = Z^{l+1/2} + x_hat(LN(Z^{l+1/2})). Returns (..., n, d).
    """
    return overcomplete_sparse_code(x, dictionary, step, lam, steps) @ decoding_dictionary.T


def token_statistics_attention(w: jax.Array, temperature: jax.Array, heads: int):
    """Token statistics self-attention (ToST's TSSA, as their ``AttentionTSSA``) on the projection W = Y U^T.

    Split W (B, n, d) into K heads W_k (n, h), h = d / K; n is the number of tokens passed in (all 1 + L tokens with
    mask tokens in the encoder, 1 + keep in the visible-only encoder). Per head k, token i, coordinate j:

        W~_k[:, j] = W_k[:, j] / max(||W_k[:, j]||_2, 1e-12)               (each coordinate over the n tokens)
        Pi[i, k]   = softmax_k(tau_k * sum_j W~_k[i, j]^2)                   (soft membership of token i over heads)
        s_k[j]     = sum_i Pi[i, k] W_k[i, j]^2 / (sum_i Pi[i, k] + 1e-8)   (membership-weighted second moment)
        O_k[i, j]  = -Pi[i, k] W_k[i, j] / (1 + s_k[j])

    O = concat_k(O_k). This is n times the negative gradient in W of ``tssa_objective`` with Pi held fixed. Time and
    memory are linear in n (no n x n matrix). Statistics in float32.

    Returns:
      O (B, n, d) in w's dtype, and Pi (B, n, K) float32.
    """
    b, n, d = w.shape
    wh = w.reshape(b, n, heads, d // heads).astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jnp.square(wh), axis=1, keepdims=True))
    energy = jnp.sum(jnp.square(wh / jnp.maximum(norms, 1e-12)), axis=-1)  # (B, n, K)
    membership = jax.nn.softmax(energy * temperature.astype(jnp.float32), axis=-1)
    weights = membership / (jnp.sum(membership, axis=1, keepdims=True) + 1e-8)
    second_moment = jnp.einsum('bnk,bnkh->bkh', weights, jnp.square(wh))
    out = -wh * membership[..., None] / (1.0 + second_moment[:, None])
    return out.reshape(b, n, d).astype(w.dtype), membership


def tssa(
    y: jax.Array, qkv_kernel: jax.Array, temperature: jax.Array, out_kernel: jax.Array, out_bias: jax.Array, heads: int
) -> jax.Array:
    """The TSSA compression step (without its residual): TSSA(Y) = O(Y U^T) W_o^T + b_o, O of
    ``token_statistics_attention``, U bias-free (``qkv_kernel`` = U^T), tau (K,) the per-head temperature. In the
    encoder Z^{l+1/2} = Z + TSSA(LN(Z)); in the decoder it is subtracted, as MSSA is."""
    out, _ = token_statistics_attention(y @ qkv_kernel, temperature, heads)
    return out @ out_kernel + out_bias


def tssa_objective(w: jax.Array, membership: jax.Array, heads: int) -> jax.Array:
    """ToST's variational compression term with f(x) = log(1 + x), the function ToST's code differentiates:

        R_var(W, Pi) = 1/2 sum_k (n_k / n) sum_j log(1 + sum_i Pi[i, k] W_k[i, j]^2 / n_k),   n_k = sum_i Pi[i, k]

    over the n tokens of W (B, n, d) with memberships Pi (B, n, K); returns (B,). A TSSA step with the output projection
    tied to U descends it (``token_statistics_attention``).
    """
    b, n, d = w.shape
    wh = w.reshape(b, n, heads, d // heads).astype(jnp.float32)
    pi = membership.astype(jnp.float32)
    counts = jnp.sum(pi, axis=1)  # (B, K)
    moments = jnp.einsum('bnk,bnkh->bkh', pi, jnp.square(wh)) / counts[..., None]
    return 0.5 * jnp.sum(counts / n * jnp.sum(jnp.log1p(moments), axis=-1), axis=-1)
