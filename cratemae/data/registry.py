"""The explicit registry of datasets: name -> DatasetSpec.

A spec says where the examples come from (`kind`: embedded / tfds / folder),
what the native images look like, and the per-channel mean/std (in [0, 1]
units) used for normalisation. Adding a dataset is one entry here.

`resolve(cfg)` turns a data config into a `ResolvedDataset`, once: the spec,
the opened dataset (tfds builder and keys, folder layout and classes, embedded
arrays), class count, channels and statistics. Pipelines, the feature cache
and the commands take that object rather than re-deriving it from the config.
"""

import dataclasses
from typing import Optional
from typing import Tuple

import numpy as np

from cratemae.data import augment
from cratemae.data import embedded
from cratemae.data import folder as folder_lib
from cratemae.data import tfds_source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Computed over each training split in [0, 1] units (see docs/data.md).
MNIST_MEAN, MNIST_STD = (0.1315,), (0.3088,)  # 4,500-image train split
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """name; kind in {'embedded','tfds','folder'}; native channels (None = any);
    native size (None = variable); mean/std per native channel; default eval
    crop_pct (1.0 for small fixed-size images, 0.875 = 224/256 for photos)."""

    name: str
    kind: str
    channels: Optional[int]
    native_size: Optional[int]
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]
    eval_crop_pct: float
    splits: Tuple[str, ...] = ()  # for embedded datasets; tfds checks its own


def _tfds(name, mean=IMAGENET_MEAN, std=IMAGENET_STD, size=None, crop=0.875):
    return DatasetSpec(name, 'tfds', 3, size, mean, std, crop)


DATASETS = {
    'mnist': DatasetSpec('mnist', 'embedded', 1, 28, MNIST_MEAN, MNIST_STD, 1.0, ('train', 'test')),
    'skimage_crops': DatasetSpec(
        'skimage_crops', 'embedded', 3, 64, IMAGENET_MEAN, IMAGENET_STD, 1.0, ('train', 'test')
    ),
    'imagenet2012': _tfds('imagenet2012'),
    'cifar10': _tfds('cifar10', CIFAR10_MEAN, CIFAR10_STD, 32, 1.0),
    'cifar100': _tfds('cifar100', CIFAR100_MEAN, CIFAR100_STD, 32, 1.0),
    'oxford_flowers102': _tfds('oxford_flowers102'),
    'oxford_iiit_pet': _tfds('oxford_iiit_pet'),
    'image_folder': DatasetSpec('image_folder', 'folder', None, None, IMAGENET_MEAN, IMAGENET_STD, 0.875),
}
if embedded.sklearn_available():
    # mean/std None: computed from the train split when resolved, once per process (optional dataset).
    DATASETS['digits'] = DatasetSpec('digits', 'embedded', 1, 8, None, None, 1.0, ('train', 'test'))


def dataset_names():
    """Sorted registered names (for error messages and `launch.list`); any
    prepared tfds image dataset is also accepted as tfds:NAME[:VERSION]."""
    return sorted(DATASETS)


def get_spec(name):
    if isinstance(name, str) and name.startswith(tfds_source.PREFIX):
        if (problem := tfds_source.check_name(name)) is not None:
            raise ValueError(problem)
        return DatasetSpec(name, 'tfds', None, None, IMAGENET_MEAN, IMAGENET_STD, 0.875)
    if name not in DATASETS:
        raise ValueError(
            f'unknown dataset {name!r}; valid names: '
            f'{", ".join(dataset_names())}, or tfds:NAME[:VERSION] for any '
            'prepared tfds image dataset'
        )
    return DATASETS[name]


def _output_statistics(mean, std, channels, normalize):
    """Mean/std per output channel ((0, 1) each for normalize='none'). 1 -> 3 repeats; 3 -> 1 uses the luma weights
    w: mean = w . mean, std ~ w . std (exact for fully correlated channels, which natural images nearly are)."""
    if normalize == 'none':
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:
        return mean * channels, std * channels
    w = augment.LUMA
    return (float(w @ np.array(mean)),), (float(w @ np.array(std)),)


def _native_statistics(spec):
    """Per-native-channel (mean, std): the spec's, else computed once from its train split."""
    return (spec.mean, spec.std) if spec.mean is not None else embedded.train_statistics(spec.name)


def normalization(cfg):
    """(mean, std) per output channel that batches of `cfg` are normalised with (on the host, or on the devices by
    `device.normalize`), without opening the data (for compiling ahead of time); the same as `resolve(cfg).mean/std`."""
    spec = get_spec(cfg.name)
    return _output_statistics(*_native_statistics(spec), cfg.channels, cfg.get('normalize', 'dataset'))


# The data-config keys a resolved dataset depends on (its splits are chosen per call: `ResolvedDataset.split`).
_RESOLVED_FROM = (
    'name',
    'data_dir',
    'image_key',
    'label_key',
    'folder',
    'image_size',
    'channels',
    'normalize',
    'eval_crop_pct',
)


def _resolved_from(cfg):
    return tuple((k, cfg.get(k)) for k in _RESOLVED_FROM)


@dataclasses.dataclass(frozen=True)
class ResolvedDataset:
    """A data config's dataset, resolved once (`resolve`) and handed on to every pipeline, cache key and command that
    reads it: nothing below reopens the data or re-derives it from the config.

    spec: the registry's DatasetSpec. handle: the kind's opened dataset (embedded.EmbeddedDataset: its arrays;
    tfds_source.PreparedDataset: builder opened once, resolved version, data_dir, image/label keys; folder.FolderDataset:
    its root, split layout and class list). num_classes: None for unlabelled data. native_channels (None = any)
    and channels (the output); native_mean/native_std per native channel; mean/std per output channel, as batches
    are normalised (`normalization`); eval_crop_pct after the config's override; image_size the output size."""

    spec: DatasetSpec
    handle: object
    num_classes: Optional[int]
    native_channels: Optional[int]
    channels: int
    image_size: int
    native_mean: Tuple[float, ...]
    native_std: Tuple[float, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    eval_crop_pct: float
    resolved_from: tuple

    @property
    def name(self):
        return self.spec.name

    @property
    def kind(self):
        return self.spec.kind

    def split(self, split):
        """The split `split` names ('auto' -> the evaluation split, tfds slices kept), checked against the splits the
        dataset has; reads no image."""
        return self.handle.split(split)

    def open(self, split):
        """(random-access source, resolved split name) for `split`: len(src), src[i] -> (payload, label), the payload
        a uint8 HWC array or encoded image bytes."""
        return self.handle.open(split)

    def identity(self, split):
        """What the examples of `split` are, as a JSON-able dict (the feature cache's key): an embedded dataset's name
        and array version; a tfds dataset's name, resolved version, directory and image/label keys; an image folder's
        split folder and the fingerprint of its files (names, labels, sizes, modification times). Reads no image."""
        return self.handle.identity(split)

    def check(self, cfg):
        """Raises ValueError unless this dataset was resolved from `cfg` (its splits aside)."""
        differ = [k for (k, v), (_, w) in zip(self.resolved_from, _resolved_from(cfg)) if v != w]
        if differ:
            raise ValueError(
                f'the dataset handed on was resolved from another data config (differs in {", ".join(differ)}): '
                'resolve this one with data.resolve(cfg)'
            )


def resolve(cfg, resolved=None):
    """The dataset of data config `cfg`, resolved once: opens the tfds builder and resolves its keys, reads an image
    folder's layout and class list, loads embedded arrays, and computes statistics a spec lacks. `resolved`: the
    dataset already resolved from `cfg`, handed on: checked against `cfg` and returned as it is."""
    if resolved is not None:
        resolved.check(cfg)
        return resolved
    spec = get_spec(cfg.name)
    if spec.kind == 'embedded':
        handle = embedded.EmbeddedDataset(spec.name, spec.splits)
    elif spec.kind == 'tfds':
        handle = tfds_source.PreparedDataset(spec.name, cfg.get('data_dir'), cfg.get('image_key'), cfg.get('label_key'))
    else:
        handle = folder_lib.FolderDataset(cfg.folder, cfg.channels, cfg.image_size)
    native_mean, native_std = _native_statistics(spec)
    mean, std = _output_statistics(native_mean, native_std, cfg.channels, cfg.get('normalize', 'dataset'))
    crop_pct = cfg.get('eval_crop_pct')
    return ResolvedDataset(
        spec=spec,
        handle=handle,
        num_classes=handle.num_classes,
        native_channels=spec.channels,
        channels=cfg.channels,
        image_size=cfg.image_size,
        native_mean=tuple(float(m) for m in native_mean),
        native_std=tuple(float(s) for s in native_std),
        mean=mean,
        std=std,
        eval_crop_pct=spec.eval_crop_pct if crop_pct is None else float(crop_pct),
        resolved_from=_resolved_from(cfg),
    )
