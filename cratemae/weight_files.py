"""State-dict files: reading and writing ``.safetensors``, ``.npz`` and (reading) ``.pth`` / ``.pt``, with metadata.

``.safetensors`` keeps its metadata (str -> str) in the header. ``.npz`` keeps the metadata and the true dtypes in a
JSON string entry ``__metadata__``, because npz stores bfloat16 as an anonymous void type: bfloat16 tensors are
stored as their uint16 bit pattern and viewed back on load. ``.pth`` / ``.pt`` are read through ``cratemae.pth``
when torch is importable. The metadata entry ``model_config`` holds the model config as JSON, so a reader can rebuild
the model without the experiment registry (``model_config_from_metadata``). Writes are atomic (a temporary file,
then a rename). What the tensors mean (the reference layout) is ``cratemae.export``'s concern.
"""

from __future__ import annotations

import json
import os
from typing import Any
from typing import Mapping

import ml_collections
import ml_dtypes
import numpy as np

from cratemae import checkpoint
from cratemae import pth

LAYOUT = 'Ma-Lab-Berkeley/CRATE model/crate_ae/crate_ae.py MaskedAutoencoderViT (CRATE blocks)'
FORMAT = 'cratemae.reference_state_dict.v1'
_NPZ_META_KEY = '__metadata__'
# Wrappers and key prefixes of training scripts' state dicts ({'model': sd}, DataParallel's 'module.').
_PREFIXES = ('module.', 'model.')
_WRAPPER_KEYS = ('model', 'state_dict', 'module', 'model_state_dict')


def to_numpy(value):
    """Converts a torch tensor or array-like to numpy, keeping bfloat16 (torch's .numpy() refuses it)."""
    if hasattr(value, 'detach'):
        value = value.detach().cpu()
        if str(value.dtype) == 'torch.bfloat16':
            import torch  # pylint: disable=import-outside-toplevel

            return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


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
        out[key] = to_numpy(value)
    return out


def make_metadata(model_config, **extra) -> dict[str, str]:
    """Header metadata: format, reference layout and `model_config` as JSON; extra values JSON-encoded if not str."""
    cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    meta = {
        'format': FORMAT,
        'layout': LAYOUT,
        'model_config': json.dumps(cfg, sort_keys=True, default=checkpoint.jsonable),
    }
    meta.update(
        {
            k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=checkpoint.jsonable)
            for k, v in extra.items()
        }
    )
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

    tensors = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
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
        arr = np.ascontiguousarray(to_numpy(value))
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
        sd = {
            k: z[k].view(getattr(ml_dtypes, dtypes[k])) if k in dtypes else z[k] for k in z.files if k != _NPZ_META_KEY
        }
    return sd, dict(header.get('metadata', {}))


def _load_torch(path, trust=False):
    obj = pth.read(path, trust=trust)
    if not isinstance(obj, Mapping):
        raise pth.UnreadableCheckpoint(f'{path} holds a {type(obj).__name__}, not a state dict.')
    return normalize_state_dict(obj), {k: json.dumps(v, sort_keys=True) for k, v in pth.metadata(obj).items()}


_LOADERS = {'.safetensors': _load_safetensors, '.npz': _load_npz, '.pth': _load_torch, '.pt': _load_torch}


def load_state_dict(path, trust: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads (state_dict, metadata) from .safetensors, .npz, or .pth/.pt (needs torch; see ``cratemae.pth``).

    The metadata of a .pth file is what its training script saved beside the weights (``epoch``, ``args``) as JSON.
    ``trust`` unpickles a .pth file without the weights_only restriction (only for files the user trusts).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _LOADERS:
        raise ValueError(f'Unsupported checkpoint file type {suffix!r} for {path}; use one of {sorted(_LOADERS)}.')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint file not found: {path}')
    if suffix in ('.pth', '.pt'):
        return _load_torch(path, trust)  # its errors already say what is wrong and what to do
    try:
        return _LOADERS[suffix](path)
    except Exception as err:  # safetensors and zipfile each raise their own types on damaged files
        raise ValueError(
            f'Could not read checkpoint file {path} (truncated or corrupt?): {type(err).__name__}: {err}'
        ) from err
