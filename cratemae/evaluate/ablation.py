"""One row per finished pretraining run, and the tables a family of runs makes (``python -m launch.sweep``).

reconstruction   the held-out masked-reconstruction loss at the last evaluation (lower is better)
ridge, knn       top-1 accuracy of a closed-form ridge probe and of a weighted kNN on class-token features
compression      R^c of the last encoder layer's output against its own subspaces (lower = more compressed)
sparsity         fraction of exact zeros in the last ISTA output
"""

import csv
import math
import os

import jax
import matplotlib

from cratemae import data
from cratemae import diagnostics
from cratemae import metrics
from cratemae import models
from cratemae import sharding
from cratemae.data import device
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402

MEASURES = ('reconstruction', 'ridge', 'knn', 'compression', 'sparsity')


def last_eval_loss(workdir) -> float:
    losses = [r['eval/reconstruction_loss'] for r in metrics.read_scalars(workdir) if 'eval/reconstruction_loss' in r]
    return losses[-1] if losses else math.nan


def last_layer_measures(model, params, batch):
    """(R^c, fraction of zeros) of the last encoder layer's output; NaN for ViT encoders, which have neither
    subspaces nor an ISTA step to measure."""
    if model.encoder_block != 'crate':
        return math.nan, math.nan
    measures = diagnostics.whitebox_measures(model, params, batch['image'], batch['valid'])
    return float(measures['compression_output'][-1]), float(measures['sparsity_zeros'][-1])


def evaluate_run(workdir) -> dict:
    """The MEASURES of one finished run (its newest checkpoint that restores, on its own data)."""
    ckpt = checkpoints.load(workdir, encoder_only=False)
    data_cfg, dataset, _ = features.probe_data_config(ckpt)
    train_feats = features.split_features(ckpt, data_cfg, data_cfg.split_train, 'cls', dataset=dataset)
    test_feats = features.split_features(ckpt, data_cfg, data_cfg.split_eval, 'cls', dataset=dataset)
    probes = probe.run_probes(train_feats, test_feats, methods=('ridge', 'knn'))
    pipe = data.make_pipeline(
        data_cfg, split=data_cfg.split_eval, global_batch=64, seed=0, train=False, uint8=True, dataset=dataset
    )
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    ((_, batch),) = device.eval_batches(pipe, mesh, count=1)  # made by the pipeline's workers, uint8 to the device
    batch = {'image': device.normalize(batch['image'], pipe.info.mean, pipe.info.std), 'valid': batch['valid']}
    compression, sparsity = last_layer_measures(models.build(ckpt.model_config), ckpt.params, batch)
    return {
        'reconstruction': last_eval_loss(workdir),
        'ridge': probes['ridge']['top1'],
        'knn': probes['knn']['top1'],
        'compression': compression,
        'sparsity': sparsity,
    }


def write_tables(rows, stem):
    """<stem>.csv, <stem>.md and <stem>.png (one bar chart per measure; the first row, the base, in grey)."""
    columns = list(rows[0])
    os.makedirs(os.path.dirname(stem) or '.', exist_ok=True)
    with open(stem + '.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f'{v:,}' if isinstance(v, int) else f'{v:.4f}' if isinstance(v, float) else str(v)  # noqa: E731
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(fmt(row[c]) for c in columns) + ' |' for row in rows]
    with open(stem + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.2 * len(MEASURES), 3.2), constrained_layout=True)
    labels = [
        'base' if row.get('changes') == 'base' else str(row.get('name', i)).split('_')[-1] for i, row in enumerate(rows)
    ]
    for ax, column in zip(axes, MEASURES):
        ax.bar(range(len(rows)), [row[column] for row in rows], color=['#888'] + ['#3a7'] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha='right', fontsize=8)
        ax.set_title(column, fontsize=9)
    fig.savefig(stem + '.png', dpi=80)
    plt.close(fig)
