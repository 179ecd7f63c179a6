"""Fine-tune a pretrained encoder with a classification head.

  python -m launch.finetune --checkpoint=PATH --config=NAME [--workdir=DIR] [--split_train=S] [--split_eval=S]
                            [--config.KEY=VALUE ...]

PATH is a pretraining workdir, an export (safetensors / npz / orbax) or a reference-format file; NAME a fine-tuning
entry (experiments/downstream.py, e.g. finetune_mnist, finetune_cifar10). Rerunning the same command resumes from
the newest good checkpoint in the workdir. Reports top-1 accuracy on the eval split (also in
DIR/finetune_results.json).
"""

if __name__ == '__main__':  # before jax is imported: glibc reads its tunables at start-up (cratemae/platform.py)
    from cratemae import platform as _platform

    _platform.reexec_with_cpu_tunables()

import json
import logging
import os

from absl import flags

from cratemae import data
from cratemae.evaluate import checkpoints
from cratemae.train import finetune
from launch import cli

FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS, help_text='A fine-tuning entry (finetune_*), then --config.KEY=VALUE overrides.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Pretrained workdir or weights file.', flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints and metrics (default runs/NAME).', flag_values=FLAGS)
_SPLIT_TRAIN = flags.DEFINE_string(
    'split_train', None, 'Split to fine-tune on (= --config.data.split_train).', flag_values=FLAGS
)
_SPLIT_EVAL = flags.DEFINE_string(
    'split_eval',
    None,
    'Split to evaluate on (= --config.data.split_eval; auto: validation, val or test, whichever the data has).',
    flag_values=FLAGS,
)
_HOLDOUT = flags.DEFINE_integer(
    'holdout',
    None,
    'Evaluate on the last PCT%% of the train split (a fixed shuffle of an image folder) and train on the rest; '
    'for data without a held-out split (= --config.finetune.holdout).',
    flag_values=FLAGS,
)
_EVAL_ON_TRAIN = flags.DEFINE_bool(
    'eval_on_train',
    False,
    'Report top-1 even when the eval split shares images with the train split (= --config.finetune.eval_on_train).',
    flag_values=FLAGS,
)
_TRUST = flags.DEFINE_bool(
    'trust_checkpoint',
    False,
    'Read a .pth checkpoint without torch.load\'s weights_only '
    'guard (runs code from the file; only for files you trust).',
    flag_values=FLAGS,
)


def main(argv):
    cli.no_positional(argv)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    config = _CONFIG.value
    if config is None:
        raise cli.UsageError('pass --config=NAME with a fine-tuning entry (finetune_*; python -m launch.list).')
    if 'finetune' not in config:
        raise cli.UsageError(f'{config.name} is a pretraining entry; pass a fine-tuning entry (finetune_*).')
    if _CHECKPOINT.value:
        config.finetune.checkpoint = _CHECKPOINT.value
    if _TRUST.value:
        config.finetune.trust_checkpoint = True
    for key, flag in (('split_train', _SPLIT_TRAIN), ('split_eval', _SPLIT_EVAL)):
        if flag.value is not None:
            config.data[key] = flag.value
    if _HOLDOUT.value is not None:
        config.finetune.holdout = _HOLDOUT.value
    if _EVAL_ON_TRAIN.value:
        config.finetune.eval_on_train = True
    try:  # a missing split, or one that is not held out, is a usage error before anything is built
        print(f'Fine-tuning splits: {finetune.resolve_splits(config)}.', flush=True)
    except (ValueError, data.DatasetNotPreparedError) as e:
        raise cli.UsageError(str(e)) from None
    workdir = checkpoints.absolute(_WORKDIR.value or os.path.join('runs', config.name))  # Orbax needs absolute
    print(f'Fine-tuning {config.name} from {config.finetune.checkpoint} -> {workdir}', flush=True)
    try:
        result = finetune.finetune_and_evaluate(config, workdir)
    except checkpoints.CheckpointError as e:
        raise cli.UsageError(str(e)) from None
    print(json.dumps({k: v for k, v in result.items() if v is not None}), flush=True)
    if 'eval/top1' in result:
        print(f'top-1 on {config.data.name}/{config.data.split_eval}: {100 * result["eval/top1"]:.2f}%', flush=True)


if __name__ == '__main__':
    cli.main(main, FLAGS)
