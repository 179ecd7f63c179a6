"""The explicit registry of datasets: name -> DatasetSpec.

A spec says where the examples come from (`kind`: embedded / tfds / folder),
what the native images look like, and the per-channel mean/std (in [0, 1]
units) used for normalisation. Adding a dataset is one entry here.
"""

import dataclasses
import os
from typing import Optional
from typing import Tuple

from cratemae.data import embedded
from cratemae.data import folder as folder_lib
from cratemae.data import splits as split_lib
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
    # mean/std None: computed from the train split when opened (optional dataset).
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


def open_source(cfg, split):
    """(random-access source, resolved split name) for `split` ('auto' = the
    dataset's evaluation split): len(src), src[i] -> (payload, label), the
    payload a uint8 HWC array or encoded image bytes."""
    spec = get_spec(cfg.name)
    if spec.kind == 'embedded':
        split = resolve_split(cfg, split)
        return embedded.open_split(spec.name, split), split
    if spec.kind == 'tfds':
        return tfds_source.open_split(spec.name, split, cfg.get('data_dir'), cfg.get('image_key'), cfg.get('label_key'))
    folder, split = folder_lib.folder_for_split(cfg.folder, split)
    return folder_lib.FolderSource(folder, channels=cfg.channels, image_size=cfg.image_size, split=split), split


def resolve_split(cfg, split):
    """The split `split` names for cfg's dataset ('auto' -> its evaluation
    split), checked against the splits it has; cheap (no image is opened)."""
    spec = get_spec(cfg.name)
    if spec.kind == 'embedded':
        return split_lib.choose(spec.name, spec.splits, split, ('test',))
    if spec.kind == 'tfds':
        b = tfds_source.builder(spec.name, cfg.get('data_dir'))
        return tfds_source.resolve_split(spec.name, b.info, split)
    return folder_lib.folder_for_split(cfg.folder, split)[1]


def identity(cfg, split):
    """What the examples of `split` are, as a JSON-able dict (the feature cache's key): an embedded dataset's name and
    array version; a tfds dataset's name, resolved version, directory and image/label keys; an image folder's path
    and the fingerprint of its files (names, labels, sizes, modification times). Reads no image."""
    spec = get_spec(cfg.name)
    split = resolve_split(cfg, split)
    if spec.kind == 'embedded':
        return {'kind': 'embedded', 'name': spec.name, 'version': embedded.CACHE_VERSION, 'split': split}
    if spec.kind == 'tfds':
        b = tfds_source.builder(spec.name, cfg.get('data_dir'))
        image_key, label_key = tfds_source.resolve_keys(spec.name, b.info, cfg.get('image_key'), cfg.get('label_key'))
        return {
            'kind': 'tfds',
            'name': tfds_source.tfds_name(spec.name).split(':')[0],
            'version': str(b.info.version),
            'data_dir': str(b.data_dir),
            'image_key': image_key,
            'label_key': label_key,
            'split': split,
        }
    folder, split = folder_lib.folder_for_split(cfg.folder, split)
    return {
        'kind': 'folder',
        'folder': os.path.abspath(folder),
        'files': folder_lib.fingerprint(folder),
        'split': split,
    }


def mean_std(spec):
    """Per-native-channel (mean, std); computed from the train split if unset."""
    if spec.mean is not None:
        return spec.mean, spec.std
    x = embedded.load_arrays(spec.name)['train_image'].astype('float64') / 255
    return tuple(x.mean((0, 1, 2))), tuple(x.std((0, 1, 2)))


def num_classes(spec, source):
    """Classes of the opened source (None = unlabelled)."""
    if spec.kind == 'embedded':
        return int(source.labels.max()) + 1
    return source.num_classes
