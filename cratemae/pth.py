"""Reading PyTorch checkpoint files (``.pth`` / ``.pt``) as the reference's training scripts write them.

FAIR MAE's ``save_model`` (which the CRATE README tells users to train CRATE-MAE with) writes
``{'model': state_dict, 'optimizer': ..., 'epoch': int, 'scaler': ..., 'args': argparse.Namespace}``; CRATE's own
scripts write ``{'state_dict' | 'model': ..., 'epoch': ..., 'optimizer': ...}``. ``torch.load(weights_only=True)``
unpickles only tensors and plain containers, so the one non-plain object there, the ``argparse.Namespace`` of the
command line, is refused unless allowed. ``SAFE_GLOBALS`` allows it and numpy scalars (metrics such as a best
accuracy saved as ``np.float64``), both pure data, for the duration of one ``torch.load`` call only. Anything else
stays refused unless the user says they trust the file (``trust=True``, the launchers' ``--trust_checkpoint``), which
unpickles with ``weights_only=False`` and so may run code from the file.

Each way a file can fail to read has its own message: not a checkpoint at all (often an HTML page saved by a failed
download), truncated, a refused object (named, with the flag), or torch not installed (with the command that converts
the file once, where torch is installed, into the torch-free ``.safetensors`` that the rest of cratemae reads).
"""

import argparse
import os
import re
import zipfile
from typing import Any
from typing import Mapping

import numpy as np

from cratemae import checkpoint

TRUST_FLAG = '--trust_checkpoint'
_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b'\x80'  # the legacy format: a pickle (protocol >= 2) of a magic number, then the data


def convert_command(path) -> str:
    """The one-time conversion of ``path`` into the torch-free format, for messages."""
    stem, suffix = os.path.splitext(os.fspath(path))
    out = f'{stem}.cratemae.safetensors' if suffix == '.safetensors' else f'{stem}.safetensors'
    return f'python -m launch.export --from {path} --format safetensors --out {out}'


def safe_globals() -> list:
    """The plain objects the reference scripts save besides tensors: allowed for weights_only loading.

    numpy's scalar constructor moved from numpy.core to numpy._core in numpy 2, and the pickle names the module
    of the numpy that wrote the file, so both spellings are listed.
    """
    scalar = np._core.multiarray.scalar  # pylint: disable=protected-access
    return [
        argparse.Namespace,
        np.dtype,
        (scalar, 'numpy.core.multiarray.scalar'),
        (scalar, 'numpy._core.multiarray.scalar'),
        *_numpy_dtype_classes(),
    ]


def _numpy_dtype_classes():
    """numpy >= 1.25 pickles some dtypes by their class (numpy.dtypes.Float64DType ...)."""
    dtypes = getattr(np, 'dtypes', None)
    return [getattr(dtypes, name) for name in dir(dtypes) if name.endswith('DType')] if dtypes else []


class UnreadableCheckpoint(ValueError):
    """A file that is not a readable PyTorch checkpoint; the message says why and what to do."""


def _import_torch(path):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise ImportError(
            f'Reading {path} needs PyTorch, which is not installed here. Either install it '
            f'(pip install torch), or convert the file once where torch is installed:\n  '
            f'{convert_command(path)}\nand use the .safetensors file, which needs no torch.'
        ) from err
    return torch


def _check_container(path):
    """Raises UnreadableCheckpoint unless the file starts like a torch checkpoint and, if a zip, is complete."""
    with open(path, 'rb') as f:
        head = f.read(512)
    size = os.path.getsize(path)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):  # the central directory at the end is missing
            raise UnreadableCheckpoint(
                f'{path} ({size:,} bytes) is a truncated PyTorch checkpoint: the zip archive '
                'has no end (an interrupted download or copy). Download or copy it again.'
            )
        return
    if head.startswith(_PICKLE_MAGIC):
        return
    text = head.lstrip().lower()
    what = (
        'an HTML page (a download link that returned a web page, e.g. a cloud drive\'s confirmation page, '
        'instead of the file)'
        if text.startswith((b'<!doctype html', b'<html'))
        else f'a file starting with {head[:16]!r}'
    )
    raise UnreadableCheckpoint(
        f'{path} ({size:,} bytes) is not a PyTorch checkpoint at all (neither the zip '
        f'archive torch.save writes nor a pickle): it is {what}. Check the download.'
    )


def _refused_names(torch, path, err):
    """The globals weights_only refused: all of them when torch can list them, else the one in the message."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy-format files cannot be listed
        names = []
    allowed = {_global_name(g) for g in safe_globals()}
    names = [n for n in names if n not in allowed]
    if not names:
        names = re.findall(r'Unsupported global: GLOBAL ([\w.]+)', str(err))
        names = [n for n in names if n not in allowed]
    return names


def _global_name(entry):
    return entry[1] if isinstance(entry, tuple) else f'{entry.__module__}.{entry.__qualname__}'


def read(path, trust: bool = False) -> Any:
    """The object stored in a .pth/.pt file; weights_only unpickling with ``safe_globals()`` unless ``trust``."""
    path = os.fspath(path)
    torch = _import_torch(path)
    _check_container(path)
    if trust:
        try:
            return torch.load(path, map_location='cpu', weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise _damaged(path, err) from err
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError ...
        if 'Unsupported global' in str(err) or 'Unsupported class' in str(err):
            names = _refused_names(torch, path, err)
            listed = ', '.join(names) or 'an object'
            raise UnreadableCheckpoint(
                f'{path} holds {listed}, which safe loading (torch.load weights_only=True) refuses: unpickling it '
                'could run code from the file. cratemae allows only tensors, plain containers, argparse.Namespace '
                f'and numpy scalars. If you trust the file, pass {TRUST_FLAG} (weights_only=False), or convert it '
                f'once with {TRUST_FLAG}:\n  {convert_command(path)} {TRUST_FLAG}'
            ) from err
        raise _damaged(path, err) from err


def _damaged(path, err):
    if isinstance(err, EOFError) or 'unexpected EOF' in str(err):  # a legacy-format (pickle) file cut short
        return UnreadableCheckpoint(
            f'{path} is a truncated PyTorch checkpoint: the data ends early (an interrupted '
            'download or copy). Download or copy it again.'
        )
    return UnreadableCheckpoint(
        f'Could not read {path} (truncated or corrupt?): {type(err).__name__}: {checkpoint.first_line(err)}'
    )


def metadata(obj: Mapping) -> dict[str, Any]:
    """What a training script stored beside the weights, as plain values: ``epoch`` and ``args`` where present."""
    out = {}
    epoch = obj.get('epoch')
    if isinstance(epoch, (int, np.integer)) and not isinstance(epoch, bool) or getattr(epoch, 'numel', int)() == 1:
        out['epoch'] = int(epoch)  # an int, or a one-element tensor
    args = obj.get('args')
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        out['args'] = {str(k): v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return out
