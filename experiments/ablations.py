"""The paper's ablations, each a small override on a base entry.

Every variant is one row naming both of its entries (so a grep for an entry's name finds its row):

* on ``crate_mae_base`` (ImageNet, 224 px) as ``ablate_<family>_<variant>``: the paper-scale experiment;
* on ``crate_mae_mnist_rawpix`` (the default run with the reference's raw-pixel targets; embedded MNIST, 2 CPU cores)
  as ``mnist_ablate_<family>_<variant>``: the same question at a scale this machine can answer in minutes
  (docs/ablations.md).

Overrides are functions of the base's model config, so "half the depth at the same parameter budget" means the same
thing on both bases. ``declared_overrides(name)`` returns the keys an entry changes; a test checks that the entry
differs from its base in exactly those keys.
"""

import math

from experiments import base


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
        return dict(
            width=width, heads=heads, depth=depth, decoder_width=width, decoder_heads=heads, decoder_depth=depth
        )

    return overrides


def _vit_mae(m):
    return dict(
        encoder_block='vit',
        decoder_block='vit',
        decoder_depth=max(1, m.depth * 2 // 3),
        decoder_heads=_heads_for(m.width, 48),
        block_norm_eps=1e-6,
    )


# Both bases keep the reference's default targets (norm_pix_loss=False), so the 'normpix' family means the same thing.
BASES = ('crate_mae_base', 'crate_mae_mnist_rawpix')

# (name on crate_mae_base, name on crate_mae_mnist_rawpix, overrides(model config) -> dict of model keys, question)
VARIANTS = (
    (
        'ablate_mask_25',
        'mnist_ablate_mask_25',
        lambda m: dict(mask_ratio=0.25),
        'Mask ratio 0.25 (paper Table 4 ablates the ratio on CIFAR; the reference default is 0.75).',
    ),
    (
        'ablate_mask_50',
        'mnist_ablate_mask_50',
        lambda m: dict(mask_ratio=0.5),
        'Mask ratio 0.5 (paper Table 4 ablates the ratio on CIFAR; the reference default is 0.75).',
    ),
    (
        'ablate_mask_90',
        'mnist_ablate_mask_90',
        lambda m: dict(mask_ratio=0.9),
        'Mask ratio 0.9 (paper Table 4 ablates the ratio on CIFAR; the reference default is 0.75).',
    ),
    (
        'ablate_lambda_0p1',
        'mnist_ablate_lambda_0p1',
        lambda m: dict(ista_lambda=0.1),
        'ISTA threshold lambda = 0.1 (reference default 0.5; the first release used 5.0).',
    ),
    (
        'ablate_lambda_5',
        'mnist_ablate_lambda_5',
        lambda m: dict(ista_lambda=5.0),
        'ISTA threshold lambda = 5.0 (reference default 0.5; the first release used 5.0).',
    ),
    (
        'ablate_eta_0p01',
        'mnist_ablate_eta_0p01',
        lambda m: dict(ista_step=0.01),
        'ISTA step size eta = 0.01 (reference default 0.1).',
    ),
    (
        'ablate_eta_0p5',
        'mnist_ablate_eta_0p5',
        lambda m: dict(ista_step=0.5),
        'ISTA step size eta = 0.5 (reference default 0.1).',
    ),
    (
        'ablate_encoder_visible',
        'mnist_ablate_encoder_visible',
        lambda m: dict(encoder_sees_mask_tokens=False),
        'Encoder on the visible patches only (FAIR MAE) instead of the reference\'s mask tokens in the encoder.',
    ),
    (
        'ablate_normpix_on',
        'mnist_ablate_normpix_on',
        lambda m: dict(norm_pix_loss=True),
        'Per-patch normalised pixel targets (FAIR recommends them for representations; the reference default is off).',
    ),
    (
        'ablate_shape_deep',
        'mnist_ablate_shape_deep',
        _same_budget(2.0),
        'Twice the depth, width / sqrt(2): the same parameter budget, deeper.',
    ),
    (
        'ablate_shape_wide',
        'mnist_ablate_shape_wide',
        _same_budget(0.5),
        'Half the depth, width x sqrt(2): the same parameter budget, wider.',
    ),
    (
        'ablate_decoder_one',
        'mnist_ablate_decoder_one',
        lambda m: dict(decoder_depth=1),
        'A single decoder layer (the reference mirrors the encoder).',
    ),
    (
        'ablate_decoder_half',
        'mnist_ablate_decoder_half',
        lambda m: dict(decoder_depth=max(1, m.depth // 2)),
        'A decoder half as deep as the encoder (the reference mirrors the encoder).',
    ),
    (
        'ablate_vit_mae',
        'mnist_ablate_vit_mae',
        _vit_mae,
        'The MAE of the same configuration: ViT blocks, a decoder 2/3 as deep with 48-wide heads (at Base this is '
        'the reference file\'s mae_vit_base; the paper\'s "about 30% of the parameters" comparison, Table 1).',
    ),
)


def _entry(name, base_fn, overrides, question):
    def entry():
        config = base_fn()
        config.model.update(overrides(config.model))
        return config

    entry.__name__ = name
    entry.__doc__ = (
        f'{question} Override on {base_fn.__name__}.\n\n'
        f'  python -m launch.train --config=experiments/registry.py:{name}\n'
    )
    return entry


def entries():
    """{name: entry function} for every ablation, on both bases."""
    out = {}
    for row in VARIANTS:
        for name, base_name in zip(row[:2], BASES):
            out[name] = _entry(name, getattr(base, base_name), row[2], row[3])
    return out


def declared_overrides(name):
    """(base name, {model key: value}) of an ablation entry; ValueError for any other name."""
    for row in VARIANTS:
        if name in row[:2]:
            base_name = BASES[row.index(name)]
            return base_name, row[2](getattr(base, base_name)().model)
    raise ValueError(f'{name!r} is not an ablation entry.')
