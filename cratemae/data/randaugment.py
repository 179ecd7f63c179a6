"""RandAugment (Cubuk et al., 2020) as torchvision's ``transforms.RandAugment`` applies it to PIL images.

The reference's fine-tuning script uses ``RandAugment(num_ops=2, magnitude=14)`` (31 magnitude bins, nearest
interpolation, black fill). For each of ``num_ops`` rounds one of the 14 operations below is drawn uniformly; an
operation marked signed has its magnitude negated with probability 1/2. At magnitude index m of 31 bins:

  op            parameter at index m (linspace over the bins)       image transform
  Identity      -                                                  x
  ShearX/Y      s = 0.3 m / 30                                     x(u + s v, v) / x(u, v + s u), about the corner
  TranslateX/Y  t = int(150 / 331 * W (or H) * m / 30)             x(u - t, v) / x(u, v - t), zero fill
  Rotate        a = 30 m / 30 degrees                              counter-clockwise about the centre, zero fill
  Brightness    f = 1 + 0.9 m / 30                                 f x
  Color         f = 1 + 0.9 m / 30                                 grey + f (x - grey)   (identity on grey images)
  Contrast      f = 1 + 0.9 m / 30                                 mu + f (x - mu), mu the mean grey level
  Sharpness     f = 1 + 0.9 m / 30                                 blur + f (x - blur), PIL's 3x3 smoothing kernel
  Posterize     b = 8 - round(m / 7.5) bits                        x & ~(2^(8-b) - 1)
  Solarize      th = 255 (1 - m / 30)                              255 - x where x >= th
  AutoContrast  -                                                  per-channel min..max stretched to 0..255
  Equalize      -                                                  per-channel histogram equalisation

Every result is rounded and clipped to uint8 (PIL). Randomness comes only from the ``np.random.Generator`` passed in.
"""

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

NUM_BINS = 31
OPS = (
    'Identity',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Rotate',
    'Brightness',
    'Color',
    'Contrast',
    'Sharpness',
    'Posterize',
    'Solarize',
    'AutoContrast',
    'Equalize',
)
SIGNED = frozenset(
    {'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color', 'Contrast', 'Sharpness'}
)


def magnitude(op: str, index: int, height: int, width: int, num_bins: int = NUM_BINS) -> float:
    """The unsigned parameter of ``op`` at magnitude ``index`` of ``num_bins`` (the table in the module docstring)."""
    frac = index / (num_bins - 1)
    if op in ('ShearX', 'ShearY'):
        return 0.3 * frac
    if op == 'TranslateX':
        return 150.0 / 331.0 * width * frac
    if op == 'TranslateY':
        return 150.0 / 331.0 * height * frac
    if op == 'Rotate':
        return 30.0 * frac
    if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
        return 0.9 * frac
    if op == 'Posterize':
        return float(8 - round(index / ((num_bins - 1) / 4)))
    if op == 'Solarize':
        return 255.0 * (1.0 - frac)
    return 0.0


def _affine(pil, coefficients):
    # PIL's affine maps each output pixel (u, v) to the input pixel (a u + b v + c, d u + e v + f).
    return pil.transform(pil.size, Image.AFFINE, coefficients, resample=Image.NEAREST, fillcolor=0)


def apply_op(image: np.ndarray, op: str, value: float) -> np.ndarray:
    """One operation with its (signed) parameter ``value`` on a uint8 HWC image (C = 1 or 3)."""
    if op not in OPS:
        raise ValueError(f'Unknown RandAugment op {op!r}; valid: {OPS}.')
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    if op == 'ShearX':
        pil = _affine(pil, (1.0, value, 0.0, 0.0, 1.0, 0.0))
    elif op == 'ShearY':
        pil = _affine(pil, (1.0, 0.0, 0.0, value, 1.0, 0.0))
    elif op == 'TranslateX':
        pil = _affine(pil, (1.0, 0.0, -float(int(value)), 0.0, 1.0, 0.0))
    elif op == 'TranslateY':
        pil = _affine(pil, (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(value))))
    elif op == 'Rotate':
        pil = pil.rotate(value, resample=Image.NEAREST, fillcolor=0)
    elif op == 'Brightness':
        pil = ImageEnhance.Brightness(pil).enhance(1.0 + value)
    elif op == 'Color':
        pil = ImageEnhance.Color(pil).enhance(1.0 + value)
    elif op == 'Contrast':
        pil = ImageEnhance.Contrast(pil).enhance(1.0 + value)
    elif op == 'Sharpness':
        pil = ImageEnhance.Sharpness(pil).enhance(1.0 + value)
    elif op == 'Posterize':
        pil = ImageOps.posterize(pil, int(value))
    elif op == 'Solarize':
        pil = ImageOps.solarize(pil, value)
    elif op == 'AutoContrast':
        pil = ImageOps.autocontrast(pil)
    elif op == 'Equalize':
        pil = ImageOps.equalize(pil)
    out = np.asarray(pil)
    return out[..., None] if channels == 1 else out


def rand_augment(
    image: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude_index: int = 14, num_bins: int = NUM_BINS
) -> np.ndarray:
    """``num_ops`` operations drawn uniformly from OPS, each signed ones negated with probability 1/2."""
    height, width = image.shape[:2]
    for _ in range(num_ops):
        op = OPS[int(rng.integers(len(OPS)))]
        value = magnitude(op, magnitude_index, height, width, num_bins)
        if op in SIGNED and rng.integers(2):
            value = -value
        image = apply_op(image, op, value)
    return image


def check_spec(spec) -> str | None:
    """None when ``spec`` is None or (num_ops >= 0, 0 <= magnitude < NUM_BINS) ints; else what is wrong."""
    if spec is None:
        return None
    try:
        num_ops, index = spec
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (num_ops, index))
        ok = ok and num_ops >= 0 and 0 <= index < NUM_BINS
    except (TypeError, ValueError):
        ok = False
    if ok:
        return None
    return (
        f'data.randaugment={spec!r} must be None or (num_ops, magnitude) with num_ops >= 0 and 0 <= magnitude <= '
        f'{NUM_BINS - 1} (torchvision RandAugment; the reference fine-tunes with (2, 14)).'
    )
