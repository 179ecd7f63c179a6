"""Export to and import from the reference PyTorch state dict of CRATE-MAE.

The reference is `MaskedAutoencoderViT` in Ma-Lab-Berkeley/CRATE `model/crate_ae/crate_ae.py` with CRATE blocks
(`mae_crate_{tiny,small,base,large}`); `_layout` is the key map of docs/model.md §2.10. torch `nn.Linear` computes
y = x W^T + b, so W = Dense kernel^T (qkv U, to_out, decoder A, decoder_pred); the ISTA dictionary D is stored
untransposed; conv weight [d,C,p,p] = kernel (p,p,C,d).transpose(3,2,0,1). pos_embed = decoder_pos_embed = the fixed
sin-cos table (1,N,d); decoder_embed is written as zeros (the reference builds it but never uses it).

The files themselves (`.safetensors`, `.npz`, reading `.pth`, and their metadata) are ``cratemae.weight_files``; its
readers and writers are re-exported here, so ``export`` stays the one entry point for weights in the reference layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from typing import Any
from typing import Mapping
from typing import NamedTuple

import jax
import ml_collections
import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util

from cratemae import checkpoint
from cratemae import models
from cratemae import ops
from cratemae.weight_files import LAYOUT  # noqa: F401  (re-exported)
from cratemae.weight_files import load_state_dict
from cratemae.weight_files import make_metadata
from cratemae.weight_files import model_config_from_metadata  # noqa: F401
from cratemae.weight_files import normalize_state_dict  # noqa: F401
from cratemae.weight_files import save_npz
from cratemae.weight_files import save_safetensors

log = logging.getLogger(__name__)

# A fine-tuned checkpoint's classifier (FAIR MAE's fine-tuning: LayerNorm fc_norm on the pooled feature, Linear head):
# a fine-tuning task trains its own head and probes read the encoder, so these load as ignored, and say so.
CLASSIFIER_KEYS = ('fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias')
# The reference's named CRATE-MAE sizes (crate_ae.mae_crate_*: 224 px, patch 16, decoder as deep and wide as the
# encoder): name -> (width, depth, heads). The experiment registry's crate_mae_<name> entries have the same numbers.
REFERENCE_SIZES = {'tiny': (384, 12, 6), 'small': (576, 12, 12), 'base': (768, 12, 12), 'large': (1024, 24, 16)}
FORMATS = ('safetensors', 'npz', 'orbax')
ORBAX_FORMAT = 'cratemae.params.v1'


class _Entry(NamedTuple):
    key: str  # torch state-dict key
    path: tuple | None  # Flax param path; None for tensors that are not Flax params
    kind: str  # 'copy' | 'T' (Dense kernel) | 'conv' | 'pos' | 'zeros'
    layer: int | None  # index into the nn.scan depth axis
    shape: tuple  # torch shape


def _get(cfg, name, default):
    value = cfg.get(name, default) if hasattr(cfg, 'get') else getattr(cfg, name, default)
    return default if value is None else value


def _arch(model_config, encoder_only=False):
    """Validates that the config has a reference layout and returns its sizes.

    A model whose encoder sees the visible patches only (FAIR's forward) has the reference's encoder tensors but not
    its decoder input (ours embeds the latent first), so only its encoder exports: ``encoder_only``."""
    enc, dec = _get(model_config, 'encoder_block', 'crate'), _get(model_config, 'decoder_block', 'crate')
    sees_mask = _get(model_config, 'encoder_sees_mask_tokens', True)
    d, dd = int(_get(model_config, 'width', 768)), int(_get(model_config, 'decoder_width', 768))
    if enc != 'crate' or dec != 'crate' or d != dd:
        raise ValueError(
            'No reference state-dict layout exists for this model config (encoder_block=%r, decoder_block=%r, '
            'width=%d, decoder_width=%d): only CRATE-MAE with CRATE encoder and decoder blocks and decoder_width == '
            'width has one (%s). Export it with --format=orbax.' % (enc, dec, d, dd, LAYOUT)
        )
    # The operator check comes first: for these models not even --encoder_only has a reference layout.
    operator, sparse = _get(model_config, 'attention_operator', 'mssa'), _get(model_config, 'sparse_block', 'ista')
    if operator != 'mssa' or sparse != 'ista':
        raise ValueError(
            f'No reference state-dict layout exists for attention_operator={operator!r}, sparse_block={sparse!r}: '
            'the reference CRATE-MAE has MSSA and ISTA only, and neither CRATE-alpha nor ToST released an MAE. '
            'Export these models with --format=orbax (the Flax parameter tree under our names; docs/model.md §7).'
        )
    if not sees_mask and not encoder_only:
        raise ValueError(
            'This model\'s encoder sees the visible patches only (encoder_sees_mask_tokens=False, FAIR\'s forward): '
            'its encoder has the reference layout, its decoder does not (it embeds the latent before adding mask '
            'tokens, which the reference does not). Export the encoder with --encoder_only (the reference loads it '
            'with strict=False), or the whole model with --format=orbax.'
        )
    image, p = int(_get(model_config, 'image_size', 224)), int(_get(model_config, 'patch_size', 16))
    if image % p:
        raise ValueError(f'image_size {image} is not divisible by patch_size {p}.')
    grid = image // p
    return dict(
        d=d,
        p=p,
        c=int(_get(model_config, 'channels', 3)),
        grid=grid,
        n=grid * grid + 1,
        depth=int(_get(model_config, 'depth', 12)),
        dec_depth=int(_get(model_config, 'decoder_depth', 12)),
    )


def _mssa_entries(prefix, stack, i, d):
    return [
        _Entry(prefix + 'qkv.weight', (stack, 'layers', 'mssa', 'qkv', 'kernel'), 'T', i, (d, d)),
        _Entry(prefix + 'to_out.0.weight', (stack, 'layers', 'mssa', 'out', 'kernel'), 'T', i, (d, d)),
        _Entry(prefix + 'to_out.0.bias', (stack, 'layers', 'mssa', 'out', 'bias'), 'copy', i, (d,)),
    ]


def _norm_entries(prefix, path, i, d):
    return [
        _Entry(prefix + 'weight', path + ('scale',), 'copy', i, (d,)),
        _Entry(prefix + 'bias', path + ('bias',), 'copy', i, (d,)),
    ]


def _layout(model_config, encoder_only=False, any_forward=False):
    """The reference tensors in the reference state-dict order (own parameters first, then submodules)."""
    a = _arch(model_config, encoder_only or any_forward)
    d, p, c, n = a['d'], a['p'], a['c'], a['n']
    out = [
        _Entry('cls_token', ('cls_token',), 'copy', None, (1, 1, d)),
        _Entry('pos_embed', None, 'pos', None, (1, n, d)),
        _Entry('mask_token', ('mask_token',), 'copy', None, (1, 1, d)),
    ]
    if not encoder_only:
        out.append(_Entry('decoder_pos_embed', None, 'pos', None, (1, n, d)))
    out += [
        _Entry('patch_embed.proj.weight', ('patch_embed', 'kernel'), 'conv', None, (d, c, p, p)),
        _Entry('patch_embed.proj.bias', ('patch_embed', 'bias'), 'copy', None, (d,)),
    ]
    for i in range(a['depth']):
        b = f'blocks.{i}.layers.0.'
        out += _norm_entries(b + '0.norm.', ('encoder', 'layers', 'norm1'), i, d)
        out += _mssa_entries(b + '0.fn.', 'encoder', i, d)
        out += _norm_entries(b + '1.norm.', ('encoder', 'layers', 'norm2'), i, d)
        out.append(_Entry(b + '1.fn.weight', ('encoder', 'layers', 'ista', 'dictionary'), 'copy', i, (d, d)))
    out += _norm_entries('norm.', ('encoder_norm',), None, d)
    if encoder_only:
        return out
    out += [
        _Entry('decoder_embed.weight', None, 'zeros', None, (d, d)),
        _Entry('decoder_embed.bias', None, 'zeros', None, (d,)),
    ]
    for i in range(a['dec_depth']):
        b = f'decoder_blocks.{i}.layers.0.'
        out += _norm_entries(b + '0.norm.', ('decoder', 'layers', 'norm1'), i, d)
        out.append(_Entry(b + '0.fn.weight', ('decoder', 'layers', 'unsparsify', 'kernel'), 'T', i, (d, d)))
        out += _norm_entries(b + '1.norm.', ('decoder', 'layers', 'norm2'), i, d)
        out += _mssa_entries(b + '1.fn.', 'decoder', i, d)
    out += _norm_entries('decoder_norm.', ('decoder_norm',), None, d)
    out += [
        _Entry('decoder_pred.weight', ('decoder_pred', 'kernel'), 'T', None, (p * p * c, d)),
        _Entry('decoder_pred.bias', ('decoder_pred', 'bias'), 'copy', None, (p * p * c,)),
    ]
    return out


def reference_shapes(model_config, encoder_only: bool = False, any_forward: bool = False) -> dict[str, tuple]:
    """{torch key: torch shape} of the reference state dict, in reference order (any_forward: also for a model whose
    forward the reference does not have, when only the names are wanted)."""
    return {e.key: e.shape for e in _layout(model_config, encoder_only, any_forward)}


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == 'bfloat16' else np.dtype(dtype)


def _as_array(leaf):
    """A numpy view of a param leaf; abstract leaves (jax.ShapeDtypeStruct) become zero-strided, memory-free views."""
    abstract = not hasattr(leaf, '__array__')
    return np.broadcast_to(np.zeros((), _np_dtype(leaf.dtype)), tuple(leaf.shape)) if abstract else np.asarray(leaf)


def _transform(arr, kind, to_torch):
    """Dense kernel (in,out) <-> torch weight (out,in); conv kernel (p,p,C,d) <-> torch weight (d,C,p,p)."""
    if kind == 'conv':
        return arr.transpose((3, 2, 0, 1) if to_torch else (2, 3, 1, 0))
    return arr.T if kind == 'T' else arr


def _pos_table(a, dtype):  # (1, N, d)
    return ops.sincos_pos_embed(a['d'], a['grid'])[None].astype(dtype)


def to_reference_state_dict(params, model_config, *, encoder_only: bool = False, dtype=None) -> dict[str, np.ndarray]:
    """Flax params (or {'params': ...}) -> the reference torch state dict as numpy arrays, in reference order.

    Leaves may be arrays or abstract `jax.ShapeDtypeStruct`s (giving memory-free zero-strided placeholders of the
    right shapes and dtypes). dtype=None keeps each param's dtype; pos_embed, decoder_pos_embed and decoder_embed
    take the patch-embedding kernel's. encoder_only: only patch_embed, cls/mask_token, pos_embed, blocks.*, norm.*.
    """
    if 'params' in params and 'patch_embed' not in params:  # a variables dict
        params = params['params']
    a = _arch(model_config, encoder_only)
    out_dtype = None if dtype is None else _np_dtype(dtype)
    const_dtype = out_dtype or _as_array(params['patch_embed']['kernel']).dtype
    out = {}
    for e in _layout(model_config, encoder_only):
        if e.kind == 'pos':
            arr = _pos_table(a, const_dtype)
        elif e.kind == 'zeros':
            arr = np.zeros(e.shape, const_dtype)
        else:
            leaf = params
            try:
                for name in e.path:
                    leaf = leaf[name]
            except (KeyError, TypeError) as err:
                raise ValueError(f'Flax params lack {"/".join(e.path)} needed for {e.key!r}.') from err
            arr = _as_array(leaf)
            if e.layer is not None:
                n_layers = a['depth'] if e.path[0] == 'encoder' else a['dec_depth']
                if arr.shape[:1] != (n_layers,):
                    raise ValueError(
                        f'Flax params {"/".join(e.path)} have shape {arr.shape}; the model config '
                        f'expects {n_layers} stacked {e.path[0]} layers ({e.key!r}).'
                    )
                arr = arr[e.layer]
            arr = _transform(arr, e.kind, to_torch=True)
            if not hasattr(leaf, '__array__'):  # abstract: keep a memory-free view
                arr = np.broadcast_to(np.zeros((), out_dtype or arr.dtype), arr.shape)
            else:
                arr = np.ascontiguousarray(arr, dtype=out_dtype or arr.dtype)
        if arr.shape != e.shape:
            raise ValueError(f'{e.key}: Flax params give shape {arr.shape}, the model config expects {e.shape}.')
        out[e.key] = arr
    return out


def _shorten(items, limit=12):
    more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(str(x) for x in items[:limit]) + more


def _architecture_hint(keys):
    if any('.attn.qkv.' in k or '.mlp.fc1.' in k for k in keys):
        return (
            ' The checkpoint has timm ViT blocks (attn.qkv / mlp.fc1): it looks like FAIR MAE or '
            'crate_ae.mae_vit_*, not CRATE-MAE.'
        )
    depths = [len({k.split('.')[1] for k in keys if k.startswith(s)}) for s in ('blocks.', 'decoder_blocks.')]
    return ' The checkpoint has %d encoder and %d decoder blocks.' % tuple(depths)


def infer_architecture(state_dict: Mapping[str, Any]) -> dict[str, int] | None:
    """The sizes a CRATE-MAE reference state dict shows in its shapes, or None if it is not one.

    width, patch_size and channels from the patch embedding [d, C, p, p]; depth and decoder_depth by counting
    blocks; image_size from pos_embed (1, 1 + (image/p)^2, d) when present. The number of heads leaves no trace in
    the shapes (qkv is d x d for any head count), so it is not here.
    """
    conv = state_dict.get('patch_embed.proj.weight')
    if conv is None or len(np.shape(conv)) != 4 or not any(k.endswith('.1.fn.weight') for k in state_dict):
        return None  # no patch embedding or no ISTA dictionaries: not a CRATE-MAE
    d, c, p, _ = np.shape(conv)

    def count(prefix):
        return len({int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r'(\d+)\.', k))})

    arch = dict(
        width=int(d), patch_size=int(p), channels=int(c), depth=count('blocks.'), decoder_depth=count('decoder_blocks.')
    )
    pos = state_dict.get('pos_embed')
    if pos is not None and len(np.shape(pos)) == 3:
        grid = round((np.shape(pos)[1] - 1) ** 0.5)
        if grid * grid == np.shape(pos)[1] - 1:
            arch['image_size'] = grid * int(p)
    return arch


def reference_size(arch, model_name=None) -> str | None:
    """The reference size (tiny/small/base/large) with these numbers, or None. ``model_name`` (the training command's
    --model, e.g. 'mae_crate_base') decides when given, since the shapes do not show the heads."""
    if model_name:
        name = str(model_name).rsplit('_', 1)[-1]
        return name if name in REFERENCE_SIZES and str(model_name).startswith('mae_crate') else None
    for name, (width, depth, _) in REFERENCE_SIZES.items():
        if (
            arch
            and (arch['width'], arch['depth'], arch['patch_size'], arch.get('image_size', 224))
            == (width, depth, 16, 224)
            and arch['decoder_depth'] in (0, depth)
        ):
            return name
    return None


def registry_hint(state_dict, model_name=None) -> str:
    """A sentence naming the config that fits the checkpoint's shapes (the registry entry when one does)."""
    arch = infer_architecture(state_dict)
    if arch is None:
        return ''
    numbers = ', '.join(f'{k} {v}' for k, v in arch.items())
    size = reference_size(arch, model_name)
    if size:
        return (
            f' The checkpoint\'s shapes ({numbers}) are CRATE-MAE-{size.capitalize()}: pass '
            f'--config=experiments/registry.py:crate_mae_{size}.'
        )
    overrides = ' '.join(f'--config.model.{k}={v}' for k, v in arch.items() if k != 'decoder_depth' or v)
    return (
        f' The checkpoint\'s shapes ({numbers}) match no registry size: pass a config with them, e.g. '
        f'--config=experiments/registry.py:crate_mae_base {overrides} (and the heads it was trained with).'
    )


def infer_model_config(state_dict, args: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``config.model`` of a reference checkpoint from its shapes and, when saved, the training command's args.

    The heads come from args['model'] (e.g. 'mae_crate_base') or from the reference size the shapes match; without
    either the architecture is not fully known and a ValueError says to name it with --config.
    """
    args = dict(args or {})
    arch = infer_architecture(state_dict)
    if arch is None:
        raise ValueError(
            'The state dict is not a CRATE-MAE reference state dict, so its architecture cannot be '
            'inferred.' + _architecture_hint(state_dict)
        )
    size = reference_size(arch, args.get('model'))
    if size is None:
        raise ValueError(
            'The number of attention heads is not in the checkpoint (neither its shapes nor a saved '
            '--model name show it), so its architecture is not fully known: name it with --config.'
            + registry_hint(state_dict)
        )
    width, depth, heads = REFERENCE_SIZES[size]
    if (arch['width'], arch['depth']) != (width, depth):
        raise ValueError(
            f'The checkpoint was saved by a run of --model {args.get("model")}, but its shapes are '
            'not that size.' + registry_hint(state_dict)
        )
    cfg = models.default_model_config()
    cfg.update(
        width=width,
        depth=depth,
        heads=heads,
        decoder_width=width,
        decoder_depth=depth,
        decoder_heads=heads,
        patch_size=arch['patch_size'],
        channels=arch['channels'],
        image_size=arch.get('image_size', args.get('input_size', cfg.image_size)),
    )
    for key in ('mask_ratio', 'norm_pix_loss'):  # FAIR MAE's pretraining flags of the same meaning
        if isinstance(args.get(key), type(cfg[key])):
            cfg[key] = args[key]
    return cfg


def _validate(sd, layout, ignored):
    expected = {e.key: e.shape for e in layout}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in ignored]
    mismatched = [
        f'{k} (expected {expected[k]}, got {tuple(sd[k].shape)})'
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = [('Missing keys', missing), ('Unexpected keys', unexpected), ('Mismatched shapes', mismatched)]
    if 'fc_norm.weight' in sd and 'norm.weight' in missing:
        raise ValueError(
            'The checkpoint is a classifier fine-tuned with global pooling (FAIR MAE\'s --global_pool: '
            'fc_norm normalises the pooled feature and the per-token final norm `norm` was removed), so '
            'it has no final encoder norm to load. Use the pretrained checkpoint it was fine-tuned from.'
        )
    if missing or unexpected or mismatched:
        fits = registry_hint(sd) if mismatched else ''  # first: the list of shapes below can be long
        raise ValueError(
            'State dict does not match the CRATE-MAE reference layout for this model config.'
            + fits
            + ' '
            + ' '.join(f'{name} ({len(v)}): {_shorten(v)}.' for name, v in problems if v)
            + ('' if fits else _architecture_hint(sd))
        )


def _report(sd, used, source):
    """Logs which tensors of a checkpoint were loaded and which were not, and why."""
    reasons = {
        'classification head of a fine-tuned checkpoint (fine-tuning trains its own; probes read the encoder)': [
            k for k in sd if k in CLASSIFIER_KEYS
        ],
        'fixed sin-cos position tables (rebuilt by the model)': [k for k in sd if k.endswith('pos_embed')],
        'decoder_embed (built but unused by the reference)': [k for k in sd if k.startswith('decoder_embed.')],
    }
    reasons['decoder (only the encoder was asked for)'] = [
        k for k in sd if k not in used and not any(k in v for v in reasons.values())
    ]
    ignored = '; '.join(f'{len(v)} {why}: {_shorten(v, 4)}' for why, v in reasons.items() if v)
    log.info(
        '%s: loaded %d tensors (%s); ignored %s.',
        source or 'state dict',
        len(used),
        _shorten(sorted({k.split('.')[0] for k in used}), 8),
        ignored or 'none',
    )


def from_reference_state_dict(
    state_dict: Mapping[str, Any],
    model_config,
    *,
    encoder_only: bool = False,
    dtype='float32',
    check_pos_embed: bool = True,
    source: str = '',
) -> dict:
    """Reference torch state dict -> the Flax params tree (numpy arrays; nested dicts; no {'params': } wrapper).

    Validates keys and shapes against the config and raises ValueError naming the missing keys, unexpected keys
    and mismatched shapes. pos_embed/decoder_pos_embed are not loaded (fixed sin-cos; warns if they differ from it
    beyond max(1e-4, eps of their dtype)); decoder_embed is ignored. encoder_only=True builds the encoder params
    only and ignores the decoder-side tensors and a fine-tuned checkpoint's classifier (``CLASSIFIER_KEYS``); which
    tensors were used and which ignored is logged (naming ``source``). dtype=None keeps the stored dtypes.
    """
    sd = normalize_state_dict(state_dict)
    a = _arch(model_config, encoder_only)
    if encoder_only and 'mask_token' not in sd and any(k in sd for k in CLASSIFIER_KEYS):
        # A fine-tuned classifier may lack the mask token; encode() never reads it, so zeros keep the tree whole.
        sd['mask_token'] = np.zeros((1, 1, a['d']), np.float32)
        log.info('%s has no mask_token (a classifier needs none; the encoder does not read it): zeros.', source)
    layout = _layout(model_config, encoder_only)
    ignored = set(reference_shapes(model_config, any_forward=True)) | set(CLASSIFIER_KEYS) if encoder_only else set()
    _validate(sd, layout, ignored)
    _report(sd, {e.key for e in layout if e.kind not in ('pos', 'zeros')}, source)
    out_dtype = None if dtype is None else _np_dtype(dtype)
    flat = {}
    for e in layout:
        arr = sd[e.key]
        if e.kind == 'pos':
            if check_pos_embed:
                diff = np.max(np.abs(arr.astype(np.float32) - _pos_table(a, np.float32)))
                if diff > max(1e-4, float(ml_dtypes.finfo(arr.dtype).eps)):  # allow rounding to a low precision
                    warnings.warn(
                        f'{e.key} differs from the fixed sin-cos table by up to {diff:.3g}; '
                        'the model uses the sin-cos table.'
                    )
            continue
        if e.kind == 'zeros':  # decoder_embed: unused by the reference forward
            continue
        arr = _transform(arr, e.kind, to_torch=False)
        arr = np.array(arr, dtype=out_dtype or arr.dtype)  # a contiguous copy
        flat[e.path] = arr if e.layer is None else flat.get(e.path, []) + [arr]  # layers in order 0..depth-1
    return traverse_util.unflatten_dict({k: np.stack(v) if isinstance(v, list) else v for k, v in flat.items()})


# ----------------------------------------------------------------------------------------------------------------
# Writing the portable formats: a loaded checkpoint's weights, or a PyTorch file converted once.


def _json_dict(cfg) -> dict[str, Any] | None:
    return (
        None
        if cfg is None
        else json.loads(
            json.dumps(cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg), default=checkpoint.jsonable)
        )
    )


def export_checkpoint(ckpt, fmt: str, out, *, encoder_only=False) -> str:
    """Writes a loaded checkpoint (``cratemae.evaluate.checkpoints.Checkpoint``) as ``fmt`` to ``out``; returns it.

    safetensors / npz: the reference PyTorch state dict (``to_reference_state_dict``), metadata = model config, data
    config, step, source. orbax: the Flax params tree (``ocp.StandardCheckpointer``) in the directory ``out`` and the
    same metadata as JSON in ``out.json`` beside it.
    """
    if fmt not in FORMATS:
        raise ValueError(f'Unknown export format {fmt!r}; choose one of {FORMATS}.')
    out = os.fspath(out)
    if not encoder_only and 'decoder' not in ckpt.params:
        raise ValueError(
            f'{ckpt.path} was loaded without its decoder; export it with encoder_only=True or load it '
            'with encoder_only=False.'
        )
    params = models.encoder_params(ckpt.params) if encoder_only else ckpt.params
    extra = {
        'step': ckpt.step,
        'source': ckpt.path,
        'encoder_only': encoder_only,
        'data_config': _json_dict(ckpt.data_config),
        **getattr(ckpt, 'extra_metadata', {}),
    }
    if fmt in ('safetensors', 'npz'):
        state_dict = to_reference_state_dict(params, ckpt.model_config, encoder_only=encoder_only)
        (save_safetensors if fmt == 'safetensors' else save_npz)(
            out, state_dict, make_metadata(ckpt.model_config, **extra)
        )
        return out
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(os.path.abspath(out), jax.tree.map(np.asarray, params), force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    meta = {'format': ORBAX_FORMAT, 'model_config': _json_dict(ckpt.model_config), **extra}
    epath.Path(os.path.normpath(out) + '.json').write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


class _Converted(NamedTuple):  # the fields export_checkpoint reads
    params: dict
    model_config: ml_collections.ConfigDict
    path: str
    step: None
    data_config: None
    extra_metadata: dict


def convert(source, fmt: str, out, *, model_config=None, trust: bool = False) -> str:
    """Converts a reference-format file (a .pth of FAIR MAE / CRATE training, or a .safetensors / .npz without our
    metadata) once into ``fmt``, which cratemae then reads without torch and without naming the architecture.

    The architecture is ``model_config`` when given (checked against the shapes), else inferred
    (``infer_model_config``); the epoch and the training command's args, where the file has them, go into the
    metadata. The whole model is written when the file has a decoder, else the encoder.
    """
    state_dict, stored = load_state_dict(source, trust=trust)
    meta = {k: json.loads(v) for k, v in stored.items() if k in ('epoch', 'args')}
    if 'model_config' in stored:
        raise ValueError(f'{source} is already an export of cratemae (it records its model config); use it as it is.')
    cfg = model_config if model_config is not None else infer_model_config(state_dict, meta.get('args'))
    encoder_only = not any(k.startswith('decoder_blocks.') for k in state_dict)
    params = from_reference_state_dict(state_dict, cfg, encoder_only=encoder_only, source=os.fspath(source))
    ckpt = _Converted(params, cfg, os.fspath(source), None, None, {'converted_from': os.path.basename(source), **meta})
    return export_checkpoint(ckpt, fmt, out, encoder_only=encoder_only)
