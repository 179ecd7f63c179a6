"""A folder of the user's own images, read with PIL (no TF).

Layout: either images directly in `folder` (unlabelled: label -1,
num_classes None) or one subfolder per class (labels = sorted subfolder
names' order; with split folders, the sorted union of their class
subfolders, `FolderDataset`). Any file PIL can open counts (JPEG, PNG, BMP, GIF, TIFF, WebP).
The file list is sorted, so example i is the same file on every host.

A sliced split ('train[:90%]', `splits.indices`) takes its examples from a
fixed shuffle (seed 0) of the sorted list, the order a tfds dataset gets
when it is prepared, so a slice of a class-sorted folder holds every class;
'train[:90%]' and 'train[90%:]' are disjoint and make up the whole folder.

Examples are the files' bytes; the pipeline decodes them (`decode.py`: the
same decoder and colour rules as tfds records, JPEG DCT-domain downscaling).

Robustness:
  * a file PIL cannot identify is skipped at scan time and counted in one log
    message; a file that fails later, while decoding (e.g. a truncated JPEG),
    is replaced by the next readable example (deterministically) and logged;
  * images smaller than the output size are upscaled by the crop/resize, and
    how many there are is logged once.
"""

import hashlib
import logging
import os

import numpy as np
from PIL import Image

from cratemae.data import splits as split_lib

log = logging.getLogger(__name__)

_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def class_names(folder):
    """Sorted class subfolders of `folder` (hidden ones left out)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def list_files(folder):
    """([(path, class_index)], class_names or None)."""
    classes = class_names(folder)
    if classes:
        files = []
        for c, name in enumerate(classes):
            for root, dirs, names in os.walk(os.path.join(folder, name)):
                dirs.sort()
                files += [(os.path.join(root, n), c) for n in sorted(names) if n.lower().endswith(_EXTENSIONS)]
        return files, classes
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    files = [(e.path, -1) for e in entries if e.is_file() and e.name.lower().endswith(_EXTENSIONS)]
    return files, None


SPLIT_FOLDERS = ('train', 'validation', 'val', 'test')
EVAL_SPLITS = ('validation', 'val', 'test')  # what split_eval='auto' looks for, in order


def split_folders(root):
    """Split subfolders of `root` (a train/ + validation/ layout), in SPLIT_FOLDERS order."""
    return [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(root, s))]


def fingerprint(folder, files=None):
    """sha256 of the sorted (path, label, size, modification time) of every image file in `folder` and its class
    subfolders (`files`: that listing, if made already): it changes when an image is added, removed, relabelled
    (moved) or rewritten."""
    h = hashlib.sha256()
    for path, label in list_files(folder)[0] if files is None else files:
        try:
            st = os.stat(path)
            h.update(f'{os.path.relpath(path, folder)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        except OSError:
            h.update(f'{os.path.relpath(path, folder)}\0gone\n'.encode())
    return h.hexdigest()


class FolderDataset:
    """An image folder, resolved once: its split layout, the class list that labels every split, and each split
    folder's file list, listed at most once (the fingerprint and the source share it).

    The class list is the sorted union of the class subfolders of its split folders (or of the folder itself), so
    a validation/ folder that lacks a class labels the other classes as train/ does."""

    def __init__(self, root, channels=3, image_size=None):
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f'image_folder: config.data.folder={root!r} is not a directory')
        self.root, self.channels, self.image_size = root, channels, image_size
        self.split_folders = split_folders(root)
        tops = [os.path.join(root, s) for s in self.split_folders] or [root]
        self.class_names = sorted({c for top in tops for c in class_names(top)}) or None
        self.num_classes = len(self.class_names) if self.class_names else None
        self._files = {}

    def folder_for(self, split):
        """(folder to read, split name) for `split`.

        With split subfolders (train/, validation/, val/, test/) a split is its
        subfolder and never a class; 'auto' (the default split_eval) takes the
        first of validation/, val/, test/; any other missing split is an error
        listing the ones that exist. A folder without split subfolders is the one
        split 'train'; 'auto' then evaluates on those same images, with a warning
        (an accuracy refuses that pair: `splits.held_out`). Any split may carry a
        tfds slice ('train[90%:]').
        """
        root = self.root
        if self.split_folders:
            chosen = split_lib.choose(
                f'image_folder {root!r}', self.split_folders, split, EVAL_SPLITS, kind='split folder'
            )
            if split == 'auto':
                log.info('image_folder %s: evaluation split %r', root, chosen)
            return os.path.join(root, split_lib.base_name(chosen)), chosen
        if split == 'auto':
            log.warning(
                'image_folder %s has no split folders (%s): evaluating on the training '
                'images. Make a validation/ folder next to train/ for held-out data.',
                root,
                '/, '.join(SPLIT_FOLDERS) + '/',
            )
            return root, 'train'
        if split_lib.base_name(split) != 'train':
            raise ValueError(
                f'image_folder {root!r} has no split folders ({"/, ".join(SPLIT_FOLDERS)}/), so '
                f'its one split is \'train\' (the folder itself), not {split!r}. Lay it out as '
                f'{root}/train/<class>/ + {root}/validation/<class>/, or set {split_lib.SPLIT_FLAGS}=train'
            )
        split_lib.choose(f'image_folder {root!r}', ['train'], split, ())  # a malformed slice fails here
        return root, split

    def split(self, split):
        """The split `split` names ('auto' -> the evaluation split); reads no image."""
        return self.folder_for(split)[1]

    def files(self, folder):
        """[(path, label)] of the split folder `folder`, labelled by the dataset's class list; listed once."""
        if folder not in self._files:
            files, classes = list_files(folder)
            if classes:
                index = [self.class_names.index(c) for c in classes]
                files = [(path, index[c]) for path, c in files]
            self._files[folder] = files
        return self._files[folder]

    def open(self, split):
        """(FolderSource, resolved split) for `split`."""
        folder, split = self.folder_for(split)
        files, classes = self.files(folder), self.class_names
        return FolderSource(folder, self.channels, self.image_size, split, files=files, classes=classes), split

    def identity(self, split):
        """What the examples of `split` are (the feature cache's key): the split folder and its files' fingerprint."""
        folder, split = self.folder_for(split)
        return {
            'kind': 'folder',
            'folder': os.path.abspath(folder),
            'files': fingerprint(folder, self.files(folder)),
            'split': split,
        }


class FolderSource:
    """ds[i] -> (encoded file bytes, int label); `split` may slice the folder (module docstring). `files` and
    `classes`: the folder's listing and the class names its labels index, if listed already (`FolderDataset`)."""

    def __init__(self, folder, channels=3, image_size=None, split='train', files=None, classes=None):
        if not folder or not os.path.isdir(folder):
            raise FileNotFoundError(f'image_folder: config.data.folder={folder!r} is not a directory')
        if files is None:
            files, classes = list_files(folder)
        paths, labels, bad, small = [], [], [], 0
        for path, label in files:
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
            except (OSError, ValueError, Image.DecompressionBombError):
                bad.append(path)
                continue
            paths.append(path)
            labels.append(label)
            small += bool(image_size and min(w, h) < image_size)
        if bad:
            log.warning('image_folder %s: skipped %d unreadable file(s), e.g. %s', folder, len(bad), bad[:3])
        if not paths:
            raise ValueError(
                f'image_folder: no readable images in {folder!r} (looked for '
                f'{", ".join(_EXTENSIONS)} directly inside it or one level of '
                f'class subfolders; {len(bad)} unreadable file(s))'
            )
        if small:
            log.warning(
                'image_folder %s: %d of %d image(s) are smaller than %d px on the short side and will be upscaled',
                folder,
                small,
                len(paths),
                image_size,
            )
        if split_lib.is_sliced(split):
            order = np.random.default_rng(0).permutation(len(paths))
            chosen = split_lib.indices(split, len(paths))
            chosen = np.sort(order[chosen.start : chosen.stop])
            paths, labels = [paths[i] for i in chosen], [labels[i] for i in chosen]
        self.folder = folder
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.class_names = classes
        self.num_classes = len(classes) if classes else None
        self.channels = channels
        self.num_skipped = len(bad)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(encoded file bytes, label): the pipeline decodes (`decode.py`)."""
        try:
            with open(self.paths[int(i)], 'rb') as f:
                payload = f.read()
        except OSError as e:  # gone since the scan: an undecodable record (logged, replaced)
            log.warning('image_folder: cannot read %s (%s)', self.paths[int(i)], e)
            payload = b''
        return payload, int(self.labels[int(i)])
