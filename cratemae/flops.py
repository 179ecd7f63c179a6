"""Analytic, mask-aware matmul FLOPs of the MAE models, and MFU against a peak table.

Counting rule: only matmuls, FLOPs = 2 * multiply-adds, per image. LayerNorm, softmax, GELU,
ReLU, residual adds and the loss are left out (< 2% at Base). Notation: L = (image/p)^2
patches, C channels, d / d' encoder / decoder width, N token rows seen by a block.

Token rows:
  encoder      N_e = L + 1                      if encoder_sees_mask_tokens (reference CRATE-MAE)
               N_e = keep + 1, keep = int(L * (1 - mask_ratio))   otherwise (FAIR visible-only)
  decoder      N_d = L + 1                      always

Multiply-adds per image:
  patch_embed      L * (p^2 C) * d
  CRATE encoder    qkv N d^2 + attention 2 N^2 d (QK^T and AV over all heads) + out N d^2
                   + ISTA 3 N d^2 (V D, V D^T, (V D^T) D).  fused_ista=True computes
                   M = I + eta (D - D^T D) once per layer and step (d^3) and applies V M (N d^2);
                   the d^3 is amortised over `batch_size` images when given, else left out.
  CRATE decoder    unsparsify N d'^2 + qkv N d'^2 + attention 2 N^2 d' + out N d'^2
  with attention_operator='tssa' (ToST): attention N d (the membership-weighted second moments; the rest is
                   elementwise) instead of 2 N^2 d
  with sparse_block='crate_alpha': the ISTA step (or the decoder's unsparsify) becomes 2 S N d m, m = expansion * d,
                   S steps (the first step's x D, then z D^T and (z D^T - x) D per further step, and the decoding z D_1^T)
  ViT block        qkv 3 N w^2 + attention 2 N^2 w + proj N w^2 + MLP 2 N w (mlp_ratio w)
  decoder_embed    N_e * d * d'   (visible-only encoder only; applied before the decoder's mask
                   tokens are inserted, so to the N_e encoder rows)
  decoder_pred     N_d * d' * p^2 C   (the reference applies it to all tokens, cls included)

Train step = forward + backward = 3x forward, because each matmul's backward is two matmuls of
the same size (input gradient and weight gradient); the patch embedding counts 2x, as the image
needs no gradient. These are model FLOPs: remat recomputation and attention padding (e.g. 197
-> 256 rows for a flash kernel) are hardware work and do not count, as in MaxText's MFU.

CRATE-MAE-Base (224 px, p=16, 12x768 + 12x768): forward 25.6 GFLOP, train 76.7 GFLOP per image.
"""

PEAK_FLOPS = {
    # device_kind substring (case-insensitive; the longest match wins) -> dense bf16 FLOP/s
    'H100 PCIe': 756e12,
    'H100': 989e12,  # SXM ('NVIDIA H100 80GB HBM3')
    'H200': 989e12,
    'A100': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e reports 'TPU v5 lite'
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,  # v5p reports 'TPU v5'
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
    'cpu': None,  # no meaningful peak; pass peak= to mfu() to use a measured one
}

_DEFAULTS = {
    'image_size': 224,
    'patch_size': 16,
    'channels': 3,
    'encoder_block': 'crate',
    'decoder_block': 'crate',
    'width': 768,
    'depth': 12,
    'decoder_width': 768,
    'decoder_depth': 12,
    'mlp_ratio': 4.0,
    'encoder_sees_mask_tokens': True,
    'mask_ratio': 0.75,
    'fused_ista': False,
    'attention_operator': 'mssa',
    'sparse_block': 'ista',
    'sparse_expansion': 4,
    'sparse_steps': 2,
}


def _config(model_config) -> dict:
    """The keys counted here; an option still unset (None, chosen per platform when a run compiles) counts as the
    reference form. Callers that time a compiled step resolve it first (``models.apply_platform_defaults``)."""
    cfg = dict(_DEFAULTS)
    cfg.update({k: v for k, v in dict(model_config).items() if k in _DEFAULTS and v is not None})
    return cfg


def token_counts(model_config, mask_ratio=None):
    """(L patches, N_e encoder rows, N_d decoder rows) for one image."""
    c = _config(model_config)
    L = (c['image_size'] // c['patch_size']) ** 2
    r = c['mask_ratio'] if mask_ratio is None else mask_ratio
    n_enc = L + 1 if c['encoder_sees_mask_tokens'] else int(L * (1 - r)) + 1
    return L, n_enc, L + 1


def block_flops(kind, n, width, mlp_ratio=4.0, fused_ista=False, batch_size=None) -> dict:
    """Forward FLOPs of one block on n token rows of one image; kind is 'crate_encoder',
    'crate_decoder' or 'vit'. Returns {matmul group: FLOPs}."""
    d = width
    if kind == 'crate_encoder':
        if fused_ista:
            ista = n * d * d + (d**3 / batch_size if batch_size else 0)
        else:
            ista = 3 * n * d * d
        macs = {'qkv': n * d * d, 'attention': 2 * n * n * d, 'out': n * d * d, 'ista': ista}
    elif kind == 'crate_decoder':
        macs = {'unsparsify': n * d * d, 'qkv': n * d * d, 'attention': 2 * n * n * d, 'out': n * d * d}
    elif kind == 'vit':
        macs = {
            'qkv': 3 * n * d * d,
            'attention': 2 * n * n * d,
            'proj': n * d * d,
            'mlp': 2 * n * d * int(d * mlp_ratio),
        }
    else:
        raise ValueError(f'Unknown block kind {kind!r}.')
    return {k: 2.0 * v for k, v in macs.items()}


def forward_breakdown(model_config, batch_size=None, mask_ratio=None) -> dict:
    """Forward FLOPs per image for each matmul group, e.g. {'encoder/ista': ..., ...}."""
    c = _config(model_config)
    L, n_enc, n_dec = token_counts(c, mask_ratio)
    d, dd, pix = c['width'], c['decoder_width'], c['patch_size'] ** 2 * c['channels']
    out = {'patch_embed': 2.0 * L * pix * d}

    def add(prefix, kind, n, w, depth):
        for name, f in block_flops(kind, n, w, c['mlp_ratio'], c['fused_ista'], batch_size).items():
            out[f'{prefix}/{name}'] = depth * f
        if kind.startswith('crate'):  # the successors' operators (docs/model.md §7) in place of MSSA / ISTA
            if c['attention_operator'] == 'tssa':
                out[f'{prefix}/attention'] = depth * 2.0 * n * w
            if c['sparse_block'] == 'crate_alpha':
                sparse = depth * 2.0 * 2 * c['sparse_steps'] * n * w * c['sparse_expansion'] * w
                out.pop(f'{prefix}/ista' if kind == 'crate_encoder' else f'{prefix}/unsparsify')
                out[f'{prefix}/sparse_coding'] = sparse

    add('encoder', 'crate_encoder' if c['encoder_block'] == 'crate' else 'vit', n_enc, d, c['depth'])
    if not c['encoder_sees_mask_tokens']:
        out['decoder_embed'] = 2.0 * n_enc * d * dd
    add('decoder', 'crate_decoder' if c['decoder_block'] == 'crate' else 'vit', n_dec, dd, c['decoder_depth'])
    out['decoder_pred'] = 2.0 * n_dec * dd * pix
    return out


def forward_flops(model_config, batch_size=None, mask_ratio=None) -> float:
    """Matmul FLOPs of one forward pass, per image."""
    return sum(forward_breakdown(model_config, batch_size, mask_ratio).values())


def train_flops(model_config, batch_size=None, mask_ratio=None) -> float:
    """Matmul FLOPs of one train step (forward + backward), per image: 3x forward, 2x for the
    patch embedding (no image gradient)."""
    b = forward_breakdown(model_config, batch_size, mask_ratio)
    return 3.0 * sum(b.values()) - b['patch_embed']


def peak_flops(device_kind: str):
    """Dense bf16 peak FLOP/s of one device from PEAK_FLOPS, or None if unknown."""
    kind = device_kind.lower()
    matches = [k for k in PEAK_FLOPS if k.lower() in kind]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops_per_step, step_seconds, device_kind, num_devices, peak=None):
    """Model FLOPs utilisation, a fraction: flops_per_step / (step_seconds * num_devices * peak).

    flops_per_step is for the global batch (train_flops(cfg) * global_batch). peak overrides
    the table (FLOP/s per device). Returns None when the peak is unknown (e.g. CPU).
    """
    peak = peak or peak_flops(device_kind)
    if not peak or step_seconds <= 0:
        return None
    return float(flops_per_step) / (float(step_seconds) * num_devices * peak)
