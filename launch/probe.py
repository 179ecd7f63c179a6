"""Linear probe, ridge probe and kNN accuracy of a frozen encoder.

    python -m launch.probe --checkpoint PATH [--dataset NAME] [--feature cls|mean|pixels] [--out DIR]

PATH is a training workdir, an export of ours, or a reference-format file (then also --config=FILE:NAME or
--model NAME for the architecture). The dataset defaults to the one the checkpoint was trained on. Features (the
class token or the mean patch token after the final norm; 'pixels' probes the images themselves) are computed once
per checkpoint, dataset, split and feature type and cached (--cache_dir). --random_init probes a randomly initialised
encoder of the checkpoint's architecture instead of its weights: the baseline pretraining must beat. Results go to
DIR/probe_<dataset>_<feature>[_random].json and a table on the terminal. See docs/evaluation.md.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import sys
import time

from cratemae import data
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser():
    p = argparse.ArgumentParser(prog='python -m launch.probe', description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True, help='training workdir, export, or reference-format file')
    p.add_argument('--step', type=int, default=None, help='workdir step (default: the newest that restores)')
    p.add_argument('--config', default=None, help='FILE:NAME (e.g. experiments/registry.py:crate_mae_base): the '
                   'architecture of a reference-format checkpoint without our metadata')
    p.add_argument('--model', default=None, help='registry NAME, the same as --config=experiments/registry.py:NAME')
    p.add_argument('--trust_checkpoint', '--trust-checkpoint', action='store_true',
                   help='read a .pth without torch.load\'s weights_only guard (runs code from the file; only for '
                        'files you trust)')
    p.add_argument('--dataset', default=None, help='dataset name (default: the checkpoint\'s training data)')
    p.add_argument('--data_dir', '--data-dir', default=None, help='tfds data dir')
    p.add_argument('--split_train', '--split-train', default=None,
                   help="split the probe trains on (default: the checkpoint's, else train)")
    p.add_argument('--split_eval', '--split-eval', default=None,
                   help="split it is tested on (default: the checkpoint's, else auto: validation/val/test)")
    p.add_argument('--feature', default='cls', choices=features.FEATURES)
    p.add_argument('--methods', default='linear,ridge,knn', help=f'comma-separated subset of {probe.METHODS}')
    p.add_argument('--out', default=None, help='results folder (default: beside the checkpoint)')
    p.add_argument('--cache_dir', '--cache-dir', default=None,
                   help=f'feature cache (default {features.default_cache_dir()})')
    p.add_argument('--no_cache', '--no-cache', action='store_true',
                   help='recompute features and do not write the cache')
    p.add_argument('--batch_size', '--batch-size', type=int, default=256,
                   help='feature extraction batch (split over devices)')
    p.add_argument('--random_init', '--random-init', action='store_true',
                   help='probe a random encoder of the same architecture')
    p.add_argument('--seed', type=int, default=0, help='seed of --random_init and of the probe head')
    g = p.add_argument_group('linear probe (MAE protocol: BN without affine + linear head)')
    d = probe.LinearProbeConfig()
    g.add_argument('--optimizer', default=d.optimizer, choices=probe.OPTIMIZERS)
    g.add_argument('--base_lr', '--base-lr', type=float, default=d.base_lr, help='lr = base_lr * batch / 256')
    g.add_argument('--weight_decay', '--weight-decay', type=float, default=d.weight_decay)
    g.add_argument('--epochs', type=int, default=d.epochs)
    g.add_argument('--warmup_epochs', '--warmup-epochs', type=int, default=d.warmup_epochs)
    g.add_argument('--probe_batch_size', '--probe-batch-size', type=int, default=d.batch_size)
    g = p.add_argument_group('kNN (cosine similarity)')
    g.add_argument('--k', type=int, default=20)
    g.add_argument('--temperature', type=float, default=0.07, help='weighted vote: exp(similarity / T)')
    g.add_argument('--vote', default='weighted', choices=('weighted', 'majority'))
    return p


def _config_from_file(spec):
    """FILE:NAME -> the module's get_config(NAME) (what ml_collections' config_flags does)."""
    path, _, name = spec.partition(':')
    path = path if os.path.isabs(path) or os.path.exists(path) else os.path.join(_REPO, path)
    if not os.path.isfile(path):
        raise SystemExit(f'error: --config file {path} not found.')
    module_spec = importlib.util.spec_from_file_location('_probe_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(name) if name else module.get_config()


def named_config(args):
    """The experiment config named by --config / --model (its model section is the architecture), or None."""
    if args.config and args.model:
        raise SystemExit('error: pass --config or --model, not both.')
    if args.model:
        import experiments  # pylint: disable=import-outside-toplevel

        return experiments.get_config(args.model)
    return _config_from_file(args.config) if args.config else None


def default_out(path):
    path = os.path.normpath(path)
    if checkpoints.is_workdir(path):
        return os.path.join(path, 'probe')
    return os.path.splitext(path)[0] + '_probe'


def _table(results, header):
    rows = [('method', 'top-1 (%)', 'details')]
    for method, r in results.items():
        details = {k: v for k, v in r.items() if k not in ('top1', 'config')}
        rows.append((method, f'{100 * r["top1"]:.2f}', ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                                                                   for k, v in details.items())))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [header] + ['  '.join(cell.ljust(w) for cell, w in zip(row, width)).rstrip() for row in rows]
    return '\n'.join(lines)


def run(args):
    """Loads, extracts (or reads cached) features, probes; returns the results record."""
    methods = tuple(m.strip() for m in args.methods.split(',') if m.strip())
    config = named_config(args)
    ckpt = checkpoints.load(args.checkpoint, step=args.step, model_config=config and config.model, encoder_only=True,
                            trust_checkpoint=args.trust_checkpoint)
    if ckpt.data_config is None and config is not None:  # a reference file: default to the named config's data
        ckpt = dataclasses.replace(ckpt, data_config=config.data)
    data_cfg = features.probe_data_config(ckpt, args.dataset, args.data_dir, args.split_train, args.split_eval)
    weights = ckpt
    if args.random_init:
        weights = checkpoints.random_init(ckpt.model_config, args.seed)
        weights = dataclasses.replace(weights, data_config=ckpt.data_config)
    kwargs = {'batch_size': args.batch_size, 'cache_dir': args.cache_dir, 'use_cache': not args.no_cache}
    t0 = time.perf_counter()
    train = features.split_features(weights, data_cfg, data_cfg.split_train, args.feature, **kwargs)
    test = features.split_features(weights, data_cfg, data_cfg.split_eval, args.feature, **kwargs)
    t_features = time.perf_counter() - t0
    linear_cfg = probe.LinearProbeConfig(args.optimizer, args.base_lr, args.weight_decay, 0.9, args.epochs,
                                         args.warmup_epochs, args.probe_batch_size, args.seed)
    results = probe.run_probes(train, test, methods, linear_cfg,
                               {'k': args.k, 'temperature': args.temperature, 'vote': args.vote})
    return {
        'checkpoint': os.path.abspath(args.checkpoint), 'source': ckpt.source, 'step': ckpt.step,
        'weights': 'random_init' if args.random_init else 'checkpoint', 'dataset': data_cfg.name,
        'splits': [data_cfg.split_train, data_cfg.split_eval], 'feature': args.feature,
        'num_train': len(train.y), 'num_test': len(test.y), 'feature_dim': int(train.x.shape[1]),
        'features_cached': bool(train.cached and test.cached), 'feature_seconds': round(t_features, 2),
        'results': results, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
        'command': 'python -m launch.probe ' + ' '.join(sys.argv[1:]),
    }


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    try:
        record = run(args)
    except (checkpoints.CheckpointError, data.DatasetNotPreparedError, ValueError) as e:
        raise SystemExit(f'error: {e}') from None
    out = args.out or default_out(args.checkpoint)
    os.makedirs(out, exist_ok=True)
    name = f'probe_{record["dataset"]}_{record["feature"]}{"_random" if args.random_init else ""}.json'
    with open(os.path.join(out, name), 'w') as f:
        json.dump(record, f, indent=2)
    cached = ', cached features' if record['features_cached'] else ''
    header = (f'{record["weights"]} of {args.checkpoint} (step {record["step"]}), {record["dataset"]} '
              f'{"/".join(record["splits"])}, feature {record["feature"]} ({record["feature_dim"]}-d, '
              f'{record["num_train"]} train / {record["num_test"]} test{cached})')
    print(_table(record['results'], header))
    print(f'Results: {os.path.join(out, name)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
