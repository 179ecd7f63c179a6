"""Pipelines on the embedded datasets: determinism, host split, resume, eval, config."""

import collections
import os
import socket

import numpy as np
import pytest

from cratemae import data
from cratemae.data import embedded


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError('tests must not touch the network')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)


@pytest.fixture(scope='module', autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get('CRATEMAE_CACHE')
    os.environ['CRATEMAE_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    yield os.environ['CRATEMAE_CACHE']
    if old is None:
        del os.environ['CRATEMAE_CACHE']
    else:
        os.environ['CRATEMAE_CACHE'] = old


def mnist_cfg(**kw):
    cfg = data.default_data_config()
    cfg.update(dict(name='mnist', image_size=16, channels=1, prefetch=2), **kw)
    return cfg


def test_default_config_keys_and_validation():
    cfg = data.default_data_config()
    for key in (
        'name',
        'split_train',
        'split_eval',
        'data_dir',
        'folder',
        'image_size',
        'channels',
        'augment',
        'crop_scale',
        'hflip',
        'num_workers',
        'prefetch',
        'eval_crop_pct',
        'resize',
    ):
        assert key in cfg, key
    data.validate_data_config(cfg)


@pytest.mark.parametrize(
    'key,value,needle',
    [
        ('name', 'imagenet', 'valid names'),
        ('augment', 'randaug', 'augment'),
        ('crop_scale', (0.5, 0.1), 'crop_scale'),
        ('channels', 2, 'channels'),
        ('image_size', 0, 'image_size'),
        ('eval_crop_pct', 1.5, 'eval_crop_pct'),
        ('resize', 'cv2', "data.resize='cv2' must be one of"),
        ('split_train', 'validation', "splits ('train', 'test')"),
    ],
)
def test_validate_rejects(key, value, needle):
    cfg = data.default_data_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=needle.replace('(', r'\(').replace(')', r'\)')):
        data.validate_data_config(cfg)


def test_unknown_dataset_lists_valid_names():
    assert {'mnist', 'skimage_crops', 'cifar10', 'imagenet2012', 'image_folder'} <= set(data.dataset_names())
    assert set(data.dataset_names()) == set(data.DATASETS)
    with pytest.raises(ValueError, match='mnist.*skimage_crops'):
        data.make_pipeline(mnist_cfg(name='nope'), 'train', 8, 0)


def test_image_folder_needs_folder():
    cfg = mnist_cfg(name='image_folder', channels=3)
    with pytest.raises(ValueError, match='data.folder'):
        data.validate_data_config(cfg)


def test_info_and_shapes():
    pipe = data.make_pipeline(mnist_cfg(), 'train', 32, seed=0)
    assert pipe.info == data.DataInfo('mnist', 4500, 10, 16, 1, (0.1315,), (0.3088,))
    assert pipe.steps_per_epoch == 4500 // 32
    b = pipe.batch(0)
    assert b['image'].shape == (32, 16, 16, 1) and b['image'].dtype == np.float32
    assert b['label'].shape == (32,) and b['label'].dtype == np.int32
    assert set(b) == {'image', 'label'}


def test_mnist_mean_std_constants_match_the_data():
    x = embedded.load_arrays('mnist')['train_image'] / 255.0
    assert abs(x.mean() - 0.1315) < 5e-4 and abs(x.std() - 0.3088) < 5e-4
    arrays = embedded.load_arrays('mnist')
    assert arrays['train_image'].shape == (4500, 28, 28, 1)
    assert np.bincount(arrays['test_label']).tolist() == [50] * 10  # stratified


def test_cache_written_atomically(cache):
    embedded.load_arrays.cache_clear()  # another module may have loaded MNIST in this process from another cache
    embedded.load_arrays('mnist')
    files = os.listdir(cache)
    name = f'mnist_v{embedded.CACHE_VERSION}.npz'
    assert name in files and not [f for f in files if f.endswith('.tmp')]
    with np.load(os.path.join(cache, name)) as f:
        np.testing.assert_array_equal(f['test_label'], embedded.load_arrays('mnist')['test_label'])


def test_embedded_eval_split_mixes_classes_in_its_first_batch():
    labels = embedded.load_arrays('mnist')['test_label']
    assert len(np.unique(labels[:32])) >= 8  # stored order is shuffled, not sorted by class


def test_deterministic_across_objects_and_seeds():
    a = data.make_pipeline(mnist_cfg(), 'train', 16, seed=3)
    b = data.make_pipeline(mnist_cfg(), 'train', 16, seed=3)
    c = data.make_pipeline(mnist_cfg(), 'train', 16, seed=4)
    for step in (0, 7, 1000):
        np.testing.assert_array_equal(a.batch(step)['image'], b.batch(step)['image'])
        np.testing.assert_array_equal(a.batch(step)['label'], b.batch(step)['label'])
        assert not np.array_equal(a.batch(step)['image'], c.batch(step)['image'])
    assert not np.array_equal(a.batch(0)['image'], a.batch(1)['image'])


def _keys(images):
    return [im.tobytes() for im in images]


def test_each_epoch_is_a_permutation_and_epochs_reshuffle():
    cfg = mnist_cfg(image_size=28, augment='none')  # identity transform: images identify examples
    pipe = data.make_pipeline(cfg, 'train', 500, seed=0)
    ref = data.make_pipeline(cfg, 'train', 500, seed=0, train=False)
    all_images = np.concatenate([ref.batch(i)['image'] for i in range(ref.num_batches)])
    per_epoch = 4500 // 500
    epoch0 = np.concatenate([pipe.batch(s)['image'] for s in range(per_epoch)])
    epoch1 = np.concatenate([pipe.batch(s)['image'] for s in range(per_epoch, 2 * per_epoch)])
    assert collections.Counter(_keys(epoch0)) == collections.Counter(_keys(all_images))
    assert collections.Counter(_keys(epoch1)) == collections.Counter(_keys(all_images))
    assert _keys(epoch0) != _keys(epoch1)
    assert _keys(epoch0) != _keys(all_images)  # shuffled at all


@pytest.mark.parametrize('augment', ['mae', 'none'])
def test_host_slices_concatenate_to_the_single_host_batch(augment):
    cfg = mnist_cfg(augment=augment)
    single = data.make_pipeline(cfg, 'train', 24, seed=1)
    hosts = [data.make_pipeline(cfg, 'train', 24, seed=1, process_index=h, process_count=3) for h in range(3)]
    for step in (0, 5, 187):  # 187 * 24 = 4488: this batch straddles epochs 0 and 1
        parts = [h.batch(step) for h in hosts]
        assert parts[0]['image'].shape[0] == 8
        for key in ('image', 'label'):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), single.batch(step)[key])


def test_global_batch_must_divide_by_hosts():
    with pytest.raises(ValueError, match='global_batch=10.*process_count=3'):
        data.make_pipeline(mnist_cfg(), 'train', 10, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match='process_index'):
        data.make_pipeline(mnist_cfg(), 'train', 12, seed=0, process_index=3, process_count=3)


def test_iterate_and_resume_mid_epoch():
    pipe = data.make_pipeline(mnist_cfg(), 'train', 16, seed=5)
    with pipe.iterate(0) as it:
        first = [next(it) for _ in range(8)]
    assert [s for s, _ in first] == list(range(8))
    # A "restarted" process: a new pipeline object, resuming at step 5.
    resumed = data.make_pipeline(mnist_cfg(), 'train', 16, seed=5)
    with resumed.iterate(5) as it:
        again = [next(it) for _ in range(3)]
    for (s, b), (s2, b2) in zip(first[5:], again):
        assert s == s2
        np.testing.assert_array_equal(b['image'], b2['image'])
        np.testing.assert_array_equal(b['image'], pipe.batch(s)['image'])


def test_iterate_without_prefetch_and_errors_propagate():
    pipe = data.make_pipeline(mnist_cfg(prefetch=0), 'train', 8, seed=0)
    it = pipe.iterate(3)
    assert next(it)[0] == 3
    eval_pipe = data.make_pipeline(mnist_cfg(), 'test', 100, seed=0, train=False)
    assert [s for s, _ in eval_pipe.iterate(0)] == list(range(5))
    with pytest.raises(IndexError):
        eval_pipe.batch(5)


def test_worker_processes_give_the_same_batches():
    pipe = data.make_pipeline(mnist_cfg(num_workers=1), 'train', 8, seed=2)
    with pipe.iterate(10) as it:
        got = [next(it) for _ in range(3)]
    assert [s for s, _ in got] == [10, 11, 12]
    for s, b in got:
        np.testing.assert_array_equal(b['image'], pipe.batch(s)['image'])


def test_eval_padding_valid_mask_and_identity_transform():
    cfg = mnist_cfg(image_size=28)
    pipe = data.make_pipeline(cfg, 'test', 96, seed=0, train=False)
    assert pipe.num_batches == 6  # ceil(500 / 96)
    last = pipe.batch(5)
    assert last['valid'].tolist() == [True] * (500 - 480) + [False] * 76
    np.testing.assert_array_equal(last['label'][20:40], pipe.batch(0)['label'][:20])  # wraps
    hosts = [
        data.make_pipeline(cfg, 'test', 96, seed=9, process_index=h, process_count=2, train=False) for h in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([h.batch(5)['valid'] for h in hosts]), last['valid'])
    # Native size, crop_pct 1: the eval transform is the identity, so x = (u8/255 - m)/s.
    raw = embedded.load_arrays('mnist')['test_image'][:96] / 255.0
    np.testing.assert_allclose(pipe.batch(0)['image'], (raw - 0.1315) / 0.3088, atol=1e-5)


def test_grey_to_rgb_and_rgb_to_grey():
    pipe = data.make_pipeline(mnist_cfg(channels=3), 'train', 4, seed=0)
    img = pipe.batch(0)['image']
    assert img.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    assert pipe.info.mean == (0.1315,) * 3
    cfg = mnist_cfg(name='skimage_crops', channels=1, image_size=32)
    pipe = data.make_pipeline(cfg, 'test', 8, seed=0, train=False)
    assert pipe.batch(0)['image'].shape == (8, 32, 32, 1)
    assert pipe.info.mean[0] == pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)


def test_skimage_crops():
    cfg = mnist_cfg(name='skimage_crops', channels=3, image_size=64)
    train = data.make_pipeline(cfg, 'train', 32, seed=0)
    test = data.make_pipeline(cfg, 'test', 32, seed=0, train=False)
    assert train.info.num_examples == 2240 and test.info.num_examples == 320
    assert train.info.num_classes == 10
    b = test.batch(0)
    assert b['image'].shape == (32, 64, 64, 3)
    # Natural crops normalised with ImageNet statistics: roughly zero mean, unit scale.
    assert abs(float(b['image'].mean())) < 1.0 and 0.3 < float(b['image'].std()) < 2.0


def test_digits_registered_only_with_sklearn():
    assert ('digits' in data.DATASETS) == embedded.sklearn_available()
    if not embedded.sklearn_available():
        pytest.skip('scikit-learn not installed')
    pipe = data.make_pipeline(mnist_cfg(name='digits', image_size=8), 'test', 60, seed=0, train=False)
    assert pipe.info.num_examples == 180 and pipe.info.num_classes == 10
    assert pipe.batch(0)['image'].shape == (60, 8, 8, 1)


def test_num_workers_auto_follows_cpu_affinity_and_leaves_the_trainer_a_core(monkeypatch):
    from cratemae.data import workers

    assert data.default_data_config().num_workers == 'auto'
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 3, 5, 7, 9})  # e.g. taskset
    assert workers.available_cores() == 5
    assert workers.auto_count(decodes=True) == 4
    assert workers.auto_count(decodes=True, cores=1) == 0
    assert workers.auto_count(decodes=True, cores=500) == workers.MAX_AUTO
    assert workers.auto_count(decodes=False) == 0  # in-memory arrays: nothing to decode
    assert data.make_pipeline(mnist_cfg(), 'train', 8, seed=0).num_workers == 0


def test_workers_that_do_not_fit_shared_memory_are_lowered_with_a_message(caplog):
    from cratemae.data import workers

    mb = 1 << 20
    assert workers.fit_shm(4, batch_bytes=10 * mb, buffer=2, free=1000 * mb) == 4
    with caplog.at_level('WARNING'):
        got = workers.fit_shm(8, batch_bytes=10 * mb, buffer=2, free=100 * mb)
    assert got == 1  # 100 MB * 0.5 // (3 batches * 10 MB)
    assert 'only 0.10 GB is free; using 1 worker(s)' in caplog.text and '--shm-size' in caplog.text
    caplog.clear()
    with caplog.at_level('WARNING'):
        assert workers.resolve(3, True, batch_bytes=600 * mb, buffer=2, free=1000 * mb) == 0
    assert 'batches made in this process' in caplog.text
    assert workers.resolve('auto', True, batch_bytes=mb, buffer=2, cores=3, free=None) == 2


@pytest.mark.parametrize('value', ['many', -1, 1.5])
def test_num_workers_must_be_auto_or_a_count(value):
    cfg = data.default_data_config()
    cfg.num_workers = value
    with pytest.raises(ValueError, match="num_workers.*'auto' or an int"):
        data.validate_data_config(cfg)


def test_a_data_config_read_back_from_json_takes_a_worker_count_again():
    import json

    import ml_collections

    stored = json.loads(json.dumps(data.default_data_config().to_dict()))  # as a checkpoint keeps it
    plain = ml_collections.ConfigDict(stored)
    with pytest.raises(TypeError):
        plain.num_workers = 0  # locked to str by 'auto'
    cfg = data.data_config_from(stored)
    cfg.num_workers = 0
    cfg.num_workers = 'auto'
    data.validate_data_config(cfg)
