"""Export to and import from the reference PyTorch state dict of CRATE-MAE.

The reference is `MaskedAutoencoderViT` in Ma-Lab-Berkeley/CRATE `model/crate_ae/crate_ae.py` with CRATE blocks
(`mae_crate_{tiny,small,base,large}`); `_layout` is the key map of spec §2.10. torch `nn.Linear` computes
y = x W^T + b, so W = Dense kernel^T (qkv U, to_out, decoder A, decoder_pred); the ISTA dictionary D is stored
untransposed; conv weight [d,C,p,p] = kernel (p,p,C,d).transpose(3,2,0,1). pos_embed = decoder_pos_embed = the fixed
sin-cos table (1,N,d); decoder_embed is written as zeros (the reference builds it but never uses it).

Files: `.safetensors` (metadata: str -> str in the header), `.npz` (metadata and the true dtypes in a JSON string
entry `__metadata__`, because npz stores bfloat16 as an anonymous void type; bfloat16 tensors are stored as their
uint16 bit pattern and viewed back on load), and reading `.pth`/`.pt` when torch is importable.
The metadata entry `model_config` holds the model config as JSON, so a reader can rebuild the model without the
experiment registry (`model_config_from_metadata`).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping, NamedTuple

import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util

from cratemae import ops

LAYOUT = 'Ma-Lab-Berkeley/CRATE model/crate_ae/crate_ae.py MaskedAutoencoderViT (CRATE blocks)'
FORMAT = 'cratemae.reference_state_dict.v1'
_NPZ_META_KEY = '__metadata__'
_PREFIXES = ('module.', 'model.')
_WRAPPER_KEYS = ('model', 'state_dict', 'module', 'model_state_dict')


class _Entry(NamedTuple):
    key: str                  # torch state-dict key
    path: tuple | None        # Flax param path; None for tensors that are not Flax params
    kind: str                 # 'copy' | 'T' (Dense kernel) | 'conv' | 'pos' | 'zeros'
    layer: int | None         # index into the nn.scan depth axis
    shape: tuple              # torch shape


def _get(cfg, name, default):
    value = cfg.get(name, default) if hasattr(cfg, 'get') else getattr(cfg, name, default)
    return default if value is None else value


def _arch(model_config):
    """Validates that the config has a reference layout and returns its sizes."""
    enc, dec = _get(model_config, 'encoder_block', 'crate'), _get(model_config, 'decoder_block', 'crate')
    sees_mask = _get(model_config, 'encoder_sees_mask_tokens', True)
    d, dd = int(_get(model_config, 'width', 768)), int(_get(model_config, 'decoder_width', 768))
    if enc != 'crate' or dec != 'crate' or not sees_mask or d != dd:
        raise ValueError(
            'No reference state-dict layout exists for this model config (encoder_block=%r, decoder_block=%r, '
            'encoder_sees_mask_tokens=%r, width=%d, decoder_width=%d): only CRATE-MAE with CRATE encoder and decoder '
            'blocks, mask tokens in the encoder and decoder_width == width has one (%s).'
            % (enc, dec, sees_mask, d, dd, LAYOUT))
    image, p = int(_get(model_config, 'image_size', 224)), int(_get(model_config, 'patch_size', 16))
    if image % p:
        raise ValueError(f'image_size {image} is not divisible by patch_size {p}.')
    grid = image // p
    return dict(d=d, p=p, c=int(_get(model_config, 'channels', 3)), grid=grid, n=grid * grid + 1,
                depth=int(_get(model_config, 'depth', 12)), dec_depth=int(_get(model_config, 'decoder_depth', 12)))


def _mssa_entries(prefix, stack, i, d):
    return [_Entry(prefix + 'qkv.weight', (stack, 'layers', 'mssa', 'qkv', 'kernel'), 'T', i, (d, d)),
            _Entry(prefix + 'to_out.0.weight', (stack, 'layers', 'mssa', 'out', 'kernel'), 'T', i, (d, d)),
            _Entry(prefix + 'to_out.0.bias', (stack, 'layers', 'mssa', 'out', 'bias'), 'copy', i, (d,))]


def _norm_entries(prefix, path, i, d):
    return [_Entry(prefix + 'weight', path + ('scale',), 'copy', i, (d,)),
            _Entry(prefix + 'bias', path + ('bias',), 'copy', i, (d,))]


def _layout(model_config, encoder_only=False):
    """The reference tensors in the reference state-dict order (own parameters first, then submodules)."""
    a = _arch(model_config)
    d, p, c, n = a['d'], a['p'], a['c'], a['n']
    out = [_Entry('cls_token', ('cls_token',), 'copy', None, (1, 1, d)),
           _Entry('pos_embed', None, 'pos', None, (1, n, d)),
           _Entry('mask_token', ('mask_token',), 'copy', None, (1, 1, d))]
    if not encoder_only:
        out.append(_Entry('decoder_pos_embed', None, 'pos', None, (1, n, d)))
    out += [_Entry('patch_embed.proj.weight', ('patch_embed', 'kernel'), 'conv', None, (d, c, p, p)),
            _Entry('patch_embed.proj.bias', ('patch_embed', 'bias'), 'copy', None, (d,))]
    for i in range(a['depth']):
        b = f'blocks.{i}.layers.0.'
        out += _norm_entries(b + '0.norm.', ('encoder', 'layers', 'norm1'), i, d)
        out += _mssa_entries(b + '0.fn.', 'encoder', i, d)
        out += _norm_entries(b + '1.norm.', ('encoder', 'layers', 'norm2'), i, d)
        out.append(_Entry(b + '1.fn.weight', ('encoder', 'layers', 'ista', 'dictionary'), 'copy', i, (d, d)))
    out += _norm_entries('norm.', ('encoder_norm',), None, d)
    if encoder_only:
        return out
    out += [_Entry('decoder_embed.weight', None, 'zeros', None, (d, d)),
            _Entry('decoder_embed.bias', None, 'zeros', None, (d,))]
    for i in range(a['dec_depth']):
        b = f'decoder_blocks.{i}.layers.0.'
        out += _norm_entries(b + '0.norm.', ('decoder', 'layers', 'norm1'), i, d)
        out.append(_Entry(b + '0.fn.weight', ('decoder', 'layers', 'unsparsify', 'kernel'), 'T', i, (d, d)))
        out += _norm_entries(b + '1.norm.', ('decoder', 'layers', 'norm2'), i, d)
        out += _mssa_entries(b + '1.fn.', 'decoder', i, d)
    out += _norm_entries('decoder_norm.', ('decoder_norm',), None, d)
    out += [_Entry('decoder_pred.weight', ('decoder_pred', 'kernel'), 'T', None, (p * p * c, d)),
            _Entry('decoder_pred.bias', ('decoder_pred', 'bias'), 'copy', None, (p * p * c,))]
    return out


def reference_shapes(model_config, encoder_only: bool = False) -> dict[str, tuple]:
    """{torch key: torch shape} of the reference state dict, in reference order."""
    return {e.key: e.shape for e in _layout(model_config, encoder_only)}


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == 'bfloat16' else np.dtype(dtype)


def _as_array(leaf):
    """A numpy view of a param leaf; abstract leaves (jax.ShapeDtypeStruct) become zero-strided, memory-free views."""
    abstract = not hasattr(leaf, '__array__')
    return np.broadcast_to(np.zeros((), _np_dtype(leaf.dtype)), tuple(leaf.shape)) if abstract else np.asarray(leaf)


def _to_numpy(value):
    """Converts a torch tensor or array-like to numpy, keeping bfloat16 (torch's .numpy() refuses it)."""
    if hasattr(value, 'detach'):
        value = value.detach().cpu()
        if str(value.dtype) == 'torch.bfloat16':
            import torch  # pylint: disable=import-outside-toplevel
            return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _transform(arr, kind, to_torch):
    """Dense kernel (in,out) <-> torch weight (out,in); conv kernel (p,p,C,d) <-> torch weight (d,C,p,p)."""
    if kind == 'conv':
        return arr.transpose((3, 2, 0, 1) if to_torch else (2, 3, 1, 0))
    return arr.T if kind == 'T' else arr


def _pos_table(a, dtype):  # (1, N, d)
    return ops.sincos_pos_embed(a['d'], a['grid'])[None].astype(dtype)


def to_reference_state_dict(params, model_config, *, encoder_only: bool = False,
                            dtype=None) -> dict[str, np.ndarray]:
    """Flax params (or {'params': ...}) -> the reference torch state dict as numpy arrays, in reference order.

    Leaves may be arrays or abstract `jax.ShapeDtypeStruct`s (giving memory-free zero-strided placeholders of the
    right shapes and dtypes). dtype=None keeps each param's dtype; pos_embed, decoder_pos_embed and decoder_embed
    take the patch-embedding kernel's. encoder_only: only patch_embed, cls/mask_token, pos_embed, blocks.*, norm.*.
    """
    if 'params' in params and 'patch_embed' not in params:  # a variables dict
        params = params['params']
    a = _arch(model_config)
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
                    raise ValueError(f'Flax params {"/".join(e.path)} have shape {arr.shape}; the model config '
                                     f'expects {n_layers} stacked {e.path[0]} layers ({e.key!r}).')
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


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwraps {'model': sd} style checkpoints, strips 'module.'/'model.' key prefixes, converts to numpy."""
    sd = state_dict
    for wrapper in _WRAPPER_KEYS:
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    out = {}
    for key, value in sd.items():
        if not hasattr(value, 'shape'):  # e.g. epoch counters or args saved next to the tensors
            continue
        while key.startswith(_PREFIXES):
            key = key.split('.', 1)[1]
        out[key] = _to_numpy(value)
    return out


def _shorten(items, limit=12):
    more = f' ... and {len(items) - limit} more' if len(items) > limit else ''
    return ', '.join(str(x) for x in items[:limit]) + more


def _architecture_hint(keys):
    if any('.attn.qkv.' in k or '.mlp.fc1.' in k for k in keys):
        return (' The checkpoint has timm ViT blocks (attn.qkv / mlp.fc1): it looks like FAIR MAE or '
                'crate_ae.mae_vit_*, not CRATE-MAE.')
    depths = [len({k.split('.')[1] for k in keys if k.startswith(s)}) for s in ('blocks.', 'decoder_blocks.')]
    return ' The checkpoint has %d encoder and %d decoder blocks.' % tuple(depths)


def _validate(sd, layout, ignored):
    expected = {e.key: e.shape for e in layout}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k not in ignored]
    mismatched = [f'{k} (expected {expected[k]}, got {tuple(sd[k].shape)})'
                  for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = [('Missing keys', missing), ('Unexpected keys', unexpected), ('Mismatched shapes', mismatched)]
    if missing or unexpected or mismatched:
        raise ValueError('State dict does not match the CRATE-MAE reference layout for this model config. '
                         + ' '.join(f'{name} ({len(v)}): {_shorten(v)}.' for name, v in problems if v)
                         + _architecture_hint(sd))


def from_reference_state_dict(state_dict: Mapping[str, Any], model_config, *, encoder_only: bool = False,
                              dtype='float32', check_pos_embed: bool = True) -> dict:
    """Reference torch state dict -> the Flax params tree (numpy arrays; nested dicts; no {'params': } wrapper).

    Validates keys and shapes against the config and raises ValueError naming the missing keys, unexpected keys
    and mismatched shapes. pos_embed/decoder_pos_embed are not loaded (fixed sin-cos; warns if they differ from it
    beyond max(1e-4, eps of their dtype)); decoder_embed is ignored. encoder_only=True builds the encoder params
    only and ignores the decoder-side tensors. dtype=None keeps the stored dtypes.
    """
    sd = normalize_state_dict(state_dict)
    a = _arch(model_config)
    layout = _layout(model_config, encoder_only)
    ignored = set(reference_shapes(model_config)) if encoder_only else set()
    _validate(sd, layout, ignored)
    out_dtype = None if dtype is None else _np_dtype(dtype)
    flat = {}
    for e in layout:
        arr = sd[e.key]
        if e.kind == 'pos':
            if check_pos_embed:
                diff = np.max(np.abs(arr.astype(np.float32) - _pos_table(a, np.float32)))
                if diff > max(1e-4, float(ml_dtypes.finfo(arr.dtype).eps)):  # allow rounding to a low precision
                    warnings.warn(f'{e.key} differs from the fixed sin-cos table by up to {diff:.3g}; '
                                  'the model uses the sin-cos table.')
            continue
        if e.kind == 'zeros':  # decoder_embed: unused by the reference forward
            continue
        arr = _transform(arr, e.kind, to_torch=False)
        arr = np.array(arr, dtype=out_dtype or arr.dtype)  # a contiguous copy
        flat[e.path] = arr if e.layer is None else flat.get(e.path, []) + [arr]  # layers in order 0..depth-1
    return traverse_util.unflatten_dict({k: np.stack(v) if isinstance(v, list) else v for k, v in flat.items()})


# ----------------------------------------------------------------------------------------------------------------
# Metadata and files.

def _jsonable(x):
    return list(x) if isinstance(x, (tuple, set)) else x.item() if hasattr(x, 'item') else str(x)


def make_metadata(model_config, **extra) -> dict[str, str]:
    """Header metadata: format, reference layout and `model_config` as JSON; extra values JSON-encoded if not str."""
    cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    meta = {'format': FORMAT, 'layout': LAYOUT,
            'model_config': json.dumps(cfg, sort_keys=True, default=_jsonable)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=_jsonable)
                 for k, v in extra.items()})
    return meta


def model_config_from_metadata(metadata: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds the model ConfigDict stored by `make_metadata`."""
    if 'model_config' not in metadata:
        raise ValueError(f'Metadata has no model_config entry (keys: {sorted(metadata)}).')
    return ml_collections.ConfigDict(json.loads(metadata['model_config']))


def _check_metadata(metadata):
    metadata = dict(metadata or {})
    if bad := [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]:
        raise TypeError(f'Metadata must map str to str (use make_metadata); offending keys: {bad}.')
    return metadata


def _atomic_write(path, write):
    """write(tmp_path) then os.replace, so readers never see a half-written file."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(path, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Writes a .safetensors file atomically (bfloat16 is stored as BF16, readable by torch)."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    tensors = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in state_dict.items()}
    metadata = _check_metadata(metadata)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_npz(path, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Writes an uncompressed .npz atomically; entry `__metadata__` is JSON {'metadata': {...}, 'dtypes': {...}}.

    Tensors whose dtype numpy cannot name (ml_dtypes' bfloat16 etc.) are stored as unsigned-int bit patterns of
    the same width, and 'dtypes' records the real dtype name so `load_state_dict` views them back.
    """
    if _NPZ_META_KEY in state_dict:
        raise ValueError(f'{_NPZ_META_KEY!r} is a reserved key in npz files.')
    arrays, dtypes = {}, {}
    for key, value in state_dict.items():
        arr = np.ascontiguousarray(_to_numpy(value))
        if arr.dtype.kind == 'V':
            dtypes[key] = arr.dtype.name
            arr = arr.view(np.dtype(f'u{arr.dtype.itemsize}'))
        arrays[key] = arr
    header = json.dumps({'metadata': _check_metadata(metadata), 'dtypes': dtypes}, sort_keys=True)
    arrays[_NPZ_META_KEY] = np.array(header)

    def write(tmp):
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
    _atomic_write(path, write)


def _load_safetensors(path):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(path, framework='np') as f:
        metadata = dict(f.metadata() or {})
        return {k: np.array(f.get_tensor(k)) for k in f.keys()}, metadata


def _load_npz(path):
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z[_NPZ_META_KEY])) if _NPZ_META_KEY in z.files else {}
        dtypes = header.get('dtypes', {})
        sd = {k: z[k].view(getattr(ml_dtypes, dtypes[k])) if k in dtypes else z[k]
              for k in z.files if k != _NPZ_META_KEY}
    return sd, dict(header.get('metadata', {}))


def _load_torch(path):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(f'Reading {path} needs PyTorch, which is not installed; convert the checkpoint to '
                          '.safetensors where torch is available.') from err
    obj = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict.')
    return normalize_state_dict(obj), {}


_LOADERS = {'.safetensors': _load_safetensors, '.npz': _load_npz, '.pth': _load_torch, '.pt': _load_torch}


def load_state_dict(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads (state_dict, metadata) from .safetensors, .npz, or .pth/.pt (needs torch; metadata is then {})."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _LOADERS:
        raise ValueError(f'Unsupported checkpoint file type {suffix!r} for {path}; use one of {sorted(_LOADERS)}.')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint file not found: {path}')
    try:
        return _LOADERS[suffix](path)
    except ImportError:
        raise
    except Exception as err:  # safetensors, zipfile and torch each raise their own types on damaged files
        raise ValueError(f'Could not read checkpoint file {path} (truncated or corrupt?): '
                         f'{type(err).__name__}: {err}') from err
