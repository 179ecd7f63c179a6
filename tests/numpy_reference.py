"""Independent float64 NumPy reference of CRATE-MAE and its ViT-MAE baselines.

Written from the equations of docs/model.md alone (not from cratemae/), so that the parity tests compare two
independent implementations. Parameters come as a dict ``torch_name -> np.ndarray`` in the layout of the
reference PyTorch state dict (docs/model.md §2.10): Linear weights are [out, in] and compute ``y = x W^T + b``,
the patch-embedding conv weight is [d, C, p, p].

Everything is computed in float64, except the sin-cos table, which the reference computes in float32
(docs/model.md §2.3) and is then widened.

Model configs are read with ``cfg.get(key, default)``; a plain dict or an ml_collections ConfigDict
with the keys of the cratemae model config both work.
"""

import math

import numpy as np

_DEFAULTS = dict(
    image_size=224,
    patch_size=16,
    channels=3,
    encoder_block='crate',
    decoder_block='crate',
    width=768,
    depth=12,
    heads=12,
    decoder_width=768,
    decoder_depth=12,
    decoder_heads=12,
    mlp_ratio=4.0,
    qkv_bias=False,
    ista_step=0.1,
    ista_lambda=0.5,
    encoder_sees_mask_tokens=True,
    mask_ratio=0.75,
    norm_pix_loss=False,
    block_norm_eps=1e-5,
    final_norm_eps=1e-6,
)


def _cfg(cfg, key):
    value = cfg.get(key, None) if cfg is not None else None
    return _DEFAULTS[key] if value is None else value


def _f64(x):
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Patches and embeddings.


def _grid_view(images, p):
    """NHWC (B, G*p, G*p, C) -> (B, G, p, G, p, C), axes (b, i, u, j, v, c)."""
    b, h, w, c = images.shape
    assert h == w and h % p == 0, images.shape
    g = h // p
    return images.reshape(b, g, p, g, p, c)


def patchify(images, p):
    """Loss-target patches: t[b, i*G+j, (u*p+v)*C + c] = x[b, p*i+u, p*j+v, c] (order u, v, c)."""
    x = _grid_view(images, p)
    b, g, _, _, _, c = x.shape
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)


def unpatchify(patches, p, channels=3):
    """Inverse of ``patchify``: (B, L, p*p*C) -> (B, G*p, G*p, C)."""
    b, l, _ = patches.shape
    g = int(round(math.sqrt(l)))
    assert g * g == l
    x = patches.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def patchify_cuv(images, p):
    """Conv-order patches: e[b, i*G+j, (c*p+u)*p + v] = x[b, p*i+u, p*j+v, c] (order c, u, v)."""
    x = _grid_view(images, p)
    b, g, _, _, _, c = x.shape
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, c * p * p)


def patch_embed(images, weight, bias):
    """Stride-p conv, written as its definition (docs/model.md §2.2).

    e[b, i*G+j, :] = sum_{c,u,v} W[:, c, u, v] x[b, p*i+u, p*j+v, c] + bias, W in R^{d x C x p x p}.
    """
    weight = _f64(weight)
    p = weight.shape[-1]
    x = _grid_view(_f64(images), p)
    e = np.einsum('biujvc,dcuv->bijd', x, weight)
    b, g = e.shape[:2]
    return e.reshape(b, g * g, -1) + _f64(bias)


def sincos_pos_embed(width, grid_size, cls_token=True):
    """Fixed 2-D sin-cos table (docs/model.md §2.3), computed in float32 like the reference.

    q = width/4, w_k = 10000^(-k/q); P[1+i*G+j] = [sin(j w), cos(j w), sin(i w), cos(i w)]; row 0 = 0.
    Returns float32 of shape (1+G*G, width) (or (G*G, width) without the class row).
    """
    assert width % 4 == 0
    q = width // 4
    omega = np.arange(q, dtype=np.float32) / np.float32(q)  # k / q
    omega = (np.float32(1.0) / np.power(np.float32(10000.0), omega)).astype(np.float32)
    idx = np.arange(grid_size, dtype=np.float32)
    jj = np.tile(idx[None, :], (grid_size, 1)).reshape(-1)  # column index j of patch i*G+j
    ii = np.tile(idx[:, None], (1, grid_size)).reshape(-1)  # row index i
    out_j = (jj[:, None] * omega[None, :]).astype(np.float32)
    out_i = (ii[:, None] * omega[None, :]).astype(np.float32)
    table = np.concatenate([np.sin(out_j), np.cos(out_j), np.sin(out_i), np.cos(out_i)], axis=1)
    table = table.astype(np.float32)
    if cls_token:
        table = np.concatenate([np.zeros((1, width), np.float32), table], axis=0)
    return table


# --------------------------------------------------------------------------------------------------
# Masking and loss.


def num_keep(num_patches, mask_ratio):
    """keep = int(L * (1 - r)) with Python float semantics (r=0.9, L=196 -> 19)."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise, mask_ratio):
    """Masks from explicit noise (docs/model.md §2.4).

    order = argsort(noise) (stable); the first keep indices are visible.
    Returns mask (B, L; 1 = masked, float64), ids_keep (B, keep) in noise order, ids_restore (B, L).
    """
    noise = np.asarray(noise)
    b, l = noise.shape
    keep = num_keep(l, mask_ratio)
    ids_shuffle = np.argsort(noise, axis=1, kind='stable')
    ids_restore = np.argsort(ids_shuffle, axis=1, kind='stable')
    ids_keep = ids_shuffle[:, :keep]
    mask = np.ones((b, l), np.float64)
    np.put_along_axis(mask, ids_keep, 0.0, axis=1)
    return mask, ids_keep, ids_restore


def mae_loss(images, pred, mask, p, norm_pix_loss=False):
    """Mean squared error over masked patches, pooled over the batch (docs/model.md §2.8).

    Target t = patchify(images) (u, v, c order); with norm_pix_loss each patch is
    (t - mean) / sqrt(var_unbiased + 1e-6). loss = sum(m * mean_k (pred - t)^2) / sum(m).
    """
    t = patchify(_f64(images), p)
    if norm_pix_loss:
        mean = t.mean(-1, keepdims=True)
        var = t.var(-1, ddof=1, keepdims=True)
        t = (t - mean) / np.sqrt(var + 1e-6)
    per_patch = ((_f64(pred) - t) ** 2).mean(-1)
    mask = _f64(mask)
    with np.errstate(invalid='ignore'):  # r = 0 gives 0/0 = NaN, as the reference
        return float((per_patch * mask).sum() / mask.sum())


# --------------------------------------------------------------------------------------------------
# Building blocks.


def layer_norm(x, scale, bias, eps):
    """Affine LayerNorm with two-pass biased variance: (x - mu) / sqrt(mean((x - mu)^2) + eps)."""
    x = _f64(x)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _f64(scale) + _f64(bias)


def linear(x, weight, bias=None):
    """torch nn.Linear: y = x W^T + b with W in R^{out x in}."""
    y = _f64(x) @ _f64(weight).T
    return y if bias is None else y + _f64(bias)


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def mssa(y, w_qkv, w_out, b_out, heads):
    """Multi-head subspace self-attention with one shared projection (docs/model.md §2.5).

    W = Y U^T split into K heads W_k (N x h); A_k = softmax(W_k W_k^T / sqrt(h));
    out = concat_k(A_k W_k) W_o^T + b_o. Input y is already normalised.
    Returns (out, attention (B, K, N, N), projection W (B, N, d)).
    """
    w = linear(y, w_qkv)
    b, n, d = w.shape
    h = d // heads
    wh = w.reshape(b, n, heads, h).transpose(0, 2, 1, 3)  # (B, K, N, h)
    attn = softmax(np.einsum('bknh,bkmh->bknm', wh, wh) / math.sqrt(h))
    o = np.einsum('bknm,bkmh->bknh', attn, wh).transpose(0, 2, 1, 3).reshape(b, n, d)
    return linear(o, w_out, b_out), attn, w


def ista(v, dictionary, step, lambd):
    """One ISTA step from v: ReLU(V + eta (V D - V D^T D) - eta lambda), D untransposed, no residual."""
    v = _f64(v)
    d = _f64(dictionary)
    return np.maximum(v + step * (v @ d - (v @ d.T) @ d) - step * lambd, 0.0)


def unsparsify(y, a):
    """Decoder linear step G = Y A^T (A in torch [out, in] layout, no bias)."""
    return linear(y, a)


def decoder_compress_inverse(g, norm_scale, norm_bias, eps, w_qkv, w_out, b_out, heads):
    """Y+ = G - MSSA'(LN2(G)) (minus sign; residual base is G)."""
    out, _, _ = mssa(layer_norm(g, norm_scale, norm_bias, eps), w_qkv, w_out, b_out, heads)
    return _f64(g) - out


def gelu(x):
    """Exact erf GELU: x/2 (1 + erf(x / sqrt 2))."""
    from math import erf

    verf = np.vectorize(erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + verf(x / math.sqrt(2.0)))


def vit_attention(y, sd, prefix, heads):
    """timm Attention: q, k, v = split(Y W_qkv^T + b), softmax(q k^T / sqrt(h)) v, proj."""
    qkv = linear(y, sd[prefix + 'qkv.weight'], sd.get(prefix + 'qkv.bias'))
    b, n, three_d = qkv.shape
    d = three_d // 3
    h = d // heads
    qkv = qkv.reshape(b, n, 3, heads, h).transpose(2, 0, 3, 1, 4)  # (3, B, K, N, h)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = softmax(np.einsum('bknh,bkmh->bknm', q, k) / math.sqrt(h))
    o = np.einsum('bknm,bkmh->bknh', attn, v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return linear(o, sd[prefix + 'proj.weight'], sd[prefix + 'proj.bias']), attn


def vit_block(x, sd, prefix, heads, eps):
    """timm Block: x + Attn(LN1 x); then x + fc2(GELU(fc1(LN2 x)))."""
    y = layer_norm(x, sd[prefix + 'norm1.weight'], sd[prefix + 'norm1.bias'], eps)
    a, attn = vit_attention(y, sd, prefix + 'attn.', heads)
    x = _f64(x) + a
    y = layer_norm(x, sd[prefix + 'norm2.weight'], sd[prefix + 'norm2.bias'], eps)
    hid = gelu(linear(y, sd[prefix + 'mlp.fc1.weight'], sd[prefix + 'mlp.fc1.bias']))
    return x + linear(hid, sd[prefix + 'mlp.fc2.weight'], sd[prefix + 'mlp.fc2.bias']), attn


def crate_encoder_layer(z, sd, prefix, heads, eps, step, lambd):
    """Z+1/2 = Z + MSSA(LN1 Z); Z+1 = ISTA(LN2 Z+1/2). Returns (Z+1, intermediates)."""
    y = layer_norm(z, sd[prefix + 'layers.0.0.norm.weight'], sd[prefix + 'layers.0.0.norm.bias'], eps)
    out, attn, proj = mssa(
        y,
        sd[prefix + 'layers.0.0.fn.qkv.weight'],
        sd[prefix + 'layers.0.0.fn.to_out.0.weight'],
        sd[prefix + 'layers.0.0.fn.to_out.0.bias'],
        heads,
    )
    half = _f64(z) + out
    v = layer_norm(half, sd[prefix + 'layers.0.1.norm.weight'], sd[prefix + 'layers.0.1.norm.bias'], eps)
    new = ista(v, sd[prefix + 'layers.0.1.fn.weight'], step, lambd)
    return new, dict(attention=attn, qkv=proj, mssa_out=half, ista_out=new)


def crate_decoder_layer(y, sd, prefix, heads, eps):
    """G = LN1(Y) A^T; Y+ = G - MSSA'(LN2 G)."""
    g = unsparsify(
        layer_norm(y, sd[prefix + 'layers.0.0.norm.weight'], sd[prefix + 'layers.0.0.norm.bias'], eps),
        sd[prefix + 'layers.0.0.fn.weight'],
    )
    return decoder_compress_inverse(
        g,
        sd[prefix + 'layers.0.1.norm.weight'],
        sd[prefix + 'layers.0.1.norm.bias'],
        eps,
        sd[prefix + 'layers.0.1.fn.qkv.weight'],
        sd[prefix + 'layers.0.1.fn.to_out.0.weight'],
        sd[prefix + 'layers.0.1.fn.to_out.0.bias'],
        heads,
    )


# --------------------------------------------------------------------------------------------------
# Whole model.


def _pos_table(sd, key, width, grid):
    if key in sd:
        return _f64(sd[key]).reshape(-1, width)
    return _f64(sincos_pos_embed(width, grid))


def _run_encoder(z, sd, cfg):
    inter = []
    for i in range(_cfg(cfg, 'depth')):
        prefix = 'blocks.%d.' % i
        if _cfg(cfg, 'encoder_block') == 'crate':
            z, it = crate_encoder_layer(
                z,
                sd,
                prefix,
                _cfg(cfg, 'heads'),
                _cfg(cfg, 'block_norm_eps'),
                _cfg(cfg, 'ista_step'),
                _cfg(cfg, 'ista_lambda'),
            )
        else:
            z, attn = vit_block(z, sd, prefix, _cfg(cfg, 'heads'), _cfg(cfg, 'block_norm_eps'))
            it = dict(attention=attn, block_out=z)
        inter.append(it)
    latent = layer_norm(z, sd['norm.weight'], sd['norm.bias'], _cfg(cfg, 'final_norm_eps'))
    return latent, inter


def _run_decoder(y, sd, cfg):
    tokens = []
    for i in range(_cfg(cfg, 'decoder_depth')):
        prefix = 'decoder_blocks.%d.' % i
        if _cfg(cfg, 'decoder_block') == 'crate':
            y = crate_decoder_layer(y, sd, prefix, _cfg(cfg, 'decoder_heads'), _cfg(cfg, 'block_norm_eps'))
        else:
            y, _ = vit_block(y, sd, prefix, _cfg(cfg, 'decoder_heads'), _cfg(cfg, 'block_norm_eps'))
        tokens.append(y)
    y = layer_norm(y, sd['decoder_norm.weight'], sd['decoder_norm.bias'], _cfg(cfg, 'final_norm_eps'))
    pred = linear(y, sd['decoder_pred.weight'], sd['decoder_pred.bias'])
    return pred[:, 1:], tokens


def forward(sd, images, noise, mask_ratio, cfg):
    """Training forward. Returns dict(loss, pred, mask, latent, ids_keep, encoder=[...], decoder=[...]).

    Reference CRATE-MAE (encoder_sees_mask_tokens=True, docs/model.md §2.4-2.8):
      Z0 = [c ; e~] + P with e~_l = mask_token where masked; encoder; LN; decoder on the latent; LN; head.
    FAIR-style (encoder_sees_mask_tokens=False): pos added before masking; the encoder sees
      [c + P0 ; visible tokens in noise order]; then decoder_embed, mask tokens appended and unshuffled,
      + decoder_pos_embed; decoder; LN; head. The latent keeps FAIR's noise order of visible tokens.
    """
    images = _f64(images)
    p = _cfg(cfg, 'patch_size')
    d = _cfg(cfg, 'width')
    e = patch_embed(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'])
    b, l, _ = e.shape
    grid = int(round(math.sqrt(l)))
    mask, ids_keep, ids_restore = random_masking(noise, mask_ratio)
    cls = _f64(sd['cls_token']).reshape(1, 1, d)

    if _cfg(cfg, 'encoder_sees_mask_tokens'):
        pos = _pos_table(sd, 'decoder_pos_embed', d, grid)  # only decoder_pos_embed is used
        mtok = _f64(sd['mask_token']).reshape(1, 1, d)
        e = np.where(mask[:, :, None] > 0, mtok, e)
        z = np.concatenate([np.broadcast_to(cls, (b, 1, d)), e], axis=1) + pos[None]
        latent, enc_inter = _run_encoder(z, sd, cfg)
        pred, dec_tokens = _run_decoder(latent, sd, cfg)
    else:
        dd = _cfg(cfg, 'decoder_width')
        pos = _pos_table(sd, 'pos_embed', d, grid)
        e = e + pos[None, 1:]
        vis = np.take_along_axis(e, ids_keep[:, :, None], axis=1)
        z = np.concatenate([np.broadcast_to(cls + pos[None, :1], (b, 1, d)), vis], axis=1)
        latent, enc_inter = _run_encoder(z, sd, cfg)
        x = linear(latent, sd['decoder_embed.weight'], sd['decoder_embed.bias'])
        mtok = _f64(sd['mask_token']).reshape(1, 1, dd)
        x_ = np.concatenate([x[:, 1:], np.broadcast_to(mtok, (b, l - ids_keep.shape[1], dd))], axis=1)
        x_ = np.take_along_axis(x_, ids_restore[:, :, None], axis=1)
        y = np.concatenate([x[:, :1], x_], axis=1) + _pos_table(sd, 'decoder_pos_embed', dd, grid)[None]
        pred, dec_tokens = _run_decoder(y, sd, cfg)

    loss = mae_loss(images, pred, mask, p, _cfg(cfg, 'norm_pix_loss'))
    return dict(
        loss=loss, pred=pred, mask=mask, latent=latent, ids_keep=ids_keep, encoder=enc_inter, decoder=dec_tokens
    )


def encode(sd, images, cfg):
    """Feature path: no masking, no mask tokens (reference forward_encoder(x, 0.0), docs/model.md §2.11).

    Z0 = [c ; e] + P, encoder, final LN -> (B, N, d). Patches stay in their original order.
    For the FAIR-style variant the class token gets pos row 0 and patches get pos rows 1..L (the same sum).
    """
    d = _cfg(cfg, 'width')
    e = patch_embed(_f64(images), sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'])
    b, l, _ = e.shape
    grid = int(round(math.sqrt(l)))
    key = 'decoder_pos_embed' if _cfg(cfg, 'encoder_sees_mask_tokens') else 'pos_embed'
    pos = _pos_table(sd, key, d, grid)
    cls = _f64(sd['cls_token']).reshape(1, 1, d)
    z = np.concatenate([np.broadcast_to(cls, (b, 1, d)), e], axis=1) + pos[None]
    latent, _ = _run_encoder(z, sd, cfg)
    return latent


# --------------------------------------------------------------------------------------------------
# Parameter counting in torch layout (docs/model.md §1), for cross-checks.


def reference_param_shapes(cfg):
    """torch state-dict shapes of the model described by cfg, incl. pos-embs and decoder_embed."""
    p, c = _cfg(cfg, 'patch_size'), _cfg(cfg, 'channels')
    d, dd = _cfg(cfg, 'width'), _cfg(cfg, 'decoder_width')
    n = (_cfg(cfg, 'image_size') // p) ** 2 + 1
    mask_dim = dd if not _cfg(cfg, 'encoder_sees_mask_tokens') else d
    shapes = {
        'patch_embed.proj.weight': (d, c, p, p),
        'patch_embed.proj.bias': (d,),
        'cls_token': (1, 1, d),
        'mask_token': (1, 1, mask_dim),
        'pos_embed': (1, n, d),
        'decoder_pos_embed': (1, n, dd),
        'norm.weight': (d,),
        'norm.bias': (d,),
        'decoder_embed.weight': (dd, d),
        'decoder_embed.bias': (dd,),
        'decoder_norm.weight': (dd,),
        'decoder_norm.bias': (dd,),
        'decoder_pred.weight': (p * p * c, dd),
        'decoder_pred.bias': (p * p * c,),
    }

    def block(prefix, kind, w, encoder):
        if kind == 'crate':
            s = {
                'layers.0.0.norm.weight': (w,),
                'layers.0.0.norm.bias': (w,),
                'layers.0.1.norm.weight': (w,),
                'layers.0.1.norm.bias': (w,),
            }
            if encoder:
                s.update(
                    {
                        'layers.0.0.fn.qkv.weight': (w, w),
                        'layers.0.0.fn.to_out.0.weight': (w, w),
                        'layers.0.0.fn.to_out.0.bias': (w,),
                        'layers.0.1.fn.weight': (w, w),
                    }
                )
            else:
                s.update(
                    {
                        'layers.0.0.fn.weight': (w, w),
                        'layers.0.1.fn.qkv.weight': (w, w),
                        'layers.0.1.fn.to_out.0.weight': (w, w),
                        'layers.0.1.fn.to_out.0.bias': (w,),
                    }
                )
        else:
            hid = int(w * _cfg(cfg, 'mlp_ratio'))
            s = {
                'norm1.weight': (w,),
                'norm1.bias': (w,),
                'norm2.weight': (w,),
                'norm2.bias': (w,),
                'attn.qkv.weight': (3 * w, w),
                'attn.proj.weight': (w, w),
                'attn.proj.bias': (w,),
                'mlp.fc1.weight': (hid, w),
                'mlp.fc1.bias': (hid,),
                'mlp.fc2.weight': (w, hid),
                'mlp.fc2.bias': (w,),
            }
            if _cfg(cfg, 'qkv_bias'):
                s['attn.qkv.bias'] = (3 * w,)
        return {prefix + k: v for k, v in s.items()}

    for i in range(_cfg(cfg, 'depth')):
        shapes.update(block('blocks.%d.' % i, _cfg(cfg, 'encoder_block'), d, True))
    for i in range(_cfg(cfg, 'decoder_depth')):
        shapes.update(block('decoder_blocks.%d.' % i, _cfg(cfg, 'decoder_block'), dd, False))
    return shapes


def reference_param_count(cfg):
    return sum(int(np.prod(s)) for s in reference_param_shapes(cfg).values())


# --------------------------------------------------------------------------------------------------
# The successors' operators (docs/model.md §7), written from CRATE-alpha's and ToST's equations in column form,
# per token and per head with explicit loops where that keeps the equation visible. Their layers take the Flax
# parameter tree of one layer (kernels [in, out]), since no reference state dict exists for them.


def overcomplete_sparse_code(x, dictionary, step, lambd, steps):
    """z_0 = 0; z <- max(z + eta D^T (x - D z) - eta lambda, 0), ``steps`` times, per token x (column), D (d, m)."""
    x = _f64(x)
    dic = _f64(dictionary)
    flat = x.reshape(-1, x.shape[-1])
    codes = np.zeros((flat.shape[0], dic.shape[1]))
    for t, column in enumerate(flat):
        z = np.zeros(dic.shape[1])
        for _ in range(steps):
            z = np.maximum(z + step * dic.T @ (column - dic @ z) - step * lambd, 0.0)
        codes[t] = z
    return codes.reshape(x.shape[:-1] + (dic.shape[1],))


def overcomplete_sparse_coding(x, dictionary, decoding_dictionary, step, lambd, steps):
    """x_hat = D_1 z_K(x) per token."""
    return overcomplete_sparse_code(x, dictionary, step, lambd, steps) @ _f64(decoding_dictionary).T


def token_statistics_attention(w, temperature, heads):
    """TSSA on W (B, n, d): per head k, Pi = softmax over heads of tau_k ||column-normalised row||^2, weighted second
    moments s_k[j] = sum_i Pi_ik W_kij^2 / (sum_i Pi_ik + 1e-8), O_k = -Pi_k W_k / (1 + s_k). Returns (O, Pi)."""
    w = _f64(w)
    b, n, d = w.shape
    h = d // heads
    out = np.zeros_like(w)
    pi = np.zeros((b, n, heads))
    for s in range(b):
        blocks = [w[s, :, k * h : (k + 1) * h] for k in range(heads)]
        energy = np.stack([((blk / np.maximum(np.sqrt((blk**2).sum(0)), 1e-12)) ** 2).sum(1) for blk in blocks], axis=1)
        pi[s] = softmax(energy * _f64(temperature)[None, :], axis=1)
        for k, blk in enumerate(blocks):
            moment = (pi[s, :, k : k + 1] * blk**2).sum(0) / (pi[s, :, k].sum() + 1e-8)
            out[s, :, k * h : (k + 1) * h] = -pi[s, :, k : k + 1] * blk / (1.0 + moment)
    return out, pi


def tssa_objective(w, pi, heads):
    """R_var = 1/2 sum_k (n_k / n) sum_j log(1 + sum_i Pi_ik W_kij^2 / n_k), n_k = sum_i Pi_ik; per sample (B,)."""
    w = _f64(w)
    pi = _f64(pi)
    b, n, d = w.shape
    h = d // heads
    total = np.zeros(b)
    for k in range(heads):
        blk = w[:, :, k * h : (k + 1) * h]
        counts = pi[:, :, k].sum(1)
        moments = (pi[:, :, k : k + 1] * blk**2).sum(1) / counts[:, None]
        total += 0.5 * counts / n * np.log1p(moments).sum(1)
    return total


def _flax_compress(y, layer, operator, heads):
    """MSSA or TSSA (without residual) from one layer's Flax params."""
    p = layer[operator]
    u = _f64(p['qkv']['kernel']).T
    if operator == 'mssa':
        return mssa(y, u, _f64(p['out']['kernel']).T, p['out']['bias'], heads)[0]
    o, _ = token_statistics_attention(linear(y, u), p['temperature'], heads)
    return linear(o, _f64(p['out']['kernel']).T, p['out']['bias'])


def _flax_norm(x, layer, name, eps):
    return layer_norm(x, layer[name]['scale'], layer[name]['bias'], eps)


def crate_encoder_layer_options(z, layer, cfg):
    """One encoder layer with the operator options: Z+1/2 = Z + C(LN1 Z); Z+1 = ISTA(LN2 Z+1/2) or, for
    crate_alpha, Z+1/2 + D_1 z_K(LN2 Z+1/2). ``layer``: the Flax params of that layer."""
    eps, step, lambd = _cfg(cfg, 'block_norm_eps'), _cfg(cfg, 'ista_step'), _cfg(cfg, 'ista_lambda')
    half = _f64(z) + _flax_compress(_flax_norm(z, layer, 'norm1', eps), layer, cfg['attention_operator'], cfg['heads'])
    v = _flax_norm(half, layer, 'norm2', eps)
    if cfg['sparse_block'] == 'crate_alpha':
        sc = layer['sparse_coding']
        return half + overcomplete_sparse_coding(
            v, sc['dictionary'], sc['decoding_dictionary'], step, lambd, cfg['sparse_steps']
        )
    return ista(v, layer['ista']['dictionary'], step, lambd)


def crate_decoder_layer_options(y, layer, cfg):
    """G = LN1(Y) A^T, or Y + D_1 z_K(LN1 Y) for crate_alpha; Y+ = G - C(LN2 G)."""
    eps, step, lambd = _cfg(cfg, 'block_norm_eps'), _cfg(cfg, 'ista_step'), _cfg(cfg, 'ista_lambda')
    v = _flax_norm(y, layer, 'norm1', eps)
    if cfg['sparse_block'] == 'crate_alpha':
        sc = layer['sparse_coding']
        g = _f64(y) + overcomplete_sparse_coding(
            v, sc['dictionary'], sc['decoding_dictionary'], step, lambd, cfg['sparse_steps']
        )
    else:
        g = v @ _f64(layer['unsparsify']['kernel'])
    operator = cfg['attention_operator']
    return g - _flax_compress(_flax_norm(g, layer, 'norm2', eps), layer, operator, cfg['decoder_heads'])


# --------------------------------------------------------------------------------------------------
# Test helper.


def assert_close(actual, desired, rtol=1e-5, name=''):
    """max |actual - desired| <= rtol * max |desired| (a norm-relative check suited to float32 vs float64)."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (name, actual.shape, desired.shape)
    scale = max(float(np.abs(desired).max()), 1e-30) if desired.size else 1.0
    err = float(np.abs(actual - desired).max()) if desired.size else 0.0
    assert err <= rtol * scale, '%s: max|diff| %.3e > %.1e * max|ref| %.3e (rel %.3e)' % (
        name,
        err,
        rtol,
        scale,
        err / scale,
    )
