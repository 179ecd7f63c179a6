"""Model construction from ``config.model``: defaults, validation at config time, initialisation, parameter counts."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cratemae import ops
from cratemae.models.mae import MaskedAutoencoder
from cratemae.models.mae import check_mask_ratio

_BLOCKS = ('crate', 'vit')
_ATTENTION = ops.ATTENTION_IMPLEMENTATIONS  # ('einsum', 'dot_product_attention', 'cudnn')
ATTENTION_OPERATORS = ('mssa', 'tssa')  # CRATE-MAE's MSSA, ToST's token-statistics attention
SPARSE_BLOCKS = ('ista', 'crate_alpha')  # CRATE-MAE's ISTA step, CRATE-alpha's overcomplete sparse coding
_REMAT = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


# The choice per platform for the options a config leaves unset (None): what measured fastest there without
# changing the model (docs/performance.md). An option a platform does not name takes the reference path.
PLATFORM_DEFAULTS = {
    'cpu': {'fused_ista': True},  # one (N x d) @ (d x d) product instead of three: -8% to -14% CPU time per step
}
_REFERENCE_PATH = {'fused_ista': False}


def default_model_config() -> ml_collections.ConfigDict:
    """CRATE-MAE-Base as the reference builds it (docs/model.md §1, §4): 224 px, patch 16, 12 x 768 x 12 both sides.

    The performance options in ``_REFERENCE_PATH`` start unset and are chosen per platform (``apply_platform_defaults``)
    unless a config or the command line sets them.
    """
    fields = {f.name: f.default for f in dataclasses.fields(MaskedAutoencoder) if f.name not in ('parent', 'name')}
    fields['dtype'] = 'float32'
    fields['param_dtype'] = 'float32'
    cfg = ml_collections.ConfigDict(fields)
    for key, value in _REFERENCE_PATH.items():
        cfg[key] = ml_collections.config_dict.placeholder(type(value))
    return cfg


def apply_platform_defaults(cfg, platform: str) -> dict:
    """Sets each unset (None) performance option of ``config.model`` to ``platform``'s choice; returns what it set.

    ``platform`` is the devices' platform ('cpu', 'gpu', 'tpu'), taken from the mesh a program is compiled for (an
    AOT compile for a TPU from a CPU host gets the TPU's choice). The engine applies it before saving config.json, so
    each run records the values it trained with.
    """
    chosen = _platform_choices(cfg, platform)
    for key, value in chosen.items():
        cfg[key] = value
    return chosen


def _platform_choices(cfg, platform: str) -> dict:
    """{option: platform's choice} for each option ``cfg`` leaves unset (None)."""
    return {
        key: PLATFORM_DEFAULTS.get(platform, {}).get(key, reference)
        for key, reference in _REFERENCE_PATH.items()
        if cfg.get(key) is None
    }


def validate_model_config(cfg) -> None:
    """Rejects model configs the model cannot build, naming the value and the rule, before anything is traced."""

    def need(ok, message):
        if not ok:
            raise ValueError(f'Invalid model config: {message}')

    need(cfg.encoder_block in _BLOCKS, f'model.encoder_block={cfg.encoder_block!r}; choose one of {_BLOCKS}.')
    need(cfg.decoder_block in _BLOCKS, f'model.decoder_block={cfg.decoder_block!r}; choose one of {_BLOCKS}.')
    need(cfg.attention in _ATTENTION, f'model.attention={cfg.attention!r}; choose one of {_ATTENTION}.')
    need(cfg.remat in _REMAT, f'model.remat={cfg.remat!r}; choose one of {_REMAT}.')
    _validate_attention_options(cfg, need)
    _validate_operator_options(cfg, need)
    for key in ('dtype', 'param_dtype'):
        need(cfg[key] in _DTYPES, f'model.{key}={cfg[key]!r}; choose one of {tuple(_DTYPES)}.')
    for key in (
        'image_size',
        'patch_size',
        'channels',
        'width',
        'depth',
        'heads',
        'decoder_width',
        'decoder_depth',
        'decoder_heads',
        'scan_unroll',
    ):
        need(int(cfg[key]) >= 1, f'model.{key}={cfg[key]} must be a positive integer.')
    need(
        cfg.image_size % cfg.patch_size == 0,
        f'image_size={cfg.image_size} is not divisible by patch_size={cfg.patch_size}.',
    )
    need(cfg.width % cfg.heads == 0, f'width={cfg.width} is not divisible by heads={cfg.heads}.')
    need(
        cfg.decoder_width % cfg.decoder_heads == 0,
        f'decoder_width={cfg.decoder_width} is not divisible by decoder_heads={cfg.decoder_heads}.',
    )
    need(cfg.width % 4 == 0, f'width={cfg.width} must be divisible by 4 for the 2-D sin-cos position embedding.')
    need(
        cfg.decoder_width % 4 == 0,
        f'decoder_width={cfg.decoder_width} must be divisible by 4 for the 2-D sin-cos position embedding.',
    )
    if cfg.encoder_sees_mask_tokens:
        need(
            cfg.decoder_width == cfg.width,
            f'decoder_width={cfg.decoder_width} must equal width={cfg.width} when encoder_sees_mask_tokens=True: the '
            'reference decoder reads the encoder output directly (set encoder_sees_mask_tokens=False for a FAIR-style '
            'decoder of another width).',
        )
    try:
        check_mask_ratio(cfg.mask_ratio, (cfg.image_size // cfg.patch_size) ** 2)
    except ValueError as e:
        raise ValueError(f'Invalid model config: {e}') from None
    need(
        cfg.get('fused_ista') in (None, True, False),
        f'model.fused_ista={cfg.get("fused_ista")!r}; choose True, False, or leave it unset (chosen per platform).',
    )
    need(cfg.ista_step > 0, f'ista_step={cfg.ista_step} must be positive.')
    need(cfg.ista_lambda >= 0, f'ista_lambda={cfg.ista_lambda} must be non-negative.')


def _validate_attention_options(cfg, need):
    """The performance options of the attention kernel (configs saved before attention_pad existed lack it)."""
    pad = cfg.get('attention_pad', 0)
    need(int(pad) == pad and pad >= 0, f'model.attention_pad={pad} must be a non-negative integer (0 = no padding).')
    need(
        pad <= 1 or cfg.attention != 'einsum',
        f'model.attention_pad={pad} pads tokens for jax.nn.dot_product_attention only; set '
        "model.attention='dot_product_attention' or 'cudnn', or attention_pad=0.",
    )
    if cfg.attention == 'cudnn':
        need(
            cfg.dtype in ('bfloat16', 'float16'),
            f"model.attention='cudnn' needs model.dtype='bfloat16' or 'float16' (cuDNN flash attention has no float32 "
            f"kernel), got {cfg.dtype!r}.",
        )
        for width, heads in ((cfg.width, cfg.heads), (cfg.decoder_width, cfg.decoder_heads)):
            need(
                (width // heads) % 8 == 0 and width // heads <= 256,
                f"model.attention='cudnn' needs head dims that are multiples of 8 and <= 256, got {width}/{heads}.",
            )


def _validate_operator_options(cfg, need):
    """The white-box operator keys (configs saved before they existed lack them and get the defaults)."""
    operator = cfg.get('attention_operator', 'mssa')
    sparse = cfg.get('sparse_block', 'ista')
    need(
        operator in ATTENTION_OPERATORS,
        f'model.attention_operator={operator!r}; choose one of {ATTENTION_OPERATORS}.',
    )
    need(sparse in SPARSE_BLOCKS, f'model.sparse_block={sparse!r}; choose one of {SPARSE_BLOCKS}.')
    for key in ('sparse_expansion', 'sparse_steps'):
        value = cfg.get(key, 1)
        need(int(value) == value and value >= 1, f'model.{key}={value} must be a positive integer.')
    if operator == 'tssa':
        need(
            cfg.attention == 'einsum' and cfg.get('attention_pad', 0) <= 1,
            f"model.attention={cfg.attention!r} (attention_pad={cfg.get('attention_pad', 0)}) chooses MSSA's softmax "
            "kernel; TSSA has no n x n attention to hand to a kernel: leave model.attention='einsum' and attention_pad=0.",
        )
    if operator != 'mssa' or sparse != 'ista':
        need(
            'crate' in (cfg.encoder_block, cfg.decoder_block),
            f'model.attention_operator={operator!r} / sparse_block={sparse!r} change CRATE blocks, but both '
            "encoder_block and decoder_block are 'vit'; set one to 'crate'.",
        )


# The top-level params that ``MaskedAutoencoder.encode`` reads: what probes and fine-tuning load and exports of the
# encoder hold.
ENCODER_KEYS = ('patch_embed', 'cls_token', 'mask_token', 'encoder', 'encoder_norm')


def encoder_params(params) -> dict:
    """The encoder's part of a CRATE-MAE params tree."""
    return {k: params[k] for k in ENCODER_KEYS if k in params}


def build(cfg) -> MaskedAutoencoder:
    """The Flax module for ``config.model`` (validated first)."""
    validate_model_config(cfg)
    fields = dict(cfg)
    fields.update(_platform_choices(cfg, jax.default_backend()))  # still unset: the default backend's choice
    fields['dtype'] = _DTYPES[cfg.dtype]
    fields['param_dtype'] = _DTYPES[cfg.param_dtype]
    for key in ('sparse_expansion', 'sparse_steps'):
        if key in fields:  # configs saved before these keys existed take the module's defaults
            fields[key] = int(fields[key])
    for key in ('mask_ratio', 'ista_step', 'ista_lambda', 'mlp_ratio', 'block_norm_eps', 'final_norm_eps'):
        fields[key] = float(fields[key])
    return MaskedAutoencoder(**fields)


def init_params(model, images, seed: int):
    """The parameters a training run with ``seed`` starts from (pure; the engine calls it under jit).

    key(seed) splits into (params, masking, train) keys; the first two initialise the model, the third is the
    train state's step-noise key (``cratemae.train.step.create_state``).
    """
    init_key, mask_key, _ = jax.random.split(jax.random.key(seed), 3)
    return model.init({'params': init_key, 'masking': mask_key}, images)['params']


def random_params(cfg, seed: int = 0) -> dict:
    """A random initialisation of ``config.model`` as numpy arrays: a run's own step 0 with this seed. The one random
    initialisation outside training (random-init baselines of the probes, step 0 in the white-box pictures)."""
    model = build(cfg)
    images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
    return jax.tree.map(np.asarray, jax.jit(lambda x: init_params(model, x, seed))(images))


def _block_params(block, d, heads, mlp_ratio, qkv_bias, cfg=None):
    if block == 'crate':  # U, W_o + b_o (+ TSSA's tau), D (or A) or D and D_1, two LayerNorms
        cfg = cfg or {}
        attention = 2 * d * d + d + (heads if cfg.get('attention_operator', 'mssa') == 'tssa' else 0)
        if cfg.get('sparse_block', 'ista') == 'crate_alpha':
            sparse = 2 * d * cfg.get('sparse_expansion', 4) * d
        else:
            sparse = d * d
        return attention + sparse + 4 * d
    hidden = int(d * mlp_ratio)
    return 4 * d + (3 * d * d + (3 * d if qkv_bias else 0)) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


def count_params(cfg, include_unused: bool = True) -> int:
    """Parameter count of ``config.model``.

    include_unused=True counts as the reference module does: the frozen sin-cos ``pos_embed`` and
    ``decoder_pos_embed`` buffers and the ``decoder_embed`` Linear that the CRATE-MAE forward never uses (docs/model.md §1:
    Base 44,638,464). include_unused=False counts the trainable parameters the forward pass uses (Base 43,745,280),
    which is the size of our Flax parameter tree.
    """
    d, dd = cfg.width, cfg.decoder_width
    patch_dim = cfg.patch_size**2 * cfg.channels
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    used = (patch_dim * d + d) + d + (d if cfg.encoder_sees_mask_tokens else dd)  # patch embed, cls, mask token
    used += cfg.depth * _block_params(cfg.encoder_block, d, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, cfg) + 2 * d
    used += cfg.decoder_depth * _block_params(
        cfg.decoder_block, dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg
    )
    used += 2 * dd + (dd * patch_dim + patch_dim)
    decoder_embed = d * dd + dd
    if not cfg.encoder_sees_mask_tokens:
        used += decoder_embed
    if not include_unused:
        return used
    unused = tokens * d + tokens * dd  # frozen position embeddings
    if cfg.encoder_sees_mask_tokens:
        unused += decoder_embed
    return used + unused


__all__ = [
    'ATTENTION_OPERATORS',
    'MaskedAutoencoder',
    'PLATFORM_DEFAULTS',
    'SPARSE_BLOCKS',
    'apply_platform_defaults',
    'build',
    'count_params',
    'default_model_config',
    'validate_model_config',
    'ops',
]
