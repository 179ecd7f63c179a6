"""Linear probe, ridge probe and kNN accuracy of a frozen encoder.

  python -m launch.probe --checkpoint=PATH [--dataset=NAME] [--feature=cls|mean|pixels] [--out=DIR]

PATH is a training workdir, an export of ours, or a reference-format file (then also --config=NAME or FILE:NAME for
the architecture). The dataset defaults to the one the checkpoint was trained on. Features (the class token or the
mean patch token after the final norm; 'pixels' probes the images themselves) are computed once per checkpoint,
dataset, split and feature type and cached (--cache_dir). --random_init probes a randomly initialised encoder of the
checkpoint's architecture instead of its weights: the baseline pretraining must beat. Results go to
DIR/probe_<dataset>_<feature>[_random].json and a table on the terminal. See docs/evaluation.md.
"""

import dataclasses
import datetime
import json
import logging
import os
import sys
import time

from absl import flags

from cratemae import data
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe
from launch import cli

FLAGS = cli.flag_values()
_D = probe.LinearProbeConfig()
flags.DEFINE_string('checkpoint', None, 'Training workdir, export, or reference-format file.', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Workdir step (default: the newest that restores).', flag_values=FLAGS)
cli.define_config(FLAGS, help_text='The architecture (NAME or FILE:NAME) of a reference-format checkpoint.')
flags.DEFINE_bool(
    'trust_checkpoint',
    False,
    "Read a .pth without torch.load's weights_only guard (runs code from the file; only for files you trust).",
    flag_values=FLAGS,
)
flags.DEFINE_string('dataset', None, "Dataset name (default: the checkpoint's training data).", flag_values=FLAGS)
flags.DEFINE_string('data_dir', None, 'tfds data dir.', flag_values=FLAGS)
flags.DEFINE_string(
    'split_train', None, "Split the probe trains on (default: the checkpoint's, else train).", flag_values=FLAGS
)
flags.DEFINE_string(
    'split_eval',
    None,
    "Split it is tested on (default: the checkpoint's, else auto: validation, val or test).",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    'holdout',
    None,
    'Hold out the last PCT%% of the train split (a fixed shuffle of an image folder) and test on it: '
    'split_train=S[:100-PCT%%], split_eval=S[100-PCT%%:]. For data without a held-out split.',
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    'eval_on_train',
    False,
    'Report the accuracy even when the test split shares images with the train split (named as such).',
    flag_values=FLAGS,
)
flags.DEFINE_enum('feature', 'cls', list(features.FEATURES), 'What to probe.', flag_values=FLAGS)
flags.DEFINE_list('methods', ['linear', 'ridge', 'knn'], f'Subset of {probe.METHODS}.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Results folder (default: beside the checkpoint).', flag_values=FLAGS)
flags.DEFINE_string('cache_dir', None, f'Feature cache (default {features.default_cache_dir()}).', flag_values=FLAGS)
flags.DEFINE_bool('no_cache', False, 'Recompute features and do not write the cache.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 256, 'Feature extraction batch (split over devices).', flag_values=FLAGS)
flags.DEFINE_bool('random_init', False, 'Probe a random encoder of the same architecture.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed of --random_init and of the probe head.', flag_values=FLAGS)
# The linear probe (MAE protocol: BN without affine + linear head) and kNN (cosine similarity).
flags.DEFINE_enum('optimizer', _D.optimizer, list(probe.OPTIMIZERS), 'Linear probe optimizer.', flag_values=FLAGS)
flags.DEFINE_float('base_lr', _D.base_lr, 'Linear probe: lr = base_lr * batch / 256.', flag_values=FLAGS)
flags.DEFINE_float('weight_decay', _D.weight_decay, 'Linear probe weight decay.', flag_values=FLAGS)
flags.DEFINE_integer('epochs', _D.epochs, 'Linear probe epochs.', flag_values=FLAGS)
flags.DEFINE_integer('warmup_epochs', _D.warmup_epochs, 'Linear probe warmup epochs.', flag_values=FLAGS)
flags.DEFINE_integer('probe_batch_size', _D.batch_size, 'Linear probe batch.', flag_values=FLAGS)
flags.DEFINE_integer('k', 20, 'kNN neighbours.', flag_values=FLAGS)
flags.DEFINE_float('temperature', 0.07, 'kNN weighted vote: exp(similarity / T).', flag_values=FLAGS)
flags.DEFINE_enum('vote', 'weighted', ['weighted', 'majority'], 'kNN vote.', flag_values=FLAGS)


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


def run(f):
    """Loads, extracts (or reads cached) features, probes; returns the results record."""
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
    data_cfg, splits_note = features.probe_data_config(
        ckpt, f.dataset, f.data_dir, f.split_train, f.split_eval, holdout=f.holdout, eval_on_train=f.eval_on_train
    )
    print(f'Probe splits: {splits_note}.', flush=True)
    weights = ckpt
    if f.random_init:
        weights = dataclasses.replace(checkpoints.random_init(ckpt.model_config, f.seed), data_config=ckpt.data_config)
    kwargs = {'batch_size': f.batch_size, 'cache_dir': f.cache_dir, 'use_cache': not f.no_cache}
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
        'features_computed_at': [train.computed_at, test.computed_at],
        'feature_seconds': round(t_features, 2),
        'results': results,
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': 'python -m launch.probe ' + ' '.join(sys.argv[1:]),
    }


def main(argv):
    cli.no_positional(argv)
    if not FLAGS.checkpoint:
        raise cli.UsageError('--checkpoint is required (a training workdir, an export, or a reference-format file).')
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    try:
        record = run(FLAGS)
    except (checkpoints.CheckpointError, data.DatasetNotPreparedError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    out = FLAGS.out or default_out(FLAGS.checkpoint)
    os.makedirs(out, exist_ok=True)
    name = f'probe_{record["dataset"]}_{record["feature"]}{"_random" if FLAGS.random_init else ""}.json'
    with open(os.path.join(out, name), 'w') as f:
        json.dump(record, f, indent=2)
    cached = f', cached features computed {min(record["features_computed_at"])}' if record['features_cached'] else ''
    header = (
        f'{record["weights"]} of {FLAGS.checkpoint} (step {record["step"]}), {record["dataset"]} '
        f'{"/".join(record["splits"])}, feature {record["feature"]} ({record["feature_dim"]}-d, '
        f'{record["num_train"]} train / {record["num_test"]} test{cached})'
    )
    print(_table(record['results'], header))
    print(f'Results: {os.path.join(out, name)}')


if __name__ == '__main__':
    cli.main(main, FLAGS)
