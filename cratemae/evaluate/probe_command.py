"""The probe command's work as a library function: load weights, get the features of both splits (cached or not),
run the probes, and the record and table that ``python -m launch.probe`` writes and prints."""

import dataclasses
import datetime
import json
import os
import time

from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe


def default_out(path):
    path = os.path.normpath(path)
    return os.path.join(path, 'probe') if checkpoints.is_workdir(path) else os.path.splitext(path)[0] + '_probe'


def _table(results, header):
    rows = [('method', 'top-1 (%)', 'details')]
    for method, r in results.items():
        details = {k: v for k, v in r.items() if k not in ('top1', 'config')}
        rows.append(
            (
                method,
                f'{100 * r["top1"]:.2f}',
                ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in details.items()),
            )
        )
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return '\n'.join([header] + ['  '.join(c.ljust(w) for c, w in zip(row, width)).rstrip() for row in rows])


def probe_checkpoint(f, command=''):
    """Loads, extracts (or reads cached) features, probes; returns the results record. ``f`` carries the options of
    ``launch.probe`` as attributes (its parsed flags); ``command`` is recorded as the command line."""
    config = f.config
    ckpt = checkpoints.load(
        f.checkpoint,
        step=f.step,
        model_config=config and config.model,
        encoder_only=True,
        trust_checkpoint=f.trust_checkpoint,
    )
    if ckpt.data_config is None and config is not None:  # a reference file: default to the named config's data
        ckpt = dataclasses.replace(ckpt, data_config=config.data)
    data_cfg, dataset, splits_note = features.probe_data_config(
        ckpt, f.dataset, f.data_dir, f.split_train, f.split_eval, holdout=f.holdout, eval_on_train=f.eval_on_train
    )
    weights = ckpt
    if f.random_init:
        weights = dataclasses.replace(checkpoints.random_init(ckpt.model_config, f.seed), data_config=ckpt.data_config)
    kwargs = {'dataset': dataset, 'batch_size': f.batch_size, 'cache_dir': f.cache_dir, 'use_cache': not f.no_cache}
    t0 = time.perf_counter()
    train = features.split_features(weights, data_cfg, data_cfg.split_train, f.feature, **kwargs)
    test = features.split_features(weights, data_cfg, data_cfg.split_eval, f.feature, **kwargs)
    t_features = time.perf_counter() - t0
    linear_cfg = probe.LinearProbeConfig(
        f.optimizer, f.base_lr, f.weight_decay, 0.9, f.epochs, f.warmup_epochs, f.probe_batch_size, f.seed
    )
    results = probe.run_probes(
        train, test, tuple(f.methods), linear_cfg, {'k': f.k, 'temperature': f.temperature, 'vote': f.vote}
    )
    return {
        'checkpoint': os.path.abspath(f.checkpoint),
        'source': ckpt.source,
        'step': ckpt.step,
        'weights': 'random_init' if f.random_init else 'checkpoint',
        'dataset': data_cfg.name,
        'splits': [data_cfg.split_train, data_cfg.split_eval],
        'splits_note': splits_note,
        'feature': f.feature,
        'num_train': len(train.y),
        'num_test': len(test.y),
        'feature_dim': int(train.x.shape[1]),
        'features_cached': bool(train.cached and test.cached),
        'features_cached_per_split': [train.cached, test.cached],
        'features_computed_at': [train.computed_at, test.computed_at],
        'feature_seconds': round(t_features, 2),
        'results': results,
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': command,
    }


def table(record):
    """The terminal table of a record, with a header saying what was probed on which splits, and for each split
    whether its features came from the cache and when they were computed."""
    cached = [
        f'{split}: cached features computed {when}'
        for split, when, hit in zip(
            ('train', 'test'), record['features_computed_at'], record['features_cached_per_split']
        )
        if hit
    ]
    header = (
        f'{record["weights"]} of {record["checkpoint"]} (step {record["step"]}), {record["dataset"]} '
        f'{"/".join(record["splits"])}, feature {record["feature"]} ({record["feature_dim"]}-d, '
        f'{record["num_train"]} train / {record["num_test"]} test{"; " + "; ".join(cached) if cached else ""})'
    )
    return f'Splits: {record["splits_note"]}.\n' + _table(record['results'], header)


def write_record(record, out):
    """Writes the record as ``out/probe_<dataset>_<feature>[_random].json``; returns the path."""
    os.makedirs(out, exist_ok=True)
    random = '_random' if record['weights'] == 'random_init' else ''
    path = os.path.join(out, f'probe_{record["dataset"]}_{record["feature"]}{random}.json')
    with open(path, 'w') as f:
        json.dump(record, f, indent=2)
    return path
