"""A folder of the user's own images, read with PIL (no TF).

Layout: either images directly in `folder` (unlabelled: label -1,
num_classes None) or one subfolder per class (labels = sorted subfolder
names' order). Any file PIL can open counts (JPEG, PNG, BMP, GIF, TIFF, WebP).
The file list is sorted, so example i is the same file on every host.

Robustness:
  * a file PIL cannot identify is skipped at scan time and counted in one log
    message; a file that fails later, while decoding (e.g. a truncated JPEG),
    is replaced by the next readable example (deterministically) and logged;
  * grey, palette, CMYK and RGBA images are converted to the configured
    channel count (alpha dropped);
  * images smaller than the output size are upscaled by the crop/resize, and
    how many there are is logged once.
"""

import logging
import os

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp',
               '.ppm', '.pgm')
# Attempts before giving up on finding a decodable neighbour.
_MAX_FALLBACK = 16


def _list_files(folder):
    """([(path, class_index)], class_names or None)."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith('.')]
    if classes:
        files = []
        for c, name in enumerate(classes):
            for root, dirs, names in os.walk(os.path.join(folder, name)):
                dirs.sort()
                files += [(os.path.join(root, n), c) for n in sorted(names)
                          if n.lower().endswith(_EXTENSIONS)]
        return files, classes
    files = [(e.path, -1) for e in entries
             if e.is_file() and e.name.lower().endswith(_EXTENSIONS)]
    return files, None


class FolderSource:
    """ds[i] -> (uint8 HWC image with `channels` channels, int label)."""

    def __init__(self, folder, channels=3, image_size=None):
        if not folder or not os.path.isdir(folder):
            raise FileNotFoundError(
                f'image_folder: config.data.folder={folder!r} is not a directory')
        files, classes = _list_files(folder)
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
            log.warning('image_folder %s: skipped %d unreadable file(s), e.g. %s',
                        folder, len(bad), bad[:3])
        if not paths:
            raise ValueError(
                f'image_folder: no readable images in {folder!r} (looked for '
                f'{", ".join(_EXTENSIONS)} directly inside it or one level of '
                f'class subfolders; {len(bad)} unreadable file(s))')
        if small:
            log.warning('image_folder %s: %d of %d image(s) are smaller than '
                        '%d px on the short side and will be upscaled',
                        folder, small, len(paths), image_size)
        self.folder = folder
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.class_names = classes
        self.num_classes = len(classes) if classes else None
        self.channels = channels
        self.num_skipped = len(bad)

    def __len__(self):
        return len(self.paths)

    def _decode(self, i):
        with Image.open(self.paths[i]) as im:
            im = im.convert('L' if self.channels == 1 else 'RGB')
            arr = np.asarray(im)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __getitem__(self, i):
        n = len(self.paths)
        for k in range(_MAX_FALLBACK):
            j = (int(i) + k) % n
            try:
                return self._decode(j), int(self.labels[j])
            except (OSError, ValueError, SyntaxError) as e:
                log.warning('image_folder: cannot decode %s (%s); using the next '
                            'image instead', self.paths[j], e)
        raise OSError(f'image_folder: {_MAX_FALLBACK} consecutive images from '
                      f'index {i} failed to decode in {self.folder}')
