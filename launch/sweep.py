"""Run a family of registered experiments one after another, evaluate each, and tabulate the results.

  python -m launch.sweep 'mnist_ablate_mask_*' [--steps 600] [--dataset mnist] [--out runs/sweeps]

For every registry name matching the pattern (fnmatch), plus the base entry the family overrides, it trains into
<out>/<name> (resumable: a finished entry is not rerun, an interrupted one continues), then measures

  reconstruction   the held-out masked-reconstruction loss at the end of training (lower is better)
  ridge, knn       top-1 accuracy of a closed-form ridge probe and of a weighted kNN on class-token features
  compression      R^c of the last encoder layer's output against its own subspaces (lower = more compressed)
  sparsity         fraction of exact zeros in the last ISTA output

and writes <out>/<pattern>.md, .csv and .png. docs/ablations.md is made of those tables.
"""
import csv
import fnmatch
import json
import logging
import os

import matplotlib
from absl import app
from absl import flags

import experiments
from cratemae import data
from cratemae import diagnostics
from cratemae import models
from cratemae import train
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe
from experiments import registry

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402

_STEPS = flags.DEFINE_integer('steps', None, 'Override train.steps of every entry (short CPU schedules).')
_DATASET = flags.DEFINE_string('dataset', None, 'Override data.name of every entry.')
_OUT = flags.DEFINE_string('out', 'runs/sweeps', 'Where the runs and the result tables go.')
_NO_BASE = flags.DEFINE_bool('no_base', False, 'Do not add the base entry of the family to the sweep.')

COLUMNS = ('name', 'changes', 'params', 'steps', 'reconstruction', 'ridge', 'knn', 'compression', 'sparsity')


def sweep_names(pattern, include_base=True):
    """The matching registry names, bases first (a family is read against its base)."""
    names = [n for n in experiments.names() if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise ValueError(f'No registered experiment matches {pattern!r}; `python -m launch.list` shows the names.')
    bases = []
    if include_base:
        for name in names:
            try:
                base, _ = registry.declared_overrides(name)
            except ValueError:
                continue
            if base not in names and base not in bases:
                bases.append(base)
    return bases + names


def sweep_config(name, steps=None, dataset=None):
    config = experiments.get_config(name)
    if steps is not None:
        config.train.steps = steps
        config.train.eval_every = steps
        config.checkpoint.every = steps
    if dataset is not None:
        config.data.name = dataset
    return config


def _changes(name):
    try:
        _, overrides = registry.declared_overrides(name)
    except ValueError:
        return 'base'
    return ', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))


def _last_eval_loss(workdir):
    losses = [json.loads(line).get('eval/reconstruction_loss') for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else float('nan')


def last_layer_measures(model, params, batch):
    """(R^c, fraction of zeros) of the last encoder layer's output; NaN for ViT encoders, which have neither
    subspaces nor an ISTA step to measure."""
    if model.encoder_block != 'crate':
        return float('nan'), float('nan')
    measures = diagnostics.whitebox_measures(model, params, batch['image'], batch['valid'])
    return float(measures['compression_after'][-1]), float(measures['sparsity_zeros'][-1])


def evaluate_run(name, config, workdir):
    """The row of the results table for one finished run."""
    ckpt = checkpoints.load(workdir, encoder_only=False)
    data_cfg = features.probe_data_config(ckpt)
    train_feats = features.split_features(ckpt, data_cfg, data_cfg.split_train, 'cls')
    test_feats = features.split_features(ckpt, data_cfg, data_cfg.split_eval, 'cls')
    probes = probe.run_probes(train_feats, test_feats, methods=('ridge', 'knn'))
    model = models.build(ckpt.model_config)
    pipe = data.make_pipeline(data_cfg, split=data_cfg.split_eval, global_batch=64, seed=0, train=False)
    batch = pipe.batch(0)
    compression, sparsity = last_layer_measures(model, ckpt.params, batch)
    return {
        'name': name, 'changes': _changes(name), 'params': models.count_params(config.model),
        'steps': config.train.steps, 'reconstruction': _last_eval_loss(workdir),
        'ridge': probes['ridge']['top1'], 'knn': probes['knn']['top1'],
        'compression': compression, 'sparsity': sparsity,
    }


def write_tables(rows, stem):
    """<stem>.csv, <stem>.md and <stem>.png (one bar chart per measured column)."""
    os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
    with open(stem + '.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f'{v:,}' if isinstance(v, int) else f'{v:.4f}' if isinstance(v, float) else str(v)  # noqa: E731
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(fmt(row[c]) for c in COLUMNS) + ' |' for row in rows]
    with open(stem + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    measured = COLUMNS[4:]
    fig, axes = plt.subplots(1, len(measured), figsize=(3.2 * len(measured), 3.2), constrained_layout=True)
    labels = [row['name'].split('_')[-1] if row['changes'] != 'base' else 'base' for row in rows]
    for ax, column in zip(axes, measured):
        ax.bar(range(len(rows)), [row[column] for row in rows], color=['#888'] + ['#3a7'] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha='right', fontsize=8)
        ax.set_title(column, fontsize=9)
    fig.savefig(stem + '.png', dpi=80)
    plt.close(fig)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError('Usage: python -m launch.sweep NAME_PATTERN [--steps S] [--dataset D] [--out DIR]')
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    pattern = argv[1]
    rows = []
    for name in sweep_names(pattern, include_base=not _NO_BASE.value):
        config = sweep_config(name, _STEPS.value, _DATASET.value)
        workdir = os.path.join(_OUT.value, name)
        print(f'== {name}: {_changes(name)} -> {workdir}', flush=True)
        train.train_and_evaluate(config, workdir)
        rows.append(evaluate_run(name, config, workdir))
        print(json.dumps(rows[-1]), flush=True)
    stem = os.path.join(_OUT.value, pattern.replace('*', 'all').replace('?', '_'))
    write_tables(rows, stem)
    print(open(stem + '.md').read())
    print(f'Wrote {stem}.md, .csv and .png')


if __name__ == '__main__':
    app.run(main)
