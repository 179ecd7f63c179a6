"""Linear probe, ridge probe and kNN accuracy of a frozen encoder.

  python -m launch.probe --checkpoint=PATH [--dataset=NAME] [--feature=cls|mean|pixels] [--out=DIR]

PATH is a training workdir, an export of ours, or a reference-format file (then also --config=NAME or FILE:NAME for
the architecture). The dataset defaults to the one the checkpoint was trained on. Features (the class token or the
mean patch token after the final norm; 'pixels' probes the images themselves) are computed once per checkpoint,
dataset, split and feature type and cached (--cache_dir). --random_init probes a randomly initialised encoder of the
checkpoint's architecture instead of its weights: the baseline pretraining must beat. Results go to
DIR/probe_<dataset>_<feature>[_random].json and a table on the terminal. See docs/evaluation.md.
"""

import logging
import sys

from absl import flags

from cratemae import data
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe
from cratemae.evaluate import probe_command
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


def main(argv):
    cli.no_positional(argv)
    if not FLAGS.checkpoint:
        raise cli.UsageError('--checkpoint is required (a training workdir, an export, or a reference-format file).')
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    try:
        record = probe_command.probe_checkpoint(FLAGS, 'python -m launch.probe ' + ' '.join(sys.argv[1:]))
    except (checkpoints.CheckpointError, data.DatasetNotPreparedError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    path = probe_command.write_record(record, FLAGS.out or probe_command.default_out(FLAGS.checkpoint))
    print(probe_command.table(record))
    print(f'Results: {path}')


if __name__ == '__main__':
    cli.main(main, FLAGS)
