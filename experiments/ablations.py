"""The paper's ablations, each a small override on a base entry.

Every family is declared once, as (suffix, overrides, question) rows, and registered twice:

* on ``crate_mae_base`` (ImageNet, 224 px) as ``ablate_<family>_<suffix>``: the paper-scale experiment;
* on ``crate_mae_mnist_rawpix`` (the default run with the reference's raw-pixel targets; embedded MNIST, 2 CPU cores)
  as ``mnist_ablate_<family>_<suffix>``: the same question at a scale this machine can answer in minutes
  (docs/ablations.md).

Overrides are functions of the base's model config, so "half the depth at the same parameter budget" means the same
thing on both bases. ``declared_overrides(name)`` returns the keys an entry changes; a test checks that the entry
differs from its base in exactly those keys.
"""
import math


def _round4(x):
    return max(4, int(round(x / 4)) * 4)


def _heads_for(width, head_dim):
    """The largest head count with heads * h == width and h close to the base's head dimension."""
    heads = max(1, round(width / head_dim))
    while width % heads:
        heads -= 1
    return heads


def _same_budget(factor):
    """Depth x factor and width / sqrt(factor): CRATE blocks cost 3 d^2 parameters, so the budget is unchanged."""

    def overrides(m):
        width = _round4(m.width / math.sqrt(factor))
        heads = _heads_for(width, m.width // m.heads)
        depth = max(1, int(round(m.depth * factor)))
        return dict(width=width, heads=heads, depth=depth, decoder_width=width, decoder_heads=heads,
                    decoder_depth=depth)

    return overrides


# family -> [(suffix, overrides(model_config) -> dict of model keys, question)]
FAMILIES = {
    'mask': [
        (f'{int(r * 100):02d}', lambda m, r=r: dict(mask_ratio=r),
         f'Mask ratio {r} (paper Table 4 ablates the ratio on CIFAR; the reference default is 0.75).')
        for r in (0.25, 0.5, 0.9)
    ],
    'lambda': [
        (name, lambda m, v=v: dict(ista_lambda=v),
         f'ISTA threshold lambda = {v} (reference default 0.5; the first release used 5.0).')
        for name, v in (('0p1', 0.1), ('5', 5.0))
    ],
    'eta': [
        (name, lambda m, v=v: dict(ista_step=v), f'ISTA step size eta = {v} (reference default 0.1).')
        for name, v in (('0p01', 0.01), ('0p5', 0.5))
    ],
    'encoder': [
        ('visible', lambda m: dict(encoder_sees_mask_tokens=False),
         'Encoder on the visible patches only (FAIR MAE) instead of the reference\'s mask tokens in the encoder.'),
    ],
    'normpix': [
        ('on', lambda m: dict(norm_pix_loss=True),
         'Per-patch normalised pixel targets (FAIR recommends them for representations; the reference default is off).'),
    ],
    'shape': [
        ('deep', _same_budget(2.0), 'Twice the depth, width / sqrt(2): the same parameter budget, deeper.'),
        ('wide', _same_budget(0.5), 'Half the depth, width x sqrt(2): the same parameter budget, wider.'),
    ],
    'decoder': [
        ('one', lambda m: dict(decoder_depth=1), 'A single decoder layer (the reference mirrors the encoder).'),
        ('half', lambda m: dict(decoder_depth=max(1, m.depth // 2)),
         'A decoder half as deep as the encoder (the reference mirrors the encoder).'),
    ],
    'vit': [
        ('mae', lambda m: dict(encoder_block='vit', decoder_block='vit', decoder_depth=max(1, m.depth * 2 // 3),
                               decoder_heads=_heads_for(m.width, 48), block_norm_eps=1e-6),
         'The MAE of the same configuration: ViT blocks, a decoder 2/3 as deep with 48-wide heads (at Base this is '
         'the reference file\'s mae_vit_base; the paper\'s "about 30% of the parameters" comparison, Table 1).'),
    ],
}

# Both bases keep the reference's default targets (norm_pix_loss=False), so the 'normpix' family means the same thing.
BASES = {'ablate': 'crate_mae_base', 'mnist_ablate': 'crate_mae_mnist_rawpix'}


def entries():
    """(name, base_name, model_overrides_fn, question) for every registered ablation."""
    for prefix, base in BASES.items():
        for family, rows in FAMILIES.items():
            for suffix, overrides, question in rows:
                yield f'{prefix}_{family}_{suffix}', base, overrides, question
