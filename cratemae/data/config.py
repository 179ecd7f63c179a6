"""`config.data`: defaults and validation (run at config time, before any I/O)."""

import numbers
import os

import ml_collections
from ml_collections import config_dict

from cratemae.data import decode
from cratemae.data import randaugment
from cratemae.data import registry
from cratemae.data import splits as split_lib
from cratemae.data import tfds_source

AUGMENTS = ('mae', 'none')
NORMALIZE = ('dataset', 'none')


def default_data_config():
    """The embedded default: MNIST at 32 px, 1 channel, MAE augmentation.

    Keys: name (registered, or tfds:NAME[:VERSION]), split_train,
    split_eval ('auto': validation/ val/ test, whichever the data has),
    data_dir (None -> tfds default), image_key / label_key (tfds; None ->
    supervised keys or the first Image / ClassLabel feature),
    folder (image_folder only), image_size, channels, augment ('mae'|'none'),
    crop_scale, hflip, randaugment (None or (num_ops, magnitude) of
    torchvision's RandAugment, applied to training images after the crop
    and flip; also with augment='none'), normalize ('dataset'|'none'), num_workers
    ('auto': the cores of this process's CPU affinity less one for the trainer, 0 for the
    in-memory embedded datasets; 0 = in process; see workers.py), prefetch (batches made ahead by a background thread),
    eval_crop_pct (None -> the dataset's default: 1.0 small, 0.875 photos),
    resize ('pil' | 'torch': which implementation of the bicubic resize crops
    encoded images, decode.py; 'torch' needs PyTorch, `pip install cratemae[torch-resize]`).
    """
    return ml_collections.ConfigDict(
        dict(
            name='mnist',
            split_train='train',
            split_eval='auto',
            data_dir=config_dict.placeholder(str),
            image_key=config_dict.placeholder(str),
            label_key=config_dict.placeholder(str),
            folder=config_dict.placeholder(str),
            image_size=32,
            channels=1,
            augment='mae',
            crop_scale=(0.2, 1.0),
            hflip=True,
            randaugment=config_dict.placeholder(tuple),
            normalize='dataset',
            num_workers=config_dict.FieldReference('auto', field_type=object),  # 'auto' or an int
            prefetch=2,
            eval_crop_pct=config_dict.placeholder(float),
            resize='pil',
        )
    )


def data_config_from(values):
    """A data config with this module's field types from a plain mapping, e.g. one read back from a
    checkpoint's JSON, where `num_workers` would otherwise be locked to the type of its stored value."""
    cfg = default_data_config()
    cfg.update(dict(values))
    return cfg


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def validate_data_config(cfg):
    """Raises ValueError naming the key and the accepted values."""
    errors = []
    name = cfg.get('name')
    if isinstance(name, str) and name.startswith(tfds_source.PREFIX):
        if (problem := tfds_source.check_name(name)) is not None:
            errors.append(problem)
    elif name not in registry.DATASETS:
        errors.append(
            f'data.name={name!r} is not a dataset; valid '
            f'names: {", ".join(registry.dataset_names())}, or '
            'tfds:NAME[:VERSION] for any prepared tfds image dataset'
        )
    for key in ('split_train', 'split_eval'):
        if not isinstance(cfg.get(key), str) or not cfg.get(key):
            errors.append(f'data.{key}={cfg.get(key)!r} must be a split name')
    if not _is_int(cfg.get('image_size')) or cfg.image_size < 1:
        errors.append(f'data.image_size={cfg.get("image_size")!r} must be a positive int')
    if cfg.get('channels') not in (1, 3):
        errors.append(f'data.channels={cfg.get("channels")!r} must be 1 or 3')
    if cfg.get('augment') not in AUGMENTS:
        errors.append(f'data.augment={cfg.get("augment")!r} must be one of {AUGMENTS}')
    if cfg.get('normalize', 'dataset') not in NORMALIZE:
        errors.append(f'data.normalize={cfg.get("normalize")!r} must be one of {NORMALIZE}')
    scale = cfg.get('crop_scale')
    try:
        lo, hi = (float(v) for v in scale)
        ok = 0 < lo <= hi <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        errors.append(f'data.crop_scale={scale!r} must be (lo, hi) with 0 < lo <= hi <= 1')
    if (problem := randaugment.check_spec(cfg.get('randaugment'))) is not None:
        errors.append(problem)
    if not isinstance(cfg.get('hflip'), bool):
        errors.append(f'data.hflip={cfg.get("hflip")!r} must be True or False')
    if not (cfg.get('num_workers') == 'auto' or _is_int(cfg.get('num_workers')) and cfg.get('num_workers') >= 0):
        errors.append(f'data.num_workers={cfg.get("num_workers")!r} must be \'auto\' or an int >= 0')
    if not _is_int(cfg.get('prefetch')) or cfg.get('prefetch') < 0:
        errors.append(f'data.prefetch={cfg.get("prefetch")!r} must be an int >= 0')
    resize = cfg.get('resize', 'pil')
    if resize not in decode.RESIZERS:
        errors.append(f'data.resize={resize!r} must be one of {decode.RESIZERS}')
    elif resize == 'torch' and not decode.torch_available():
        errors.append(
            "data.resize='torch' needs PyTorch (its CPU build is enough): pip install 'cratemae[torch-resize]', "
            "or keep --config.data.resize=pil"
        )
    pct = cfg.get('eval_crop_pct')
    if pct is not None and not (isinstance(pct, numbers.Real) and 0 < pct <= 1):
        errors.append(f'data.eval_crop_pct={pct!r} must be None or in (0, 1]')
    if cfg.get('name') == 'image_folder':
        folder = cfg.get('folder')
        if not folder or not os.path.isdir(folder):
            errors.append(f'data.folder={folder!r} must be an existing directory for data.name=\'image_folder\'')
    spec = registry.DATASETS.get(cfg.get('name'))
    if spec is not None and spec.splits:
        for key in ('split_train', 'split_eval'):
            split = cfg.get(key)
            if split_lib.base_name(split) not in spec.splits and not (key == 'split_eval' and split == 'auto'):
                errors.append(
                    f'data.{key}={cfg.get(key)!r}: {spec.name} has splits {spec.splits} (--config.data.{key})'
                )
    if errors:
        raise ValueError('invalid config.data:\n  ' + '\n  '.join(errors))
