"""Probes with known answers: ~100% on linearly separable clusters, chance on random labels; the feature cache."""

import ml_collections
import numpy as np
import pytest

from cratemae import data
from cratemae.evaluate import features
from cratemae.evaluate import knn
from cratemae.evaluate import probe

NUM_CLASSES = 5


def _clusters(n, dim=16, spread=0.3, seed=0, random_labels=False):
    """n points around NUM_CLASSES well separated centres (distance ~ 4 sqrt(2) vs noise spread 0.3 per dim)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(NUM_CLASSES, dim)) * 4.0
    y = rng.integers(0, NUM_CLASSES, n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    if random_labels:
        y = rng.integers(0, NUM_CLASSES, n)
    return features.Features(x.astype(np.float32), y.astype(np.int32), NUM_CLASSES)


@pytest.fixture(scope='module')
def separable():
    return _clusters(1000, seed=0), _clusters(400, seed=1)


FAST = probe.LinearProbeConfig(optimizer='sgd', base_lr=0.1, epochs=20, warmup_epochs=2)


def test_all_probes_solve_separable_clusters(separable):
    train, test = separable
    results = probe.run_probes(train, test, linear_cfg=FAST)
    for method in probe.METHODS:
        assert results[method]['top1'] >= 0.99, (method, results[method])


@pytest.mark.parametrize('optimizer,base_lr,batch', [('lars', 50.0, 16), ('adamw', 1e-3, 256)])
def test_linear_probe_optimizers(separable, optimizer, base_lr, batch):
    # LARS moves each weight matrix by at most lr * 0.001 * |W| per step: it needs many steps at a large rate.
    train, test = separable
    cfg = probe.LinearProbeConfig(optimizer=optimizer, base_lr=base_lr, epochs=20, warmup_epochs=1, batch_size=batch)
    assert probe.linear_probe(train.x, train.y, test.x, test.y, NUM_CLASSES, cfg)['top1'] >= 0.99


def test_random_labels_give_chance():
    train = _clusters(1000, seed=2, random_labels=True)
    test = _clusters(1000, seed=3, random_labels=True)
    results = probe.run_probes(train, test, linear_cfg=FAST)
    for method in probe.METHODS:
        assert abs(results[method]['top1'] - 1 / NUM_CLASSES) < 0.07, (method, results[method])


def test_knn_votes_weighted_and_majority():
    # Query at 0 deg; neighbours: one of class 0 at 10 deg, two of class 1 at 60 and 70 deg.
    angles = np.deg2rad([10, 60, 70])
    train_x = np.stack([np.cos(angles), np.sin(angles)], 1)
    train_y = np.array([0, 1, 1])
    query = np.array([[1.0, 0.0]])
    assert knn.knn_predict(train_x, train_y, query, 2, k=3, vote='majority')[0] == 1
    # exp(cos 10 / 0.07) = 1.3e6 outweighs exp(cos 60 / 0.07) + exp(cos 70 / 0.07) = 1.3e3 + 1.3e2.
    assert knn.knn_predict(train_x, train_y, query, 2, k=3, vote='weighted')[0] == 0
    assert knn.knn_predict(train_x, train_y, query, 2, k=1)[0] == 0
    assert knn.knn_predict(train_x, train_y, query, 2, k=50, vote='majority')[0] == 1  # k clipped to 3


def test_ridge_chooses_lambda_on_holdout_and_reports_it(separable):
    train, test = separable
    result = probe.ridge_probe(train.x, train.y, test.x, test.y, NUM_CLASSES)
    assert result['holdout_top1'] >= 0.99 and result['lambda'] > 0


def test_bad_probe_arguments_are_named():
    train = _clusters(50)
    with pytest.raises(ValueError, match='adam'):
        probe.make_optimizer(probe.LinearProbeConfig(optimizer='adam'), 10, 32)
    with pytest.raises(ValueError, match='svm'):
        probe.run_probes(train, train, methods=('svm',))
    with pytest.raises(ValueError, match='vote'):
        knn.knn_predict(train.x, train.y, train.x, NUM_CLASSES, vote='soft')


def test_feature_cache_key_follows_the_resize():
    cfg = data.default_data_config()
    before = cfg.to_dict()
    before.pop('resize')  # a config from before data.resize existed
    before = ml_collections.ConfigDict(before)
    key = features.cache_key(None, cfg, 'test', 'pixels')
    assert key == features.cache_key(None, before, 'test', 'pixels')
    cfg.resize = 'torch'
    assert features.cache_key(None, cfg, 'test', 'pixels') != key
