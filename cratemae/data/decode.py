"""Encoded image bytes -> uint8 pixels: the one decoder behind every source.

Folder files and tfds records (read as bytes) both come through here, so a
CMYK JPEG, a palette PNG or a 16-bit PNG gives the same pixels whichever way
it was stored. Colour rules, applied in this order:
  * EXIF orientation (tag 0x0112) is applied, as a viewer shows the photo;
  * 16-bit grey ('I;16*', 'I') keeps its top 8 bits: v8 = v16 >> 8 (PIL's own
    convert('L') clips at 255 instead, turning most of the range white);
  * palette, CMYK, YCbCr, LAB, HSV and 1-bit become RGB (or L); an alpha
    channel is dropped (palette transparency too), as the array path does;
  * channels=1 takes PIL's luma L = 0.299 R + 0.587 G + 0.114 B; channels=3
    repeats a grey plane.

Fast path (`decode_crop`). For a JPEG, libjpeg can run its inverse DCT at
1/2, 1/4 or 1/8 scale (PIL's `Image.draft`), producing a smaller image for
less work. Given the crop box (sampled on the full-size image, so the crop
distribution is unchanged), the largest factor r in {1, 2, 4, 8} with
r <= min(box h, box w) / size is used: the crop, scaled down by r, still has
at least `size` pixels on each side, so the final bicubic resize still only
shrinks. Only the crop is resampled (PIL `resize(box=...)`).
"""

import io

import numpy as np
from PIL import Image
from PIL import ImageOps

_ORIENTATION = 0x0112
_SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


class UndecodableImage(ValueError):
    """Bytes that PIL cannot open or decode (truncated, not an image)."""


def is_encoded(payload):
    """True for encoded bytes (folder files, tfds records read with SkipDecoding)."""
    return isinstance(payload, (bytes, bytearray, memoryview, np.bytes_))


def open_image(payload):
    """A lazily decoded PIL image (header read only)."""
    try:
        return Image.open(io.BytesIO(bytes(payload)))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f'not a readable image ({e})') from e


def _orientation(im):
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError):  # malformed EXIF: show as stored
        return 1


def _to_mode(im, channels):
    """Loads `im` and converts it to 'L' (channels=1) or 'RGB' (3) by the rules above."""
    if im.mode in _SIXTEEN_BIT:
        wide = np.asarray(im).astype(np.uint32)
        im = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
    elif im.mode == 'P':
        im = im.convert('RGBA')  # honours palette transparency; alpha dropped below
    if im.mode not in ('L', 'RGB'):
        im = im.convert('L' if im.mode in ('1', 'LA', 'La', 'F') else 'RGB')
    if channels == 1 and im.mode != 'L':
        im = im.convert('L')
    if channels == 3 and im.mode != 'RGB':
        im = im.convert('RGB')
    return im


def _as_array(im):
    arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _load(im, channels, draft_size=None):
    """(opened image decoded to L/RGB, scale of its pixels relative to the full image)."""
    try:
        scale = 1.0
        orientation = _orientation(im)
        if draft_size is not None and orientation == 1 and im.format == 'JPEG':
            full_width = im.size[0]
            drafted = im.draft(im.mode, draft_size)  # (mode, (0, 0, W / r, H / r))
            if drafted is not None:
                scale = drafted[1][2] / full_width
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        return _to_mode(im, channels), scale
    except UndecodableImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f'cannot decode image ({e})') from e


def decode(payload, channels):
    """Full decode: uint8 (H, W, channels)."""
    im, _ = _load(open_image(payload), channels)
    return _as_array(im)


def displayed_size(im):
    """(height, width) as displayed (after EXIF orientation), from the header."""
    w, h = im.size
    if _orientation(im) in (5, 6, 7, 8):  # transposed / rotated by 90 degrees
        w, h = h, w
    return h, w


def reduction(box, size):
    """Largest r in {1, 2, 4, 8} with min(box h, box w) / r >= size."""
    _, _, h, w = box
    for r in (8, 4, 2):
        if min(h, w) >= r * size:
            return r
    return 1


def decode_crop(payload, box_fn, size, channels, resample=Image.BICUBIC, fast=True):
    """Decodes `payload`, crops box_fn(H, W) = (top, left, h, w) and resizes
    it to uint8 (size, size, channels); H, W are the full displayed size.

    fast=True uses libjpeg's scaled IDCT when the crop allows it (module
    docstring); fast=False always decodes at full size (the reference).
    """
    im = open_image(payload)
    height, width = displayed_size(im)
    top, left, h, w = box_fn(height, width)
    r = reduction((top, left, h, w), size) if fast else 1
    draft = (max(1, width // r), max(1, height // r)) if r > 1 else None
    im, scale = _load(im, channels, draft)
    box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
    if scale == 1.0 and h == size and w == size and float(top).is_integer() and float(left).is_integer():
        out = im.crop((int(left), int(top), int(left) + size, int(top) + size))
    else:
        out = im.resize((size, size), resample=resample, box=box)
    return _as_array(out)
