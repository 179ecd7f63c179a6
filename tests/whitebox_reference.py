"""Independent float64 NumPy versions of the white-box measures, written from their formulas (not from cratemae/).

The reference tool's coding rate is computed here in its own N x N form, and the paper-exact variant by
orthonormalising each U_k with a QR decomposition, so that the library's h x h and U_k^T U_k forms are checked
against other routes to the same numbers. The tokens come from tests/numpy_reference.py's float64 encoder.
"""

import numpy as np

try:
    import numpy_reference as ref
except ImportError:  # tests/ imported as a package
    from tests import numpy_reference as ref

EPS = 0.01


def coding_rate_tokens(x, eps=EPS):
    """The reference tool's R^c: per-token l2 normalisation over h, then sum_k 1/2 logdet(I_N + h/(N eps) X_k X_k^T).

    x: (..., K, N, h). Returns (...).
    """
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    n, h = x.shape[-2:]
    gram = np.einsum('...nh,...mh->...nm', x, x)
    return 0.5 * np.linalg.slogdet(np.eye(n) + h / (n * eps) * gram)[1].sum(-1)


def coding_rate_orthonormal(y, u_blocks, eps=EPS):
    """The paper's R^c with orthonormal subspaces: X_k = Y Q_k (Q_k from the QR of U_k), no token normalisation,
    sum_k 1/2 logdet(I_N + h/(N eps) X_k X_k^T) in the N x N form.

    y: (..., N, d) tokens (already through LN1); u_blocks: (K, d, h). Returns (...).
    """
    y = np.asarray(y, np.float64)
    n = y.shape[-2]
    total = 0.0
    for u in u_blocks:
        q, _ = np.linalg.qr(np.asarray(u, np.float64))
        x = y @ q
        h = x.shape[-1]
        gram = np.einsum('...nh,...mh->...nm', x, x)
        total = total + 0.5 * np.linalg.slogdet(np.eye(n) + h / (n * eps) * gram)[1]
    return total


def zero_fraction(z):
    """#{z == 0} / (N d) per sample, z: (B, N, d)."""
    z = np.asarray(z, np.float64)
    return np.array([np.count_nonzero(sample == 0) / sample.size for sample in z])


def heads(w, k):
    """(B, N, d) -> (B, K, N, h): contiguous column blocks."""
    b, n, d = w.shape
    return w.reshape(b, n, k, d // k).transpose(0, 2, 1, 3)


def layer_measures(sd, images, cfg):
    """Per-layer batch means and spreads of the measures on unmasked images, from the float64 encoder.

    sd: a reference-layout state dict (torch names, Linear weights [out, in]). Returns {name: (L,)} for the measures
    and their '_std': the unbiased std for coding rates and effects, the population std for the zero fractions.
    """
    d, k, depth = cfg.width, cfg.heads, cfg.depth
    e = ref.patch_embed(np.asarray(images, np.float64), sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'])
    b = e.shape[0]
    cls = np.asarray(sd['cls_token'], np.float64).reshape(1, 1, d)
    z = np.concatenate([np.broadcast_to(cls, (b, 1, d)), e], axis=1)
    z = z + ref.sincos_pos_embed(d, int(round(np.sqrt(e.shape[1]))))[None]
    per_sample = {}
    for layer in range(depth):
        prefix = f'blocks.{layer}.'
        z_next, inter = ref.crate_encoder_layer(z, sd, prefix, k, cfg.block_norm_eps, cfg.ista_step, cfg.ista_lambda)
        ln1 = lambda t: ref.layer_norm(
            t,
            sd[prefix + 'layers.0.0.norm.weight'],  # noqa: E731
            sd[prefix + 'layers.0.0.norm.bias'],
            cfg.block_norm_eps,
        )
        u_t = np.asarray(sd[prefix + 'layers.0.0.fn.qkv.weight'], np.float64)  # torch [out, in] = U
        u_blocks = [u_t.T[:, i * (d // k) : (i + 1) * (d // k)] for i in range(k)]  # U_k: (d, h), W_k = Y U_k
        points = {'input': z, 'mid': inter['mssa_out'], 'output': inter['ista_out']}
        values = {}
        for name, tokens in points.items():
            y = ln1(tokens)
            values[f'compression_{name}'] = coding_rate_tokens(heads(y @ u_t.T, k))
            values[f'compression_paper_{name}'] = coding_rate_orthonormal(y, u_blocks)
        for suffix in ('', 'paper_'):
            values[f'mssa_effect{"_paper" if suffix else ""}'] = (
                values[f'compression_{suffix}mid'] - values[f'compression_{suffix}input']
            )
            values[f'ista_effect{"_paper" if suffix else ""}'] = (
                values[f'compression_{suffix}output'] - values[f'compression_{suffix}mid']
            )
        values['sparsity_zeros'] = zero_fraction(inter['ista_out'])
        values['sparsity_l0'] = 1.0 - values['sparsity_zeros']
        for key, v in values.items():
            per_sample.setdefault(key, []).append(v)
        z = z_next
    out = {}
    for key, v in per_sample.items():
        v = np.stack(v)  # (L, B)
        out[key] = v.mean(1)
        out[key + '_std'] = v.std(1, ddof=0 if key.startswith('sparsity') else 1)
    return out
