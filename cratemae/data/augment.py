"""Image transforms for MAE pre-training and evaluation (numpy + PIL, no TF).

Every transform takes and returns a uint8 HWC numpy array until the final
`normalize`, which returns float32. Randomness comes only from the
`np.random.Generator` passed in, so a transform is reproducible given the rng
(the pipeline seeds one rng per (seed, global example position)).

Train (augment='mae', as in the MAE paper / FAIR `main_pretrain.py`):
    x -> RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)
      -> horizontal flip with probability 1/2
      -> (x / 255 - mean) / std
Eval (and augment='none'):
    x -> centre square of side crop_pct * min(H, W), bicubic-resized to size
      -> (x / 255 - mean) / std
    which equals "resize shorter side to size / crop_pct, centre-crop size"
    (timm/DeiT's 224/256 recipe for crop_pct=0.875) done in one resampling;
    an image already size x size with crop_pct=1 passes through unchanged.
"""

import math

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the ones PIL uses for RGB -> 'L'.
LUMA = np.array([0.299, 0.587, 0.114], np.float64)


def to_channels(image, channels):
    """Converts a uint8 (H, W) / (H, W, C) image to (H, W, channels).

    C=1 -> 3 repeats the grey plane; 3 -> 1 is the luma Y = 0.299 R + 0.587 G
    + 0.114 B (rounded); an alpha channel (C=2 or 4) is dropped.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    c = image.shape[-1]
    if c in (2, 4):  # LA / RGBA: drop alpha, like PIL convert('L'/'RGB')
        image = image[..., : c - 1]
        c -= 1
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if c == 3 and channels == 1:
        y = image.astype(np.float64) @ LUMA
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f'cannot convert an image with {c} channels to {channels}')


def random_resized_crop_box(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """Samples a crop box (top, left, h, w) as torchvision RandomResizedCrop.

    area a ~ U(scale) * H * W, log aspect r ~ U(log ratio); w = round(sqrt(a r)),
    h = round(sqrt(a / r)); accepted if it fits, then top ~ U{0..H-h},
    left ~ U{0..W-w}. After `attempts` misses: the centre crop with the aspect
    ratio clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(height, width, crop_pct):
    """Centre square (top, left, s, s) with s = crop_pct * min(H, W) (floats)."""
    s = crop_pct * min(height, width)
    return (height - s) / 2, (width - s) / 2, s, s


def resized_crop(image, box, size, resample=Image.BICUBIC):
    """Crops box=(top, left, h, w) of a uint8 HWC image and resizes to size^2.

    One PIL resampling (antialiased when shrinking); a box that already is
    size x size at integer offsets is returned as a plain slice.
    """
    top, left, h, w = box
    if h == size and w == size and float(top).is_integer() and float(left).is_integer():
        t, l = int(top), int(left)
        return np.ascontiguousarray(image[t : t + size, l : l + size])
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = pil.resize((size, size), resample=resample, box=(left, top, left + w, top + h))
    out = np.asarray(out)
    return out[..., None] if channels == 1 else out


def hflip(image):
    """Mirror left-right: out[:, j] = image[:, W - 1 - j].

    Each pixel's C values are moved as one item (a void view): NumPy copies a reversed (H, W, C) array C values at
    a time otherwise, which took twice as long for a 224 x 224 x 3 crop (docs/data.md).
    """
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.size == 0:
        return np.ascontiguousarray(image[:, ::-1])
    h, w, c = image.shape
    pixels = image.view(np.dtype((np.void, c * image.itemsize))).reshape(h, w)
    return np.ascontiguousarray(pixels[:, ::-1]).view(image.dtype).reshape(h, w, c)


def normalize_constants(mean, std):
    """float32 (scale, bias) = (1 / (255 std), -mean / std), computed in float64."""
    std = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    bias = (-np.asarray(mean, np.float64) / std).astype(np.float32)
    return scale, bias


def normalize(image, mean, std):
    """float32 (x / 255 - mean) / std per channel (mean, std in [0, 1] units).

    Works on one image or a whole uint8 batch (channels last); computed as
    x * (1 / (255 std)) - mean / std, two passes over the float output.
    The devices compute the same from uint8 batches (`device.normalize`).
    The constants are tiled along each row (W * C values) rather than broadcast
    along the channel axis: the same products and sums, but NumPy then runs one
    long loop per row instead of one of C values per pixel (~3x faster).
    """
    scale, bias = normalize_constants(mean, std)
    image = np.asarray(image)
    if image.ndim < 2:
        out = np.multiply(image, scale, dtype=np.float32)
        out += bias
        return out
    width, channels = image.shape[-2:]
    rows = image.reshape(image.shape[:-2] + (width * channels,))
    out = np.multiply(rows, np.tile(np.broadcast_to(scale, (channels,)), width), dtype=np.float32)
    out += np.tile(np.broadcast_to(bias, (channels,)), width)
    return out.reshape(image.shape)


def mae_train(image, rng, size, scale=(0.2, 1.0), flip=True):
    """MAE train transform on uint8 HWC: RandomResizedCrop + optional flip."""
    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale)
    out = resized_crop(image, box, size)
    if flip and rng.random() < 0.5:
        out = hflip(out)
    return out


def eval_transform(image, size, crop_pct=1.0):
    """Deterministic eval transform on uint8 HWC: centre crop + resize."""
    box = center_box(image.shape[0], image.shape[1], crop_pct)
    return resized_crop(image, box, size)
