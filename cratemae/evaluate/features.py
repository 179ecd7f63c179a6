"""Frozen-encoder features of a whole split, sharded over the mesh and cached on disk.

The encoder sees each image once, unmasked, through the eval transform (centre crop + resize, no augmentation):
z = LN_enc(encoder([c; e_1..e_L] + P)) (``MaskedAutoencoder.encode``), and the feature is

    cls:    f = z_0                         (the class token after the final norm; FAIR's linear-probe feature)
    mean:   f = (1/L) sum_{i=1..L} z_i      (the mean of the patch tokens after the final norm)
    pixels: f = x, flattened                (the normalised image itself: the baseline every encoder must beat)

The batch is split over the mesh's ('data', 'fsdp') devices (``cratemae.sharding``); the parameters are replicated
unless sharding rules say otherwise. Features are cached as ``<cache_dir>/<key>.npz``, where the key hashes everything
that determines them (``cache_key``): the weights themselves (a digest of every parameter), the resolved data
(``ResolvedDataset.identity``: a tfds dataset's resolved version and image/label keys, an image folder's file list with
sizes and modification times), the split, the preprocessing and the feature type. So probing the same weights again
(another probe, another k) does not run the encoder, and a changed folder or dataset is computed afresh. A result
read from the cache says so (``Features.cached``) and when it was computed (``Features.computed_at``).
"""

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cratemae import data
from cratemae import models
from cratemae import sharding
from cratemae.data import device
from cratemae.data import embedded
from cratemae.data import splits as split_lib

log = logging.getLogger(__name__)

FEATURES = ('cls', 'mean', 'pixels')
_CACHE_VERSION = 2
# (train, eval) splits per dataset when the checkpoint's own data config does not name them.
DEFAULT_SPLITS = {'imagenet2012': ('train', 'validation')}


@dataclasses.dataclass
class Features:
    x: np.ndarray  # (N, d) float32
    y: np.ndarray  # (N,) int32
    num_classes: int | None
    cached: bool = False  # True when read from the cache
    computed_at: str = ''  # when the encoder computed them (UTC, ISO 8601), also for a cached result


def default_cache_dir():
    """$CRATEMAE_CACHE/features (default ~/.cache/cratemae/features), next to the embedded datasets' cache."""
    return os.path.join(embedded.cache_dir(), 'features')


def probe_data_config(
    ckpt, dataset=None, data_dir=None, split_train=None, split_eval=None, *, holdout=None, eval_on_train=False
):
    """(data config, its dataset resolved once, note) for probing ``ckpt``: its training data by default, at the
    model's size, no augmentation. Hand the dataset on to ``split_features``.

    ``split_train`` / ``split_eval`` override the splits; both are resolved (``'auto'`` -> the evaluation split the
    data has) and checked here, so a missing split is an error before any feature is computed. A test split that
    shares images with the train split is refused (``splits.held_out``) unless ``holdout`` (a percentage: the last
    ``holdout``% of the train split is held out) or ``eval_on_train``; the note says which splits were used.
    """
    trained = ckpt.data_config
    if dataset is None and trained is None:
        raise ValueError(
            f'{ckpt.path} does not record the dataset it was trained on; pass --dataset NAME '
            f'(one of {", ".join(data.dataset_names())}).'
        )
    cfg = data.default_data_config()
    same = trained is not None and (dataset is None or dataset == trained.get('name'))
    if same:
        cfg.update({k: v for k, v in trained.items() if k in cfg})
    else:
        cfg.name = dataset
        cfg.split_train, cfg.split_eval = DEFAULT_SPLITS.get(dataset, ('train', 'auto'))
    cfg.update(image_size=ckpt.model_config.image_size, channels=ckpt.model_config.channels, augment='none')
    if data_dir is not None:
        cfg.data_dir = data_dir
    if split_train is not None:
        cfg.split_train = split_train
    if split_eval is not None:
        cfg.split_eval = split_eval
    data.validate_data_config(cfg)
    dataset = data.resolve(cfg)
    cfg.split_train, cfg.split_eval, note = split_lib.held_out(
        dataset.split(cfg.split_train),
        dataset.split(cfg.split_eval),
        holdout=holdout,
        eval_on_train=eval_on_train,
        what='a probe accuracy',
    )
    dataset.split(cfg.split_eval)
    return cfg, dataset, note


def _pool(model, feature, params, images):
    if feature == 'pixels':
        return images.reshape(images.shape[0], -1)
    z = model.apply({'params': params}, images, method=model.encode)
    return z[:, 0] if feature == 'cls' else jnp.mean(z[:, 1:], axis=1)


def _gather(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x)


def extract(model_config, params, pipe, feature, mesh, rules=()):
    """(features (N, d) float32, labels (N,)) of every example of the eval-mode pipeline ``pipe``, in stored order."""
    if feature not in FEATURES:
        raise ValueError(f'Unknown feature {feature!r}; choose one of {FEATURES}.')
    model = models.build(model_config)
    param_sharding = sharding.param_shardings(params, rules, mesh)
    params = jax.device_put(params, param_sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    mean, std = pipe.info.mean, pipe.info.std

    def fn_(p, x):  # uint8 batches (split_features' pipeline) are normalised here, on the devices
        x = device.normalize(x, mean, std) if x.dtype == jnp.uint8 else x
        return _pool(model, feature, p, x).astype(jnp.float32)

    fn = jax.jit(fn_, in_shardings=(param_sharding, batch_sharding), out_shardings=batch_sharding)
    outs, labels, valid = [], [], []
    for local, batch in device.eval_batches(pipe, mesh):  # the pipeline's workers decode; copies run ahead
        outs.append(fn(params, batch['image']))  # dispatched asynchronously
        labels.append(_gather(local['label']) if jax.process_count() > 1 else local['label'])
        valid.append(_gather(local['valid']) if jax.process_count() > 1 else local['valid'])
    x = np.concatenate([_gather(o) for o in outs])
    keep = np.concatenate(valid)
    return x[keep], np.concatenate(labels)[keep].astype(np.int32)


def weights_digest(params) -> str:
    """sha256 over every parameter's path, dtype, shape and bytes: the weights, wherever they were loaded from."""
    h = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f'{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}\n'.encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(ckpt, data_cfg, split, feature, dataset=None) -> str:
    """sha256 over what determines the features: the weights' digest, the resolved data of ``split``
    (``ResolvedDataset.identity``), the preprocessing (size, channels, normalisation constants, eval crop) and the
    feature. ``dataset``: ``data_cfg``'s dataset, resolved already (else resolved here)."""
    dataset = data.resolve(data_cfg, dataset)
    what = {
        'v': _CACHE_VERSION,
        'weights': 'pixels' if feature == 'pixels' else weights_digest(ckpt.params),
        'data': dataset.identity(split),
        'preprocessing': {
            'image_size': dataset.image_size,
            'channels': dataset.channels,
            'normalization': (dataset.mean, dataset.std),
            'eval_crop_pct': dataset.eval_crop_pct,
        },
        'feature': feature,
    }
    if data_cfg.get('resize', 'pil') != 'pil':  # another resize, other pixels (keys made before it stay valid)
        what['resize'] = data_cfg.get('resize')
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read_cache(path):
    try:
        with np.load(path) as f:
            num_classes = int(f['num_classes'])
            computed_at = str(f['computed_at'])
            return Features(f['x'], f['y'], None if num_classes < 0 else num_classes, True, computed_at)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError) as e:  # a damaged cache entry is recomputed, not fatal
        log.warning('Ignoring unreadable feature cache %s (%s).', path, e)
        return None


def _write_cache(path, feats):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            np.savez(
                f,
                x=feats.x,
                y=feats.y,
                num_classes=-1 if feats.num_classes is None else feats.num_classes,
                computed_at=np.asarray(feats.computed_at),
            )
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as e:
        log.warning('Could not write the feature cache %s (%s).', path, e)


def split_features(
    ckpt,
    data_cfg,
    split,
    feature,
    *,
    dataset=None,
    mesh=None,
    batch_size=256,
    cache_dir=None,
    use_cache=True,
    rules=(),
) -> Features:
    """Features of ``split``, from the cache when these weights' were computed before on the same data (``.cached``
    and ``.computed_at`` say so). ``dataset``: ``data_cfg``'s dataset resolved once (``probe_data_config``), for
    the cache key and the pipeline alike; None resolves it here."""
    dataset = data.resolve(data_cfg, dataset)
    path = os.path.join(cache_dir or default_cache_dir(), cache_key(ckpt, data_cfg, split, feature, dataset) + '.npz')
    if use_cache and (hit := _read_cache(path)) is not None:  # every process reads the same (shared) cache
        log.info(
            'Features of %s/%s (%s): cached, computed %s (%s)', data_cfg.name, split, feature, hit.computed_at, path
        )
        return hit
    mesh = mesh or sharding.make_mesh()
    devices = mesh.shape['data'] * mesh.shape['fsdp']
    batch = max(devices, -(-batch_size // devices) * devices)  # round up to a multiple of the batch devices
    pipe = data.make_pipeline(
        data_cfg,
        split=split,
        global_batch=batch,
        seed=0,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        train=False,
        uint8=True,
        dataset=dataset,
    )
    if pipe.info.num_classes is None:
        raise ValueError(
            f'Dataset {data_cfg.name!r} (split {split!r}) has no labels (num_classes is None): a probe '
            'needs labelled examples.'
        )
    x, y = extract(ckpt.model_config, ckpt.params, pipe, feature, mesh, rules)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    feats = Features(x, y, pipe.info.num_classes, computed_at=now)
    if use_cache and jax.process_index() == 0:
        _write_cache(path, feats)
    return feats
