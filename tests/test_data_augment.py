"""Known-answer tests for cratemae.data.augment (pure numpy/PIL, no I/O)."""

import math

import numpy as np
import pytest

from cratemae.data import augment


class FixedRng:
    """Stands in for np.random.Generator: uniform/integers/random from lists."""

    def __init__(self, uniforms=(), integers=(), randoms=()):
        self.uniforms, self.integers_, self.randoms = (list(uniforms), list(integers), list(randoms))

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.uniforms.pop(0)  # values given as fractions

    def integers(self, lo, hi):
        return lo + self.integers_.pop(0)

    def random(self):
        return self.randoms.pop(0)


def gradient(h=256, w=256, c=1):
    """image[i, j, :] = j: a horizontal ramp 0..w-1."""
    return np.broadcast_to(np.arange(w, dtype=np.uint8)[None, :, None], (h, w, c)).copy()


def test_to_channels_known_values():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    grey = augment.to_channels(rgb, 1)
    # Y = 0.299 R + 0.587 G + 0.114 B, rounded.
    assert grey[..., 0].tolist() == [[76, 150, 29, round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)]]
    assert grey.shape == (1, 4, 1)
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    out = augment.to_channels(g, 3)
    assert out.shape == (2, 3, 3) and all((out[..., k] == g).all() for k in range(3))
    rgba = np.concatenate([rgb, np.full((1, 4, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(augment.to_channels(rgba, 3), rgb)
    np.testing.assert_array_equal(augment.to_channels(rgb, 3), rgb)


def test_random_resized_crop_box_formula():
    # area fraction 0.25 of 100x100 and log-ratio midpoint (aspect 1): 50 x 50 at (0, 0).
    rng = FixedRng(uniforms=[(0.25 - 0.2) / 0.8, 0.5], integers=[0, 0])
    assert augment.random_resized_crop_box(rng, 100, 100) == (0, 0, 50, 50)
    # aspect 4/3 (top of the range), full area: w = round(sqrt(1e4 * 4/3)) = 115 > 100 -> retry.
    rng = FixedRng(uniforms=[1.0, 1.0, 1.0, 0.5], integers=[3, 7])
    assert augment.random_resized_crop_box(rng, 100, 100) == (3, 7, 100, 100)


def test_random_resized_crop_box_fallback_is_clamped_centre_crop():
    # A 10 x 100 strip never fits a crop of area >= 20% with aspect <= 4/3: 10 misses.
    rng = np.random.default_rng(0)
    box = augment.random_resized_crop_box(rng, 10, 100, scale=(1.0, 1.0))
    assert box == (0, (100 - 13) // 2, 10, 13)  # h = 10, w = round(10 * 4/3)


def test_random_resized_crop_box_distribution():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = augment.random_resized_crop_box(rng, 120, 160)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 0.2 * 0.9 <= h * w / (120 * 160) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_resized_crop_of_gradient():
    img = gradient()
    # Same size at integer offsets: an exact slice.
    np.testing.assert_array_equal(augment.resized_crop(img, (0, 64, 128, 128), 128), img[:128, 64:192])
    # 2x bicubic (antialiased) downscale of a ramp: column k averages j = 64 + 2k, 64 + 2k + 1.
    out = augment.resized_crop(img, (32, 64, 128, 128), 64)[..., 0].astype(float)
    assert out.shape == (64, 64)
    np.testing.assert_allclose(out[:, 2:-2], np.broadcast_to(64 + 2 * np.arange(64) + 0.5, (64, 64))[:, 2:-2], atol=1.0)
    # 2x upscale: pixel centre k maps to j = 64 + (k + 0.5) / 2 - 0.5.
    out = augment.resized_crop(img, (32, 64, 32, 32), 64)[..., 0].astype(float)
    want = 64 + (np.arange(64) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(out[:, 2:-2], np.broadcast_to(want, (64, 64))[:, 2:-2], atol=1.0)
    assert (out == out[:1]).all()  # rows identical: the ramp is horizontal


def test_resized_crop_rgb_and_grey_shapes():
    rgb = gradient(40, 60, 3)
    assert augment.resized_crop(rgb, (0, 0, 40, 60), 32).shape == (32, 32, 3)
    assert augment.resized_crop(rgb[..., :1], (1.5, 2.5, 20.0, 20.0), 8).shape == (8, 8, 1)


def test_hflip_known_array():
    a = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
    f = augment.hflip(a)
    assert f[0, :, 0].tolist() == [4, 2, 0]
    np.testing.assert_array_equal(f, a[:, ::-1])
    np.testing.assert_array_equal(augment.hflip(f), a)


@pytest.mark.parametrize('shape', [(5, 7, 3), (5, 7, 1), (2, 5, 7, 3), (4, 6, 4)])
@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_hflip_moves_whole_pixels(shape, dtype):
    """Any channel count and item size (the whole pixel moves as one item), and strided input."""
    a = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    np.testing.assert_array_equal(augment.hflip(a), a[:, ::-1])
    strided = a[:, 1::2]  # not contiguous
    got = augment.hflip(strided)
    np.testing.assert_array_equal(got, strided[:, ::-1])
    assert got.flags.c_contiguous and got.dtype == dtype


def test_normalize_is_the_per_channel_formula_bit_for_bit():
    """Tiling the constants along the row gives exactly x * scale + bias per channel, each rounded to float32
    (what the devices compute from uint8 batches); also for one image, a grey image, a strided batch and one
    (mean, std) shared by 3 channels."""
    rng = np.random.default_rng(1)
    m, s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for x, mean, std in (
        (rng.integers(0, 256, (3, 9, 11, 3), dtype=np.uint8), m, s),
        (rng.integers(0, 256, (9, 11, 3), dtype=np.uint8), m, s),
        (rng.integers(0, 256, (2, 9, 11, 1), dtype=np.uint8), (0.1307,), (0.3081,)),
        (rng.integers(0, 256, (2, 9, 22, 3), dtype=np.uint8)[:, :, ::2], m, s),
        (rng.integers(0, 256, (2, 9, 11, 3), dtype=np.uint8), (0.5,), (0.25,)),
    ):
        scale, bias = augment.normalize_constants(mean, std)
        want = (x.astype(np.float32) * np.broadcast_to(scale, (x.shape[-1],))).astype(np.float32)
        want += np.broadcast_to(bias, (x.shape[-1],))
        got = augment.normalize(x, mean, std)
        assert got.shape == x.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        ref = (x / 255.0 - np.array(mean, np.float64)) / np.array(std, np.float64)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_normalize_known_values():
    img = np.array([[[0, 255, 51]]], np.uint8)
    out = augment.normalize(img, (0.5, 0.5, 0.2), (0.25, 0.25, 0.1))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [-2.0, 2.0, 0.0], atol=1e-6)
    # ImageNet: a pixel at the mean maps to ~0; the formula matches (x/255 - m)/s.
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    m, s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    np.testing.assert_allclose(augment.normalize(batch, m, s), (batch / 255.0 - np.array(m)) / np.array(s), atol=1e-5)


def test_eval_transform_identity_and_centre_crop():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment.eval_transform(img, 32, 1.0), img)
    big = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    # crop_pct 0.875 of 256 = 224: the centre 224 x 224, no resampling.
    np.testing.assert_array_equal(augment.eval_transform(big, 224, 0.875), big[16:240, 16:240])
    # Non-square: the centre square of the short side, resized.
    wide = gradient(100, 200, 1)
    out = augment.eval_transform(wide, 50, 1.0)[..., 0].astype(float)
    np.testing.assert_allclose(out[:, 2:-2], np.broadcast_to(50 + 2 * np.arange(50) + 0.5, (50, 50))[:, 2:-2], atol=1.0)


def test_mae_train_flip_half_the_time_and_deterministic():
    img = gradient(32, 32, 1)
    flips = 0
    for seed in range(200):
        out = augment.mae_train(img, np.random.default_rng(seed), 32, scale=(1.0, 1.0))
        again = augment.mae_train(img, np.random.default_rng(seed), 32, scale=(1.0, 1.0))
        np.testing.assert_array_equal(out, again)
        # Full-image crop of a square: the image itself or its mirror.
        if (out == img[:, ::-1]).all():
            flips += 1
        else:
            assert abs(out.astype(int) - img).max() <= 2
    assert 60 < flips < 140
    no_flip = [augment.mae_train(img, np.random.default_rng(s), 32, (1.0, 1.0), flip=False) for s in range(20)]
    assert not any((o == img[:, ::-1]).all() for o in no_flip)


def test_mae_train_output_size_for_tiny_and_large_inputs():
    rng = np.random.default_rng(0)
    assert augment.mae_train(gradient(5, 7, 3), rng, 32).shape == (32, 32, 3)  # upscaled
    assert augment.mae_train(gradient(300, 256, 3), rng, 32).shape == (32, 32, 3)


def test_luma_weights_sum_to_one():
    assert math.isclose(augment.LUMA.sum(), 1.0)
    with pytest.raises(ValueError):
        augment.to_channels(np.zeros((2, 2, 5), np.uint8), 3)
