"""tfds (mocked / unprepared), image folders, and launch.prepare_data. No network."""

import logging
import os
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cratemae import data
from cratemae.data import tfds_source
from launch import cli
from launch import prepare_data

NETWORK_CALLS = []


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        NETWORK_CALLS.append(args)
        raise OSError('tests must not touch the network')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.delenv('TFDS_DATA_DIR', raising=False)


def cfg_for(name, **kw):
    cfg = data.default_data_config()
    cfg.update(dict(name=name, image_size=32, channels=3, prefetch=0), **kw)
    return cfg


# ------------------------------------------------------------------------------------------
# tfds


def test_unprepared_tfds_dataset_fails_fast_naming_the_command(tmp_path):
    cfg = cfg_for('cifar10', data_dir=str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.make_pipeline(cfg, 'train', 8, seed=0)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert f'python -m launch.prepare_data cifar10 --data_dir {tmp_path}' in msg
    assert isinstance(e.value, FileNotFoundError)
    assert not NETWORK_CALLS
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]  # nothing downloaded or written


def test_unprepared_imagenet_message_mentions_manual_dir(tmp_path):
    with pytest.raises(data.DatasetNotPreparedError, match='--manual_dir'):
        data.make_pipeline(cfg_for('imagenet2012', data_dir=str(tmp_path)), 'train', 8, seed=0)


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A real tfds builder that needs no TF: variable-size uint8 Tensor images."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
                    'label': tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(12), 'test': self._generate_examples(5)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {'image': _noise(rng, (10 + i, 12, 3)), 'label': i % 3}


@pytest.fixture
def tiny_tfds(tmp_path, monkeypatch):
    """TinyImages prepared as array_record in tmp_path and registered as a dataset."""
    TinyImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
    spec = data.DatasetSpec('tiny_images', 'tfds', 3, None, (0.5,) * 3, (0.25,) * 3, 0.875)
    monkeypatch.setitem(data.DATASETS, 'tiny_images', spec)
    return str(tmp_path)


def test_real_array_record_dataset_end_to_end(tiny_tfds):
    cfg = cfg_for('tiny_images', data_dir=tiny_tfds, image_size=16)
    pipe = data.make_pipeline(cfg, 'train', 4, seed=0)
    assert pipe.info.num_examples == 12 and pipe.info.num_classes == 3
    b = pipe.batch(2)
    assert b['image'].shape == (4, 16, 16, 3) and set(b['label'].tolist()) <= {0, 1, 2}
    half = data.make_pipeline(cfg, 'train[:50%]', 4, seed=0, train=False)
    assert half.info.num_examples == 6 and half.num_batches == 2
    with pytest.raises(ValueError, match="no split 'validation'.*'train', 'test'.*split_eval"):
        data.make_pipeline(cfg, 'validation', 4, seed=0)
    assert data.make_pipeline(cfg, 'auto', 4, seed=0, train=False).split == 'test'
    # A grain worker process opens the pickled array_record source itself.
    with data.make_pipeline(
        cfg_for('tiny_images', data_dir=tiny_tfds, image_size=16, num_workers=1), 'train', 4, seed=0
    ).iterate(2) as it:
        step, got = next(it)
    assert step == 2
    np.testing.assert_array_equal(got['image'], b['image'])
    assert not NETWORK_CALLS


# ------------------------------------------------------------------------------------------
# launch.prepare_data (the download itself is never run here)


def _prepare(*argv):
    return cli.run(prepare_data.main, prepare_data.FLAGS, list(argv))


def test_prepare_data_refuses_what_it_cannot_prepare(monkeypatch, capsys):
    assert _prepare('mnist') == 0
    assert 'needs no preparation' in capsys.readouterr().out
    assert _prepare('nope') == 2 and 'unknown dataset' in capsys.readouterr().err
    assert _prepare('imagenet2012') == 2 and 'manual_dir' in capsys.readouterr().err
    monkeypatch.setattr(tfds_source, 'tensorflow_available', lambda: False)
    assert _prepare('cifar10', '--data_dir', '/nonexistent') == 2 and 'tensorflow-cpu' in capsys.readouterr().err


def test_prepare_data_writes_array_record(monkeypatch, tmp_path, capsys):
    calls = {}

    class FakeBuilder:
        data_dir = str(tmp_path / 'cifar10' / '3.0.2')
        info = type('Info', (), {'splits': {}})()

        def is_prepared(self):
            return False

        def download_and_prepare(self, **kwargs):
            calls.update(kwargs)

    def fake_builder(name, **kwargs):
        calls.update(name=name, **kwargs)
        return FakeBuilder()

    monkeypatch.setattr(tfds_source, 'tensorflow_available', lambda: True)
    monkeypatch.setattr(tfds, 'builder', fake_builder)
    assert _prepare('imagenet2012', '--data_dir', str(tmp_path), '--manual_dir', '/tars') == 0
    assert calls['name'] == 'imagenet2012' and calls['data_dir'] == str(tmp_path)
    assert calls['file_format'] == 'array_record'
    assert calls['download_config'].manual_dir == '/tars'
    assert '--config.data.name=imagenet2012' in capsys.readouterr().out
    assert _prepare('tfds:food101:2.0.0', '--data_dir', str(tmp_path)) == 0
    assert calls['name'] == 'food101:2.0.0' and calls['file_format'] == 'array_record'
    assert '--config.data.name=tfds:food101:2.0.0' in capsys.readouterr().out
    assert _prepare('tfds:') == 2 and 'tfds:NAME or tfds:NAME:VERSION' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# image_folder


def _save(path, image):
    """Writes a numpy array or PIL image, creating parent folders."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(str(path))


def _noise(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'imgs'
    _save(root / 'cat' / 'a.png', _noise(rng, (40, 50, 3)))
    _save(root / 'cat' / 'b.jpg', _noise(rng, (60, 40)))  # grey JPEG
    _save(root / 'cat' / 'c.png', _noise(rng, (48, 48, 4)))  # RGBA
    _save(root / 'dog' / 'd.png', _noise(rng, (8, 6, 3)))  # tiny: upscaled
    _save(root / 'dog' / 'e.gif', Image.fromarray(_noise(rng, (36, 36, 3))).convert('P'))
    (root / 'dog' / 'corrupt.jpg').write_bytes(b'this is not an image' * 10)
    (root / 'dog' / 'notes.txt').write_text('ignored: not an image extension')
    return root


def test_image_folder_classes_modes_and_skips(folder, caplog):
    cfg = cfg_for('image_folder', folder=str(folder))
    with caplog.at_level(logging.WARNING):
        pipe = data.make_pipeline(cfg, 'train', 5, seed=0)
    assert pipe.info.num_examples == 5 and pipe.info.num_classes == 2
    assert 'skipped 1 unreadable' in caplog.text and 'corrupt.jpg' in caplog.text
    assert '1 of 5 image(s) are smaller than 32 px' in caplog.text
    b = pipe.batch(0)
    assert b['image'].shape == (5, 32, 32, 3) and np.isfinite(b['image']).all()
    assert sorted(b['label'].tolist()) == [0, 0, 0, 1, 1]
    grey = data.make_pipeline(cfg_for('image_folder', folder=str(folder), channels=1), 'auto', 4, seed=0, train=False)
    e = grey.batch(1)
    assert e['image'].shape == (4, 32, 32, 1) and e['valid'].tolist() == [True, False, False, False]


def test_truncated_image_is_replaced_and_logged(tmp_path, caplog):
    rng = np.random.default_rng(1)
    for i in range(3):
        _save(tmp_path / f'{i}.png', _noise(rng, (40, 40, 3)))
    raw = (tmp_path / '1.png').read_bytes()
    (tmp_path / '1.png').write_bytes(raw[: len(raw) // 2])  # header fine, pixels cut
    cfg = cfg_for('image_folder', folder=str(tmp_path), image_size=40)
    pipe = data.make_pipeline(cfg, 'train', 3, seed=0, train=False)
    assert pipe.info.num_classes is None  # flat folder: unlabelled
    with caplog.at_level(logging.WARNING):
        b = pipe.batch(0)
    assert 'cannot decode' in caplog.text and '1.png' in caplog.text
    np.testing.assert_array_equal(b['image'][1], b['image'][2])  # 1 -> next readable (2)
    assert b['label'].tolist() == [-1, -1, -1]


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / 'readme.txt').write_text('no images')
    with pytest.raises(ValueError, match='no readable images'):
        data.make_pipeline(cfg_for('image_folder', folder=str(tmp_path)), 'train', 2, seed=0)


def test_split_subfolders_are_used_when_present(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (('train', 3), ('val', 2)):
        for i in range(n):
            _save(tmp_path / split / f'{i}.png', _noise(rng, (9, 9, 3)))
    cfg = cfg_for('image_folder', folder=str(tmp_path), split_eval='val')
    assert data.make_pipeline(cfg, 'train', 3, seed=0).info.num_examples == 3
    assert data.make_pipeline(cfg, 'val', 2, seed=0, train=False).info.num_examples == 2


@pytest.fixture
def split_layout(tmp_path):
    """DIR/train/<class>/ + DIR/validation/<class>/, 2 classes: the layout of the reported bug."""
    rng = np.random.default_rng(3)
    for split, n in (('train', 3), ('validation', 2)):
        for cls in ('ant', 'bee'):
            for i in range(n):
                _save(tmp_path / split / cls / f'{i}.png', _noise(rng, (12, 12, 3)))
    return tmp_path


def test_split_layout_finds_its_eval_split_and_never_reads_splits_as_classes(split_layout):
    cfg = cfg_for('image_folder', folder=str(split_layout))  # split_eval left at its default
    assert cfg.split_eval == 'auto'
    train = data.make_pipeline(cfg, cfg.split_train, 4, seed=0)
    ev = data.make_pipeline(cfg, cfg.split_eval, 4, seed=0, train=False)
    assert ev.split == 'validation' and train.split == 'train'
    assert (train.info.num_examples, ev.info.num_examples) == (6, 4)
    assert train.info.num_classes == ev.info.num_classes == 2  # ant, bee: not train/validation
    assert sorted(np.concatenate([ev.batch(0)['label']]).tolist()) == [0, 0, 1, 1]


def test_missing_folder_split_is_an_error_listing_splits_and_the_flag(split_layout):
    cfg = cfg_for('image_folder', folder=str(split_layout))
    with pytest.raises(
        ValueError,
        match=r"no split folder 'test'.*\['train', 'validation'\]"
        r".*--config.data.split_eval",
    ):
        data.make_pipeline(cfg, 'test', 4, seed=0, train=False)
    (split_layout / 'validation').rename(split_layout / 'holdout')
    with pytest.raises(ValueError, match='no evaluation split.*split_eval'):
        data.make_pipeline(cfg, 'auto', 4, seed=0, train=False)


def test_flat_folder_is_one_split_and_says_so(folder, caplog):
    cfg = cfg_for('image_folder', folder=str(folder))
    with caplog.at_level(logging.WARNING):
        ev = data.make_pipeline(cfg, 'auto', 4, seed=0, train=False)
    assert ev.split == 'train' and 'evaluating on the training images' in caplog.text
    with pytest.raises(ValueError, match="one split is 'train'.*validation/<class>"):
        data.make_pipeline(cfg, 'test', 4, seed=0, train=False)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_a_folder_gone_bad_raises_in_the_consumer(tmp_path, prefetch):
    rng = np.random.default_rng(4)
    for i in range(3):
        _save(tmp_path / f'{i}.png', _noise(rng, (20, 20, 3)))
    pipe = data.make_pipeline(
        cfg_for('image_folder', folder=str(tmp_path), image_size=16, prefetch=prefetch), 'train', 2, seed=0
    )
    for i in range(3):
        (tmp_path / f'{i}.png').unlink()  # every file vanishes after the scan
    with pytest.raises(ValueError, match='16 consecutive records from index'):
        with pipe.iterate(0) as it:
            next(it)
