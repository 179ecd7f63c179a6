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

Fast path (`decode_crop`). The crop box is sampled on the full-size image
(from the header alone), so the crop distribution is RandomResizedCrop's
whatever happens next. With resize='torch', a JPEG stored upright in L or RGB
is decoded by simplejpeg (libjpeg-turbo straight into a NumPy array: the same
pixels as PIL's decoder, ~0.3 ms less per ImageNet-sized file, docs/data.md);
otherwise, and for every other image, PIL decodes. libjpeg-turbo can run its inverse DCT at 1/2, 1/4 or 1/8 scale,
producing a smaller image for less work: the largest factor r in {1, 2, 4, 8}
with r <= min(box h, box w) / size is used, so the crop, scaled down by r,
still has at least `size` pixels on each side and the final bicubic resize
still only shrinks. Only the crop is resampled, by one of two
implementations of the same filter (antialiased bicubic, a = -0.5):
  * resize='pil' (the default): PIL `resize(box=...)`; a horizontal flip is
    PIL's `transpose` of the small result (a third of the time of flipping
    the array);
  * resize='torch': PyTorch's uint8 antialiased bicubic `interpolate` (SIMD,
    3-4x faster than PIL here) for boxes on whole pixels of the decoded image
    (RandomResizedCrop's at full scale: nearly every training crop at 224 px),
    within 0.05 grey levels of PIL on average (tests); `interpolate` has no
    sub-pixel offsets, so other boxes (scaled by r > 1, eval's centre box)
    keep PIL's resize.

Not done, measured (docs/data.md): the other M/8 factors of libjpeg-turbo's
scaled IDCT (3/8, 5/8, 6/8, 7/8) decode slower than full size, having no SIMD
code; decoding only the crop's rows and columns needs libjpeg-turbo calls that
no pip-installable wheel exposes.
"""

import io

import numpy as np
import simplejpeg
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


def _decode_jpeg(payload, im, channels, r):
    """uint8 (H / r, W / r, C) by simplejpeg for an upright L or RGB JPEG, else None (PIL decodes it)."""
    if im.format != 'JPEG' or _orientation(im) != 1:
        return None
    if im.mode == 'L':
        colorspace = 'GRAY'
    elif im.mode == 'RGB' and channels == 3:
        colorspace = 'RGB'
    else:  # CMYK / YCCK, or PIL's luma of an RGB JPEG: PIL's conversions
        return None
    width, height = im.size
    data = payload if isinstance(payload, bytes) else bytes(payload)
    try:
        # The smallest libjpeg-turbo scale M/8 giving at least (W / r, H / r) is exactly 1/r for r in {1, 2, 4, 8}.
        pixels = simplejpeg.decode_jpeg(data, colorspace, min_height=-(-height // r), min_width=-(-width // r))
    except ValueError:  # simplejpeg is strict about damaged files: PIL decides whether they decode
        return None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[-1] == 1 and channels == 3:
        pixels = np.repeat(pixels, 3, axis=-1)  # as PIL's convert('RGB') of a grey image
    return pixels


_TORCH = []


def _torch():
    """torch, imported on first use, with one intra-op thread (each input worker is one core)."""
    if not _TORCH:
        import torch  # pylint: disable=import-outside-toplevel

        torch.set_num_threads(1)
        _TORCH.append(torch)
    return _TORCH[0]


def torch_available():
    try:
        _torch()
    except ImportError:
        return False
    return True


def _resize_torch(pixels, box, size, flip):
    """uint8 HWC pixels, whole-pixel box (left, top, right, bottom) -> uint8 (size, size, C), antialiased bicubic."""
    torch = _torch()
    left, top, right, bottom = (int(v) for v in box)
    # A contiguous crop seen as channels-last NCHW takes torch's SIMD uint8 path (a strided view of the whole image
    # took twice as long); its output is planar, and stacking the planes back is the cheapest way to HWC (0.06 ms for
    # 224 px, against 0.2-0.4 ms for a transposing copy).
    crop = np.ascontiguousarray(pixels[top:bottom, left:right])
    if not crop.flags.writeable:
        crop = crop.copy()  # torch warns on read-only arrays (it never writes here)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode='bicubic', antialias=True)
    if flip:
        x = x.flip(-1)
    return np.stack(list(x[0].numpy()), axis=-1)


RESIZERS = ('pil', 'torch')


def decode_crop(payload, box_fn, size, channels, resample=Image.BICUBIC, fast=True, flip_fn=None, resize='pil'):
    """Decodes `payload`, crops box_fn(H, W) = (top, left, h, w) and resizes
    it to uint8 (size, size, channels); H, W are the full displayed size.
    If flip_fn() (called once, after box_fn) is true, the result is mirrored
    left-right: out[:, j] = crop[:, size - 1 - j].

    fast=True uses libjpeg's scaled IDCT when the crop allows it (module
    docstring); fast=False always decodes at full size (the reference).
    resize: 'pil' or 'torch', two implementations of the bicubic resize
    (module docstring); `resample` applies to 'pil'.
    """
    im = open_image(payload)
    height, width = displayed_size(im)
    top, left, h, w = box_fn(height, width)
    r = reduction((top, left, h, w), size) if fast else 1
    # simplejpeg's array pays off only where the resize takes arrays: handing it to PIL costs what its decode saves
    # (measured slower end to end with resize='pil', docs/data.md), so PIL decodes for PIL's resize.
    pixels = _decode_jpeg(payload, im, channels, r) if resize == 'torch' else None
    if pixels is not None:
        scale = 1.0 / r  # libjpeg's output is ceil(W / r) wide, its last column covering the image's last W mod r
    else:
        draft = (max(1, width // r), max(1, height // r)) if r > 1 else None
        im, scale = _load(im, channels, draft)
    box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
    if resize == 'torch' and all(float(v).is_integer() for v in box):
        pixels = _as_array(im) if pixels is None else pixels
        return _resize_torch(pixels, box, size, flip_fn is not None and flip_fn())
    if pixels is not None:
        im = Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
    if scale == 1.0 and h == size and w == size and float(top).is_integer() and float(left).is_integer():
        out = im.crop((int(left), int(top), int(left) + size, int(top) + size))
    else:
        out = im.resize((size, size), resample=resample, box=box)
    if flip_fn is not None and flip_fn():
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _as_array(out)
