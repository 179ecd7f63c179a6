"""Pretrain a registered experiment.

  python -m launch.train                                   # the embedded default (crate_mae_mnist) into runs/
  python -m launch.train --config=NAME|FILE:NAME --workdir=DIR [--config.KEY=VALUE ...]

Rerunning the same command resumes from the newest good checkpoint in the workdir.
"""

if __name__ == '__main__':  # before jax is imported: glibc reads its tunables at start-up (cratemae/platform.py)
    from cratemae import platform as _platform

    _platform.reexec_with_cpu_tunables()

import json
import logging
import os

from absl import flags

from cratemae import train
from launch import cli

FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS, 'crate_mae_mnist')
_WORKDIR = flags.DEFINE_string(
    'workdir',
    None,
    'Where checkpoints, metrics and pictures go (default runs/NAME); local path or gs://.',
    flag_values=FLAGS,
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume a workdir whose saved config differs from this one.', flag_values=FLAGS
)


def main(argv):
    cli.no_positional(argv)
    # Orbax and absl are chatty at INFO; keep their warnings and our own progress messages.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join('runs', config.name)
    print(f'Experiment {config.name} -> {workdir}\n{config}', flush=True)
    result = train.train_and_evaluate(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    print(json.dumps({k: v for k, v in result.items() if v is not None}), flush=True)


if __name__ == '__main__':
    cli.main(main, FLAGS)
