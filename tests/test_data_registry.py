"""A dataset is resolved once (`data.resolve`): its spec, opened tfds builder and keys, folder layout and classes,
class count, channels and statistics travel as one object to every pipeline, cache key and probe that reads it."""

import collections
import dataclasses
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import experiments
from cratemae import data
from cratemae.data import embedded
from cratemae.data import folder as folder_lib
from cratemae.data import registry
from cratemae.data import tfds_source
from cratemae.data import tfds_writer
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features


def _png(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, np.uint8), 'L').save(buf, format='PNG')
    return buf.getvalue()


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('tfds')
    splits = {'train': [(_png(9 * i), i % 2) for i in range(8)], 'test': [(_png(7 * i), i % 2) for i in range(4)]}
    tfds_writer.write_dataset(root, 'resolved_once', splits, num_classes=2)
    return str(root)


def _cfg(**kw):
    cfg = data.default_data_config()
    cfg.update(image_size=28, channels=1, augment='none', num_workers=0)
    cfg.update(kw)
    return cfg


def _tfds_cfg(tfds_dir, **kw):
    return _cfg(name='tfds:resolved_once', data_dir=tfds_dir, **kw)


@pytest.fixture(scope='module')
def pixels_ckpt():
    return checkpoints.random_init(experiments.get_config('crate_mae_test').model, seed=0)


@pytest.fixture
def opened(monkeypatch):
    """Counts tfds builder opens, image/label key resolutions and folder listings."""
    counts = collections.Counter()

    def counting(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: counts.update([name]) or real(*a, **k))

    counting(tfds, 'builder')
    counting(tfds_source, 'resolve_keys')
    counting(folder_lib, 'list_files')
    return counts


def test_features_of_a_tfds_split_open_its_builder_once(tfds_dir, pixels_ckpt, opened, tmp_path):
    """The cache key and the pipeline of one split_features call share one resolution (before: 3 builder opens and
    2 key resolutions)."""
    features.split_features(pixels_ckpt, _tfds_cfg(tfds_dir), 'train', 'pixels', cache_dir=tmp_path)
    assert (opened['builder'], opened['resolve_keys']) == (1, 1)


def test_a_probe_opens_its_tfds_dataset_once(tfds_dir, pixels_ckpt, opened, tmp_path):
    """Choosing the splits, two cache keys and two pipelines: one builder open (before: 9 opens, 4 key resolutions)."""
    ckpt = dataclasses.replace(pixels_ckpt, data_config=_tfds_cfg(tfds_dir))
    cfg, dataset, _ = features.probe_data_config(ckpt)
    assert (cfg.split_train, cfg.split_eval) == ('train', 'test')
    for split in (cfg.split_train, cfg.split_eval):
        features.split_features(ckpt, cfg, split, 'pixels', dataset=dataset, cache_dir=tmp_path)
    assert (opened['builder'], opened['resolve_keys']) == (1, 1)


def test_train_and_eval_pipelines_share_one_resolved_dataset(tfds_dir, opened):
    """As the training engine builds them (before: one builder open and key resolution per pipeline)."""
    cfg = _tfds_cfg(tfds_dir)
    dataset = data.resolve(cfg)
    train = data.make_pipeline(cfg, 'train', 4, seed=0, dataset=dataset)
    ev = data.make_pipeline(cfg, 'auto', 4, seed=0, train=False, dataset=dataset)
    assert features.cache_key(None, cfg, 'test', 'pixels', dataset)
    assert (opened['builder'], opened['resolve_keys']) == (1, 1)
    assert train.dataset is ev.dataset is dataset and ev.split == 'test'
    assert (train.info.num_examples, ev.info.num_examples) == (8, 4)


def test_features_of_a_folder_list_it_once(tmp_path, pixels_ckpt, opened):
    """The fingerprint in the cache key and the source read one listing (before: the folder was listed twice)."""
    for c in ('a', 'b'):
        (tmp_path / 'images' / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / 'images' / c / f'{i}.png').write_bytes(_png(40 * i))
    cfg = _cfg(name='image_folder', folder=str(tmp_path / 'images'))
    feats = features.split_features(pixels_ckpt, cfg, 'train', 'pixels', cache_dir=tmp_path / 'cache')
    assert opened['list_files'] == 1 and len(feats.y) == 6


def test_a_dataset_resolved_from_another_config_is_refused(tfds_dir):
    dataset = data.resolve(_cfg())
    with pytest.raises(ValueError, match='resolved from another data config.*name, data_dir'):
        data.make_pipeline(_tfds_cfg(tfds_dir), 'train', 4, seed=0, dataset=dataset)
    with pytest.raises(ValueError, match='differs in channels'):
        features.cache_key(None, _cfg(channels=3), 'test', 'pixels', dataset)


def test_resolved_embedded_dataset_carries_classes_channels_and_statistics():
    dataset = data.resolve(_cfg(channels=3))
    assert (dataset.spec, dataset.num_classes) == (registry.DATASETS['mnist'], 10)
    assert (dataset.native_channels, dataset.channels, dataset.eval_crop_pct) == (1, 3, 1.0)
    assert (dataset.native_mean, dataset.native_std) == (registry.MNIST_MEAN, registry.MNIST_STD)
    assert (dataset.mean, dataset.std) == (registry.MNIST_MEAN * 3, registry.MNIST_STD * 3)  # grey repeated
    assert (dataset.mean, dataset.std) == data.normalization(_cfg(channels=3))  # the no-data path agrees
    assert data.resolve(_cfg(normalize='none', eval_crop_pct=0.5)).mean == (0.0,)
    assert data.resolve(_cfg(eval_crop_pct=0.5)).eval_crop_pct == 0.5
    assert dataset.split('auto') == 'test' and dataset.identity('train[:10%]')['split'] == 'train[:10%]'
    pipe = data.make_pipeline(_cfg(channels=3), 'test', 8, seed=0, train=False, dataset=dataset)
    assert (pipe.info.num_classes, pipe.info.channels, pipe.info.mean) == (10, 3, dataset.mean)


def test_resolved_tfds_dataset_carries_its_keys_version_and_classes(tfds_dir):
    dataset = data.resolve(_tfds_cfg(tfds_dir))
    assert (dataset.kind, dataset.num_classes, dataset.native_channels, dataset.channels) == ('tfds', 2, None, 1)
    luma = float(np.dot((0.299, 0.587, 0.114), registry.IMAGENET_MEAN))
    assert dataset.mean == pytest.approx((luma,)) and dataset.native_mean == registry.IMAGENET_MEAN
    assert dataset.eval_crop_pct == 0.875
    identity = dataset.identity('auto')
    assert identity == {
        'kind': 'tfds',
        'name': 'resolved_once',
        'version': '1.0.0',
        'data_dir': dataset.handle.data_dir,
        'image_key': 'image',
        'label_key': 'label',
        'split': 'test',
    }
    source, split = dataset.open('train[:50%]')
    assert (len(source), split, source.num_classes) == (4, 'train[:50%]', 2)


def test_resolved_folder_labels_every_split_by_one_class_list(tmp_path):
    """A validation/ folder that lacks a class labels the others as train/ does (before, 'c' was label 1 there: each
    split folder counted its own classes)."""
    for split, classes in (('train', 'abc'), ('validation', 'ac')):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / '0.png').write_bytes(_png(ord(c)))
    cfg = _cfg(name='image_folder', folder=str(tmp_path), channels=3)
    dataset = data.resolve(cfg)
    assert (dataset.num_classes, dataset.handle.class_names, dataset.native_channels) == (3, ['a', 'b', 'c'], None)
    assert (dataset.mean, dataset.eval_crop_pct) == (registry.IMAGENET_MEAN, 0.875)
    ev = data.make_pipeline(cfg, 'auto', 2, seed=0, train=False, dataset=dataset)
    assert ev.split == 'validation' and ev.info.num_classes == 3
    assert sorted(ev.batch(0)['label'].tolist()) == [0, 2]


def test_statistics_a_spec_lacks_are_computed_once(monkeypatch):
    """Resolving, two pipelines and the no-data normalisation read the train images for the statistics once (before:
    once per pipeline and once more for the compiled steps)."""
    name = 'digits' if 'digits' in registry.DATASETS else 'mnist'
    monkeypatch.setitem(
        registry.DATASETS, name, dataclasses.replace(registry.DATASETS[name], mean=None, std=None)
    )  # digits has none; mnist's are dropped
    reads = collections.Counter()
    real = embedded.load_arrays

    class Counted(dict):
        def __getitem__(self, key):
            reads[key] += 1
            return dict.__getitem__(self, key)

    monkeypatch.setattr(embedded, 'load_arrays', lambda n: Counted(real(n)))
    embedded.train_statistics.cache_clear()
    cfg = _cfg(name=name, image_size=8)
    dataset = data.resolve(cfg)
    data.make_pipeline(cfg, 'test', 4, seed=0, train=False, dataset=dataset)
    data.make_pipeline(cfg, 'test[:50%]', 4, seed=0, train=False)
    assert data.normalization(cfg) == (dataset.mean, dataset.std)
    assert reads['train_image'] == 1
    x = real(name)['train_image'] / 255.0
    np.testing.assert_allclose(dataset.native_mean, [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(dataset.native_std, [x.std()], rtol=1e-12)
