"""The shared decoder: JPEG fast path, colour modes on the folder and tfds paths, tfds:NAME.

Every image here is a real encoded file (JPEG/PNG bytes written by PIL or by hand), and
every tfds dataset is prepared by the test itself (`tfds_writer`, no TensorFlow).
"""

import io
import logging
import socket
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from cratemae import data
from cratemae.data import augment
from cratemae.data import decode
from cratemae.data import tfds_writer


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError('tests must not touch the network')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.delenv('TFDS_DATA_DIR', raising=False)


def encode(image, fmt='JPEG', **kw):
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, fmt, **kw)
    return buf.getvalue()


def png16(a):
    """A 16-bit PNG (grey or RGB) written by hand: PIL cannot write 16-bit RGB."""
    h, w = a.shape[:2]
    rows = b''.join(b'\x00' + a[i].astype('>u2').tobytes() for i in range(h))

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

    header = struct.pack('>IIBBBBB', w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b'')


@pytest.fixture(scope='module')
def photo_jpeg():
    """A 500x375 photographic JPEG (quality 90), the shape of a typical ImageNet image."""
    im = Image.fromarray(skimage.data.astronaut()).resize((500, 375), Image.BICUBIC)
    return encode(im, quality=90)


# ------------------------------------------------------------------------------------------
# fast path


def test_reduction_keeps_the_crop_at_least_output_size():
    assert decode.reduction((0, 0, 447, 500), 224) == 1
    assert decode.reduction((0, 0, 448, 500), 224) == 2
    assert decode.reduction((0, 0, 300, 300), 64) == 4
    assert decode.reduction((0, 0, 512, 600), 64) == 8
    assert decode.reduction((0, 0, 2000, 2000), 64) == 8  # libjpeg's smallest scale is 1/8


def test_fast_path_matches_full_decode_of_the_same_crop(photo_jpeg, monkeypatch):
    """Tolerance: mean |fast - full| <= 3 / 4 / 6 grey levels (of 255) per crop at 1/2, 1/4 and
    1/8 scale, and no crop below 28 dB PSNR. The two are different low-pass filters ahead of
    the same bicubic resize: libjpeg's scaled IDCT keeps the lowest 4x4 / 2x2 / 1x1 DCT
    coefficients of each 8x8 block (at 1/8 a plain block mean), PIL's antialiased bicubic
    weighs a wider window, so they differ on edges; measured here: mean 1.0 / 1.7 / 2.9, worst
    1.9 / 3.0 / 4.6 on this photo, min PSNR 31 dB (PIL's draft and simplejpeg give the same pixels). Full-size
    decodes (r = 1) must be bit-identical to the array path (PIL's decode, then PIL's resize)."""
    full = decode.decode(photo_jpeg, 3)
    assert full.shape == (375, 500, 3)
    scales = []
    real_load = decode._load  # pylint: disable=protected-access

    def spy(opened, channels, draft_size=None):
        im, scale = real_load(opened, channels, draft_size)
        scales.append(scale)
        return im, scale

    monkeypatch.setattr(decode, '_load', spy)
    seen = {1: 0, 2: 0, 4: 0, 8: 0}
    for seed in range(60):
        for size in (32, 64, 112):
            box = augment.random_resized_crop_box(np.random.default_rng(seed), 375, 500)
            r = decode.reduction(box, size)
            fast = decode.decode_crop(photo_jpeg, lambda h, w, b=box: b, size, 3).astype(float)
            assert scales[-1] == 1 / r  # libjpeg really ran at 1/r
            ref = augment.resized_crop(full, box, size).astype(float)
            seen[r] += 1
            if r == 1:
                np.testing.assert_array_equal(fast, ref)
                continue
            err = np.abs(fast - ref)
            assert err.mean() <= {2: 3.0, 4: 4.0, 8: 6.0}[r], (seed, size, box, r)
            psnr = 10 * np.log10(255**2 / np.mean(err**2))
            assert psnr >= 28, (seed, size, box, r, psnr)
    assert all(seen[r] >= 10 for r in (1, 2, 4, 8)), seen


def _jpeg_kinds():
    """name -> (JPEG bytes, channels of the pixels PIL decodes them to)."""
    im = Image.fromarray(skimage.data.astronaut()).resize((160, 120), Image.BICUBIC)
    return {
        'baseline_420': (encode(im, quality=90), 3),
        'baseline_444': (encode(im, quality=90, subsampling=0), 3),
        'progressive': (encode(im, quality=90, progressive=True), 3),
        'progressive_grey': (encode(im.convert('L'), quality=90, progressive=True), 1),
        'grey': (encode(im.convert('L'), quality=90), 1),
        'odd_size_422': (encode(im.crop((0, 0, 157, 101)), quality=75, subsampling=1), 3),
    }


@pytest.mark.parametrize('kind', sorted(_jpeg_kinds()))
def test_simplejpeg_decodes_as_pil_does(kind):
    """Upright L / RGB JPEGs go through simplejpeg: the same pixels as PIL's decoder, full size and drafted
    (1/2, 1/4), progressive files too; 1 channel of an RGB JPEG stays PIL's luma (PIL decodes it)."""
    payload, native = _jpeg_kinds()[kind]
    pil = Image.open(io.BytesIO(payload))
    for channels in (1, 3):
        via = decode._decode_jpeg(payload, Image.open(io.BytesIO(payload)), channels, 1)  # pylint: disable=protected-access
        if native == 3 and channels == 1:
            assert via is None
            continue
        np.testing.assert_array_equal(via, decode.decode(payload, channels))
    for r in (2, 4):
        pil = Image.open(io.BytesIO(payload))
        pil.draft(pil.mode, (pil.size[0] // r, pil.size[1] // r))
        via = decode._decode_jpeg(payload, Image.open(io.BytesIO(payload)), 3, r)  # pylint: disable=protected-access
        np.testing.assert_array_equal(via, np.asarray(pil.convert('RGB')))


def test_damaged_jpeg_falls_back_to_pil_and_its_verdict(photo_jpeg):
    cut = photo_jpeg[: len(photo_jpeg) // 2]
    with pytest.raises(decode.UndecodableImage):
        decode.decode_crop(cut, lambda h, w: (0, 0, h, w), 32, 3)


@pytest.mark.skipif(not decode.torch_available(), reason='resize=torch needs PyTorch')
def test_torch_resize_is_the_same_filter(photo_jpeg):
    """resize='torch' (PyTorch's uint8 antialiased bicubic) against PIL's on the same crops of a photo: the same
    filter (Keys cubic, a = -0.5, widened by the scale when shrinking) computed with other fixed-point roundings.
    Tolerance: mean |torch - pil| <= 0.25 grey levels per crop, no pixel off by more than 16 (measured: mean 0.013,
    worst crop 0.045); boxes off the whole-pixel grid (scaled by r > 1, the eval centre box) are PIL's own."""
    rng = np.random.default_rng(0)
    for seed in range(40):
        size = (32, 64, 112, 224)[seed % 4]
        box = augment.random_resized_crop_box(rng, 375, 500)
        flip = bool(seed % 2)
        pil = decode.decode_crop(photo_jpeg, lambda h, w, b=box: b, size, 3, flip_fn=lambda f=flip: f)
        tor = decode.decode_crop(photo_jpeg, lambda h, w, b=box: b, size, 3, flip_fn=lambda f=flip: f, resize='torch')
        assert tor.shape == pil.shape == (size, size, 3) and tor.dtype == np.uint8
        err = np.abs(tor.astype(int) - pil)
        assert err.mean() <= 0.25 and err.max() <= 16, (seed, box, size, err.mean())
    grey = encode(Image.open(io.BytesIO(photo_jpeg)).convert('L'), quality=90)
    for payload, channels in ((photo_jpeg, 1), (grey, 1), (grey, 3)):
        box = (10, 20, 200, 230)
        pil = decode.decode_crop(payload, lambda h, w: box, 96, channels)
        tor = decode.decode_crop(payload, lambda h, w: box, 96, channels, resize='torch')
        assert tor.shape == (96, 96, channels) and np.abs(tor.astype(float) - pil).mean() <= 0.25


def test_resize_torch_is_a_config_choice(photo_jpeg, tmp_path, monkeypatch):
    """--config.data.resize=torch reaches the decoder; without PyTorch it is a config-time error naming the fix."""
    (tmp_path / 'a.jpg').write_bytes(photo_jpeg)
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(tmp_path), image_size=224, channels=3, prefetch=0)  # r = 1: whole pixels
    calls = []
    real = decode._resize_torch  # pylint: disable=protected-access
    monkeypatch.setattr(decode, '_resize_torch', lambda *a: calls.append(1) or real(*a))
    if decode.torch_available():
        cfg.resize = 'torch'
        data.make_pipeline(cfg, 'train', 2, seed=0, uint8=True).batch(0)
        assert len(calls) == 2
    monkeypatch.setattr(decode, 'torch_available', lambda: False)
    cfg.resize = 'torch'
    with pytest.raises(ValueError, match=r"pip install 'cratemae\[torch-resize\]'"):
        data.validate_data_config(cfg)


def test_pipeline_crops_are_random_resized_crops_of_the_full_image(photo_jpeg, tmp_path):
    """The window is sampled on the full-size image with the same rng draws as the array path
    (torchvision's RandomResizedCrop), whatever scale the decoder then runs at: for every
    example, the training transform of the encoded file equals the reference MAE transform
    (full decode, `augment.mae_train`) within the fast-path tolerance, flips included."""
    (tmp_path / 'a.jpg').write_bytes(photo_jpeg)
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(tmp_path), image_size=48, channels=3, normalize='none', prefetch=0)
    pipe = data.make_pipeline(cfg, 'train', 1, seed=0)
    transform = pipe._batcher.transform  # pylint: disable=protected-access
    full = decode.decode(photo_jpeg, 3)
    for seed in range(40):
        got, _ = transform.train((0, photo_jpeg, 0), np.random.default_rng(seed))
        want = augment.mae_train(full, np.random.default_rng(seed), 48)
        err = np.abs(got.astype(float) - want)
        assert err.mean() <= 6.0, seed
        # a wrong window or a missed flip would be far off: the halves differ by ~40 levels
        assert err.mean() < 0.25 * np.abs(want - want[:, ::-1]).mean() + 1, seed


def test_eval_transform_of_bytes_equals_the_array_path(photo_jpeg):
    full = decode.decode(photo_jpeg, 3)
    for size, pct in ((224, 0.875), (64, 1.0)):
        got = decode.decode_crop(photo_jpeg, lambda h, w, p=pct: augment.center_box(h, w, p), size, 3)
        want = augment.eval_transform(full, size, pct)
        tol = 0 if decode.reduction(augment.center_box(375, 500, pct), size) == 1 else 3.0
        assert np.abs(got.astype(float) - want).mean() <= tol


def test_undecodable_bytes_are_a_clear_error():
    with pytest.raises(decode.UndecodableImage, match='not a readable image'):
        decode.decode(b'certainly not a jpeg', 3)
    with pytest.raises(decode.UndecodableImage, match='cannot decode'):
        whole = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), 'PNG')
        decode.decode(whole[: len(whole) // 2], 3)  # header fine, pixels cut


# ------------------------------------------------------------------------------------------
# colour modes: identical on the folder and tfds paths, each checked against its pixels


def _smooth(h=32, w=32):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def colour_cases():
    """name -> (encoded bytes, expected uint8 RGB (32, 32, 3), tolerance in grey levels)."""
    rgb = _smooth()
    grey = rgb[..., 0]
    wide = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    wide_rgb = np.stack([wide, wide[::-1], wide.T], -1)
    palette = np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30], [250, 250, 5]], np.uint8)
    index = (np.arange(32)[:, None] // 8 + np.arange(32)[None, :] // 8) % 4
    pal = Image.fromarray(index.astype(np.uint8), 'P')
    pal.putpalette(palette.ravel().tolist())
    rgba = np.concatenate([rgb, np.arange(32 * 32).reshape(32, 32, 1).astype(np.uint8)], -1)
    stored = np.ascontiguousarray(np.rot90(rgb, 1))  # shown rotated 90 degrees clockwise
    exif_image = Image.fromarray(stored)
    exif = exif_image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return {
        'cmyk_jpeg': (encode(Image.fromarray(rgb).convert('CMYK'), quality=95), rgb, 6),
        'grey_jpeg': (encode(grey, quality=95), np.repeat(grey[..., None], 3, -1), 3),
        'palette_png': (encode(pal, 'PNG', transparency=0), palette[index], 0),
        'rgba_png': (encode(rgba, 'PNG'), rgb, 0),
        'grey16_png': (png16(wide), np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, -1), 0),
        'rgb16_png': (png16(wide_rgb), (wide_rgb >> 8).astype(np.uint8), 0),
        'exif_rotated_jpeg': (encode(exif_image, quality=95, exif=exif), rgb, 6),
    }


def _eval_images(cfg):
    """{label: uint8 image} of the whole eval split at native size (crop 1, no normalisation)."""
    pipe = data.make_pipeline(cfg, 'train', 8, seed=0, train=False)
    b = pipe.batch(0)
    n = pipe.info.num_examples
    return {int(l): np.rint(x * 255).astype(np.uint8) for l, x in zip(b['label'][:n], b['image'][:n])}


@pytest.mark.parametrize('channels', [3, 1])
def test_colour_modes_identical_on_folder_and_tfds_paths(tmp_path, channels):
    cases = colour_cases()
    names = sorted(cases)
    for name in names:  # one class folder per case: label = sorted position
        (tmp_path / 'folder' / name).mkdir(parents=True)
        (tmp_path / 'folder' / name / 'x.img').write_bytes(cases[name][0])
        # the extension list matters for the folder scan: give each its real one
        ext = '.png' if name.endswith('png') else '.jpg'
        (tmp_path / 'folder' / name / 'x.img').rename(tmp_path / 'folder' / name / f'x{ext}')
    tfds_writer.write_dataset(
        tmp_path / 'tfds', 'colour_cases', {'train': [(cases[n][0], i) for i, n in enumerate(names)]}, len(names)
    )
    common = dict(image_size=32, channels=channels, normalize='none', eval_crop_pct=1.0, prefetch=0)
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(tmp_path / 'folder'), **common)
    from_folder = _eval_images(cfg)
    cfg = data.default_data_config()
    cfg.update(name='tfds:colour_cases', data_dir=str(tmp_path / 'tfds'), **common)
    from_tfds = _eval_images(cfg)
    assert sorted(from_folder) == sorted(from_tfds) == list(range(len(names)))
    for i, name in enumerate(names):
        np.testing.assert_array_equal(from_folder[i], from_tfds[i], err_msg=name)
        _, want, tol = cases[name]
        if channels == 1:
            want = np.asarray(Image.fromarray(want).convert('L'))[..., None]
        err = np.abs(from_folder[i].astype(int) - want)
        assert err.mean() <= max(tol, 0) and (tol or err.max() <= 1), (name, err.mean(), err.max())


# ------------------------------------------------------------------------------------------
# tfds:NAME


@pytest.fixture(scope='module')
def jpeg_tfds(tmp_path_factory):
    """A JPEG tfds dataset (train 12 / validation 5, 3 classes) prepared without TF."""
    root = tmp_path_factory.mktemp('tfds')
    rng = np.random.default_rng(0)

    def jpegs(n):
        return [(encode(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)), i % 3) for i in range(n)]

    tfds_writer.write_dataset(root, 'my_photos', {'train': jpegs(12), 'validation': jpegs(5)}, 3)
    return str(root)


def tfds_cfg(data_dir, name='tfds:my_photos', **kw):
    cfg = data.default_data_config()
    cfg.update(dict(name=name, data_dir=data_dir, image_size=24, channels=3, prefetch=0), **kw)
    return cfg


def test_any_tfds_dataset_by_name(jpeg_tfds):
    import sys

    cfg = tfds_cfg(jpeg_tfds)
    data.validate_data_config(cfg)
    pipe = data.make_pipeline(cfg, 'train', 4, seed=0)
    assert pipe.info.num_examples == 12 and pipe.info.num_classes == 3
    b = pipe.batch(1)
    assert b['image'].shape == (4, 24, 24, 3) and set(b['label'].tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(b['image'], data.make_pipeline(cfg, 'train', 4, seed=0).batch(1)['image'])
    ev = data.make_pipeline(cfg, cfg.split_eval, 4, seed=0, train=False)  # 'auto'
    assert ev.split == 'validation' and ev.num_batches == 2
    versioned = data.make_pipeline(tfds_cfg(jpeg_tfds, 'tfds:my_photos:1.0.0'), 'train[:50%]', 2, seed=0)
    assert versioned.info.num_examples == 6
    assert 'tensorflow' not in sys.modules


def test_tfds_records_are_read_as_bytes(jpeg_tfds):
    from cratemae.data import tfds_source

    source, split = tfds_source.PreparedDataset('tfds:my_photos', jpeg_tfds).open('train')
    payload, label = source[0]
    assert split == 'train' and decode.is_encoded(payload) and payload[:2] == b'\xff\xd8'
    assert 0 <= label < 3


def test_tfds_keys_splits_and_names_are_checked(jpeg_tfds, tmp_path):
    with pytest.raises(ValueError, match=r"no image feature 'photo'.*image \(Image\).*image_key"):
        data.make_pipeline(tfds_cfg(jpeg_tfds, image_key='photo'), 'train', 4, seed=0)
    with pytest.raises(ValueError, match="no label feature 'y'.*label_key"):
        data.make_pipeline(tfds_cfg(jpeg_tfds, label_key='y'), 'train', 4, seed=0)
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\].*split_eval"):
        data.make_pipeline(tfds_cfg(jpeg_tfds), 'test', 4, seed=0, train=False)
    with pytest.raises(ValueError, match='tfds has no dataset'):
        data.make_pipeline(tfds_cfg(jpeg_tfds, 'tfds:surely_not_a_dataset_xyz'), 'train', 4, seed=0)
    with pytest.raises(ValueError, match='tfds:NAME or tfds:NAME:VERSION'):
        data.validate_data_config(tfds_cfg(jpeg_tfds, 'tfds:'))
    with pytest.raises(
        data.DatasetNotPreparedError, match=f'python -m launch.prepare_data tfds:mnist --data_dir {tmp_path}'
    ):
        data.make_pipeline(tfds_cfg(str(tmp_path), 'tfds:mnist'), 'train', 4, seed=0)
    assert not list(tmp_path.iterdir())  # nothing downloaded or written


def test_undecodable_tfds_record_is_replaced_and_logged(tmp_path, caplog):
    good = [(encode(np.full((30, 30, 3), 40 * i, np.uint8)), i) for i in range(4)]
    tfds_writer.write_dataset(tmp_path, 'with_junk', {'train': good + [(b'junk bytes', 4)]}, 5)
    cfg = tfds_cfg(str(tmp_path), 'tfds:with_junk', normalize='none', image_size=30)
    pipe = data.make_pipeline(cfg, 'train', 5, seed=0, train=False)
    with caplog.at_level(logging.WARNING):
        b = pipe.batch(0)
    assert 'not a readable image' in caplog.text and 'instead' in caplog.text
    assert np.isfinite(b['image']).all() and len(b['image']) == 5
    means = np.rint(b['image'].mean((1, 2, 3)) * 255 / 40).astype(int)
    assert set(means.tolist()) == {0, 1, 2, 3}  # the junk one shows a real image
    np.testing.assert_array_equal(b['label'], means)  # ... with that image's own label


def test_a_prepared_dataset_copied_elsewhere_reads_the_same(jpeg_tfds, tmp_path):
    """What a pod host does with a local copy of the prepared files (docs/data.md)."""
    import shutil

    shutil.copytree(jpeg_tfds, tmp_path / 'copy')
    here = data.make_pipeline(tfds_cfg(jpeg_tfds), 'train', 4, seed=0).batch(2)
    there = data.make_pipeline(tfds_cfg(str(tmp_path / 'copy')), 'train', 4, seed=0).batch(2)
    np.testing.assert_array_equal(here['image'], there['image'])
    np.testing.assert_array_equal(here['label'], there['label'])
