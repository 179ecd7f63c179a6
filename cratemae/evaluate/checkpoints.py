"""Loading encoder weights for downstream work, from any of the three places they live.

A checkpoint path is one of:

* a training workdir: ``<workdir>/config.json`` (the resolved config) and ``<workdir>/checkpoints/<step>/state``
  (Orbax Composite item 'state' = TrainState(step, params, opt_state, rng, nonfinite_step)). Only the parameters are
  read (an Orbax partial restore: the optimizer state, three times the size of the model, never leaves the disk);
  without ``step`` the newest step that restores is used and damaged newer steps are skipped with a warning, the
  rule of ``cratemae.checkpoint.Checkpointer.restore_latest``.
* an export of ours: a reference-layout ``.safetensors`` / ``.npz`` whose metadata holds the model config, or a
  params-only Orbax directory written by ``export.export_checkpoint(..., 'orbax')`` with ``<dir>.json`` beside it.
* a reference-format file (``.safetensors`` / ``.npz``, ``.pth`` / ``.pt`` when torch is importable) without our
  metadata: the caller names the architecture (``model_config``), and ``export.from_reference_state_dict`` checks
  every key and shape against it. A ``.pth`` is read with ``torch.load(weights_only=True)`` and the allowlist of
  ``cratemae.pth`` unless the caller trusts it (``trust_checkpoint``).

Writing checkpoints in these formats is ``cratemae.export``'s job.
"""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from cratemae import checkpoint as checkpoint_lib
from cratemae import export
from cratemae import models
from cratemae import pth

log = logging.getLogger(__name__)

# Keys of config.model that change what the encoder computes; image_size may differ (the sin-cos position table is
# rebuilt for any grid, so a model pretrained at 224 px fine-tunes at another size without interpolation).
ARCHITECTURE_KEYS = (
    'encoder_block',
    'patch_size',
    'channels',
    'width',
    'depth',
    'heads',
    'mlp_ratio',
    'qkv_bias',
    'ista_step',
    'ista_lambda',
    'encoder_sees_mask_tokens',
    'block_norm_eps',
    'final_norm_eps',
    'attention_operator',
    'sparse_block',
    'sparse_expansion',
    'sparse_steps',
)
# What a config saved before a key existed meant by leaving it out.
_ARCHITECTURE_DEFAULTS = {
    'attention_operator': 'mssa',
    'sparse_block': 'ista',
    'sparse_expansion': 4,
    'sparse_steps': 2,
}


@dataclasses.dataclass
class Checkpoint:
    """Weights plus what is needed to use them: the model config, and the training config when known."""

    params: dict  # Flax params (numpy); the encoder's only when loaded with encoder_only=True
    model_config: ml_collections.ConfigDict
    source: str  # 'workdir' | 'safetensors' | 'npz' | 'orbax' | 'torch' | 'random'
    path: str
    step: int | None = None
    data_config: ml_collections.ConfigDict | None = None  # the data the weights were trained on, when recorded

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path)) or 'checkpoint'


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another architecture; the message says which and why."""


# ----------------------------------------------------------------------------------------------------------------
# Parameter trees.


def abstract_params(model_config, encoder_only=True):
    """ShapeDtypeStructs of the params of ``config.model`` (no memory, no compile)."""
    model = models.build(model_config)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), jnp.float32)
    tree = jax.eval_shape(lambda x: models.init_params(model, x, seed=0), images)
    return models.encoder_params(tree) if encoder_only else tree


def check_params(params, model_config, encoder_only=True, what='checkpoint'):
    """Raises CheckpointError naming missing, unexpected and mismatched-shape keys against ``config.model``."""
    flat = lambda tree: traverse_util.flatten_dict(tree, sep='/')  # noqa: E731
    want = {k: tuple(v.shape) for k, v in flat(abstract_params(model_config, encoder_only)).items()}
    have = {k: tuple(np.shape(v)) for k, v in flat(params).items()}
    if encoder_only:
        have = {k: v for k, v in have.items() if k.split('/')[0] in models.ENCODER_KEYS}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f'{k} (model {want[k]}, {what} {have[k]})' for k in sorted(want) if k in have and want[k] != have[k]]
    if missing or unexpected or shapes:
        parts = [
            f'{title} ({len(v)}): {", ".join(v[:12])}{" ..." if len(v) > 12 else ""}.'
            for title, v in (('Missing keys', missing), ('Unexpected keys', unexpected), ('Mismatched shapes', shapes))
            if v
        ]
        raise CheckpointError(
            f'The {what} does not fit the model config (width {model_config.width}, depth '
            f'{model_config.depth}, patch {model_config.patch_size}). ' + ' '.join(parts)
        )


def normalize_model_config(stored) -> ml_collections.ConfigDict:
    """A stored model config (dict or ConfigDict) on top of today's defaults: keys added since it was written take
    their defaults (which reproduce the old behaviour), keys this version does not know are dropped with a warning."""
    stored = stored.to_dict() if hasattr(stored, 'to_dict') else dict(stored)
    cfg = models.default_model_config()
    unknown = sorted(set(stored) - set(cfg))
    if unknown:
        log.warning('Ignoring model config keys this version does not know: %s', unknown)
    cfg.update({k: v for k, v in stored.items() if k in cfg})
    return cfg


def check_architecture(checkpoint_config, config_model, what='checkpoint'):
    """Raises CheckpointError listing the architecture keys on which the checkpoint and the config disagree."""
    diffs = [
        f'model.{k}: {what} {checkpoint_config.get(k, default)!r}, config {config_model.get(k, default)!r}'
        for k in ARCHITECTURE_KEYS
        for default in [_ARCHITECTURE_DEFAULTS.get(k)]
        if checkpoint_config.get(k, default) != config_model.get(k, default)
    ]
    if diffs:
        raise CheckpointError(
            f'The {what} was trained with another architecture than the config asks for:\n  '
            + '\n  '.join(diffs)
            + '\nChoose the matching registry entry or override the keys '
            '(e.g. --config.model.width=...).'
        )


# ----------------------------------------------------------------------------------------------------------------
# Training workdirs.


def absolute(path) -> str:
    """An absolute local path (Orbax refuses relative ones); URLs such as gs://bucket/run are left as they are."""
    path = os.fspath(path)
    return path if '://' in path else os.path.abspath(path)


def is_workdir(path) -> bool:
    path = epath.Path(path)
    return path.is_dir() and (path / checkpoint_lib.CKPT_DIR).is_dir()


def read_workdir_config(workdir) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / checkpoint_lib.CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f'{workdir} has checkpoints but no {checkpoint_lib.CONFIG_FILE}: the model config is '
            'unknown. Pass --config=experiments/registry.py:NAME (or --config=NAME).'
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _manager(directory):
    handlers = {'state': ocp.PyTreeCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # read_only=True logs two warnings that are expected here
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)
    finally:
        absl_logger.setLevel(level)


def _restore_params(manager, step):
    """Params of one step as numpy arrays, by a partial restore (the optimizer state is not read)."""
    metadata = manager.item_metadata(step)['state']
    tree = getattr(metadata, 'tree', metadata)
    if 'params' not in tree:
        raise CheckpointError(f'step {step} holds no params (keys {sorted(tree)}).')
    item = {'params': jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(tree['params']))}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    args = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=args)).state['params']


def restore_workdir_params(workdir, step=None):
    """(step, params) from a training workdir: ``step``, or the newest step that restores (older on damage)."""
    directory = epath.Path(absolute(workdir)) / checkpoint_lib.CKPT_DIR
    manager = _manager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(
                f'{directory} holds no finished checkpoint (an interrupted first save leaves only '
                'a *.orbax-checkpoint-tmp folder); train longer or pick another workdir.'
            )
        if step is not None:
            if step not in steps:
                raise CheckpointError(f'{directory} has no step {step}; saved steps: {steps}.')
            try:
                return step, _restore_params(manager, step)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types on damaged files
                raise CheckpointError(
                    f'Step {step} in {directory} could not be read (truncated or corrupt?): '
                    f'{type(e).__name__}: {checkpoint_lib.first_line(e)}'
                ) from e
        try:
            return checkpoint_lib.restore_newest(
                steps, lambda candidate: _restore_params(manager, candidate), directory
            )
        except checkpoint_lib.UnreadableCheckpointsError as e:
            raise CheckpointError(str(e)) from e
    finally:
        manager.close()


def _load_workdir(path, step, encoder_only):
    config = read_workdir_config(path)
    step, params = restore_workdir_params(path, step)
    params = models.encoder_params(params) if encoder_only else params
    return Checkpoint(
        params,
        normalize_model_config(config.model),
        'workdir',
        str(path),
        step,
        config.get('data'),
    )


# ----------------------------------------------------------------------------------------------------------------
# Files and exports.


def _config_from_json(text):
    return ml_collections.ConfigDict(json.loads(text)) if text else None


def _architecture(stored, given, what, unknown):
    """The model config of a file: the one it records, checked against the one the user gave, or the given one."""
    if stored is None and given is None:
        raise CheckpointError(f'{unknown}: pass --config=experiments/registry.py:NAME (or --config=NAME).')
    if stored is not None and given is not None:
        check_architecture(stored, given, what=what)
    return stored if stored is not None else given


def _load_file(path, model_config, encoder_only, trust_checkpoint):
    try:
        state_dict, metadata = export.load_state_dict(path, trust=trust_checkpoint)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise CheckpointError(str(e)) from e
    source = _FILE_SOURCES.get(os.path.splitext(path)[1].lower(), 'file')
    stored = normalize_model_config(export.model_config_from_metadata(metadata)) if 'model_config' in metadata else None
    if stored is None and model_config is None:
        args = json.loads(metadata['args']) if 'args' in metadata else {}
        raise CheckpointError(
            f'{path} is a reference-format file without our metadata, so its architecture is unknown: pass '
            '--config=experiments/registry.py:NAME (or --config=NAME).'
            + export.registry_hint(state_dict, args.get('model'))
            + f' Or convert it once, which records the architecture in the file:\n  {pth.convert_command(path)}'
        )
    cfg = _architecture(stored, model_config, f'file {os.path.basename(path)}', '')
    try:
        params = export.from_reference_state_dict(state_dict, cfg, encoder_only=encoder_only, source=path)
    except ValueError as e:
        raise CheckpointError(f'{path}: {e}') from e
    step = json.loads(metadata['step']) if 'step' in metadata else None
    if 'epoch' in metadata:
        log.info('%s: saved at epoch %s of its training run.', path, metadata['epoch'])
    return Checkpoint(
        params,
        cfg,
        source,
        path,
        step,
        _config_from_json(metadata.get('data_config')),
    )


_FILE_SOURCES = {'.safetensors': 'safetensors', '.npz': 'npz', '.pth': 'torch', '.pt': 'torch'}


def _sidecar(path):
    return os.path.normpath(os.fspath(path)) + '.json'


def _load_orbax(path, model_config, encoder_only):
    sidecar = _sidecar(path)
    meta = json.loads(epath.Path(sidecar).read_text()) if os.path.exists(sidecar) else {}
    stored = normalize_model_config(meta['model_config']) if 'model_config' in meta else None
    cfg = _architecture(
        stored,
        model_config,
        f'export {path}',
        f'{path} is an Orbax params directory without {sidecar}, so its architecture is unknown',
    )
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree = checkpointer.metadata(os.path.abspath(path))
        tree = getattr(tree, 'item_metadata', tree)
        tree = getattr(tree, 'tree', tree)
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), dict(tree))
        params = checkpointer.restore(os.path.abspath(path), target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f'Could not read the Orbax params in {path} (truncated or corrupt?): '
            f'{type(e).__name__}: {checkpoint_lib.first_line(e)}'
        ) from e
    finally:
        checkpointer.close()
    params = jax.tree.map(np.asarray, params)
    params = models.encoder_params(params) if encoder_only else params
    check_params(params, cfg, encoder_only, what=f'export {path}')
    return Checkpoint(
        params,
        cfg,
        'orbax',
        str(path),
        meta.get('step'),
        _config_from_json(json.dumps(meta['data_config'])) if meta.get('data_config') else None,
    )


def load(path, *, step=None, model_config=None, encoder_only=True, trust_checkpoint=False) -> Checkpoint:
    """Loads a training workdir, an export of ours, or a reference-format file (see the module docstring).

    model_config: the architecture for files that do not record one; for files that do, it must agree on
    ``ARCHITECTURE_KEYS``. Errors (missing or damaged files, other architectures) are ``CheckpointError``s.
    trust_checkpoint: read a .pth without the weights_only restriction (``cratemae.pth``); only for trusted files.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(
            f'Checkpoint not found: {path} (expected a training workdir, a .safetensors/.npz/.pth '
            'file or an Orbax params directory).'
        )
    if is_workdir(path):
        ckpt = _load_workdir(path, step, encoder_only)
        if model_config is not None:
            check_architecture(ckpt.model_config, model_config, what=f'workdir {path}')
        return ckpt
    if step is not None:
        raise CheckpointError(f'--step applies to training workdirs only; {path} holds a single set of weights.')
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, '_CHECKPOINT_METADATA')) and not os.path.exists(_sidecar(path)):
            raise CheckpointError(
                f'{path} is a directory but neither a training workdir (no checkpoints/) nor an '
                'Orbax params export (no _CHECKPOINT_METADATA).'
            )
        return _load_orbax(path, model_config, encoder_only)
    return _load_file(path, model_config, encoder_only, trust_checkpoint)


def random_init(model_config, seed=0, encoder_only=True) -> Checkpoint:
    """A randomly initialised model of ``config.model``, the one a training run with this seed starts from
    (``models.random_params``): the baseline a pretrained encoder must beat."""
    params = models.random_params(model_config, seed)
    params = models.encoder_params(params) if encoder_only else params
    return Checkpoint(params, model_config, 'random', f'random_init_seed{seed}', None, None)
