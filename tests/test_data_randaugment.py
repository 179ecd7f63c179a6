"""RandAugment: each operation against a NumPy known answer, the magnitude table, the draw, the pipeline."""

import collections

import numpy as np
import pytest

from cratemae import data
from cratemae.data import randaugment as ra


def _ramp(height=12, width=16, channels=1):
    """A uint8 image with every pixel distinct enough to track: value = 10 v + u + 40 (per channel offset)."""
    v, u = np.mgrid[0:height, 0:width]
    planes = [(10 * v + u + 40 + 7 * c) % 256 for c in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def test_magnitudes_at_the_reference_setting():
    # torchvision RandAugment(num_ops=2, magnitude=14), 31 bins, on a 224 x 224 image.
    assert ra.magnitude('ShearX', 14, 224, 224) == pytest.approx(0.14)
    assert ra.magnitude('TranslateX', 14, 224, 224) == pytest.approx(150 / 331 * 224 * 14 / 30)
    assert ra.magnitude('Rotate', 14, 224, 224) == pytest.approx(14.0)
    assert ra.magnitude('Brightness', 14, 224, 224) == pytest.approx(0.42)
    assert ra.magnitude('Posterize', 14, 224, 224) == 6  # 8 - round(14 / 7.5)
    assert ra.magnitude('Posterize', 0, 224, 224) == 8 and ra.magnitude('Posterize', 30, 224, 224) == 4
    assert ra.magnitude('Solarize', 14, 224, 224) == pytest.approx(136.0)
    assert ra.magnitude('Identity', 14, 224, 224) == 0.0


def test_translate_shifts_with_zero_fill():
    x = _ramp()
    out = ra.apply_op(x, 'TranslateX', 3.7)  # int() truncates, as torchvision
    expected = np.zeros_like(x)
    expected[:, 3:] = x[:, :-3]
    np.testing.assert_array_equal(out, expected)
    out = ra.apply_op(x, 'TranslateY', -2.0)
    expected = np.zeros_like(x)
    expected[:-2] = x[2:]
    np.testing.assert_array_equal(out, expected)


def test_shear_about_the_top_left_corner():
    x = np.zeros((10, 10, 1), np.uint8)
    x[6, 2] = 255  # row v=6, column u=2
    out = ra.apply_op(x, 'ShearX', 0.5)  # out(u, v) = x(u + 0.5 v, v): the dot moves to u = 2 - 3
    assert out[0, 0, 0] == 0 and out.sum() == 0  # 2 - 3 < 0: sheared out of the picture
    out = ra.apply_op(x, 'ShearX', -0.5)  # u = 2 + 3
    assert np.argwhere(out[..., 0] == 255).tolist() == [[6, 5]]
    out = ra.apply_op(x, 'ShearY', -0.5)  # out(u, v) = x(u, v - 0.5 u): the dot moves to v = 6 + 1
    assert np.argwhere(out[..., 0] == 255).tolist() == [[7, 2]]


def test_rotate_keeps_the_centre_and_turns_counter_clockwise():
    x = np.zeros((21, 21, 1), np.uint8)
    x[10, 10] = 200
    x[10, 18] = 255  # right of the centre
    out = ra.apply_op(x, 'Rotate', 90.0)
    assert out[10, 10, 0] == 200
    assert np.argwhere(out[..., 0] == 255).tolist() == [[2, 10]]  # now above the centre


def test_pointwise_ops_against_numpy():
    x = _ramp(channels=3)
    xf = x.astype(np.float64)
    np.testing.assert_array_equal(ra.apply_op(x, 'Solarize', 136.0), np.where(x >= 136, 255 - x, x))
    np.testing.assert_array_equal(ra.apply_op(x, 'Posterize', 6.0), x & 0b11111100)
    np.testing.assert_allclose(ra.apply_op(x, 'Brightness', -0.42), xf * 0.58, atol=1)
    grey = np.rint(xf @ np.array([0.299, 0.587, 0.114]))
    mean = int(grey.mean() + 0.5)
    np.testing.assert_allclose(ra.apply_op(x, 'Contrast', 0.42), np.clip(mean + 1.42 * (xf - mean), 0, 255), atol=1)
    np.testing.assert_allclose(ra.apply_op(x, 'Color', -1.0), np.repeat(grey[..., None], 3, -1), atol=1)
    np.testing.assert_array_equal(ra.apply_op(x, 'Identity', 0.0), x)


def test_color_is_the_identity_on_grey_images():
    x = _ramp()
    np.testing.assert_array_equal(ra.apply_op(x, 'Color', 0.42), x)


def test_autocontrast_and_equalize_stretch_the_range():
    x = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) + 100  # 100..163
    stretched = ra.apply_op(x, 'AutoContrast', 0.0)
    assert stretched.min() == 0 and stretched.max() >= 254  # PIL truncates 255 - 1e-13
    np.testing.assert_allclose(stretched[..., 0].ravel(), (np.arange(64) * 255 / 63), atol=1)
    tall = np.repeat(x, 16, axis=0)  # PIL leaves images of fewer than 256 pixels alone
    equalized = ra.apply_op(tall, 'Equalize', 0.0)
    assert equalized.min() < 10 and equalized.max() > 240
    order = np.argsort(tall.ravel(), kind='stable')
    assert np.all(np.diff(equalized.ravel()[order].astype(int)) >= 0)  # monotone in the input


def test_draw_is_uniform_over_ops_signed_and_reproducible():
    x = _ramp(channels=3)
    np.testing.assert_array_equal(
        ra.rand_augment(x, np.random.default_rng(5)), ra.rand_augment(x, np.random.default_rng(5))
    )
    assert ra.rand_augment(x, np.random.default_rng(0), num_ops=0) is x

    # Record which op (and sign) each round draws: the generator is consumed exactly as rand_augment does.
    seen, signs = collections.Counter(), collections.Counter()
    rng = np.random.default_rng(0)
    applied = []
    original = ra.apply_op
    try:
        ra.apply_op = lambda image, op, value: applied.append((op, value)) or image
        for _ in range(1400):
            ra.rand_augment(x, rng, num_ops=1, magnitude_index=14)
    finally:
        ra.apply_op = original
    for op, value in applied:
        seen[op] += 1
        if op in ra.SIGNED:
            signs[value > 0] += 1
    assert set(seen) == set(ra.OPS)
    assert all(60 <= n <= 140 for n in seen.values()), seen  # 100 expected each
    assert 0.45 < signs[True] / sum(signs.values()) < 0.55


def test_bad_specs_are_refused_at_config_time():
    cfg = data.default_data_config()
    for bad in ((2, 31), (-1, 9), (2,), 'rand-m9', (2.0, 9), (True, 9)):
        cfg.randaugment = None
        cfg.randaugment = bad if isinstance(bad, tuple) else (bad,)
        with pytest.raises(ValueError, match='data.randaugment'):
            data.validate_data_config(cfg)
    cfg.randaugment = (2, 14)
    data.validate_data_config(cfg)


def test_pipeline_applies_it_to_training_images_only():
    def first_batch(randaug, train):
        cfg = data.default_data_config()
        cfg.update(image_size=28, augment='none', hflip=False, randaugment=randaug)
        pipe = data.make_pipeline(cfg, split='train', global_batch=16, seed=3, train=train)
        with pipe.iterate() as batches:
            return next(iter(batches))[1]['image']

    plain = first_batch(None, True)
    augmented = first_batch((2, 14), True)
    assert augmented.shape == plain.shape
    changed = [not np.array_equal(a, p) for a, p in zip(augmented, plain)]
    # Identity twice has probability 1/196 per image; with 16 images most are changed.
    assert sum(changed) >= 12
    np.testing.assert_array_equal(first_batch((2, 14), True), augmented)  # a pure function of (seed, step)
    np.testing.assert_array_equal(first_batch((2, 14), False), first_batch(None, False))
