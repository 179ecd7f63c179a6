"""Train on a Cloud TPU VM slice (one process per host) with the gcloud commands a user would type.

  python -m launch.tpu_pod create --name=NAME --accelerator_type=v4-32 --zone=us-central2-b --project=P [--spot]
                                  [--queued] [--version=RUNTIME]
  python -m launch.tpu_pod setup  --name=NAME [--source=copy|git --repo=URL --branch=B]    # code + venv on all hosts
                                  [--data=gs://BUCKET/tfds [--data_mode=gcsfuse|copy]]   # + prepared tfds data
  python -m launch.tpu_pod run    --name=NAME --config=crate_mae_base --bucket=gs://BUCKET [--data=gs://...]
                                  [--config.KEY=VALUE ...]
  python -m launch.tpu_pod tail   --name=NAME                # the log of worker 0
  python -m launch.tpu_pod stop   --name=NAME                # SIGTERM: every host checkpoints, then exits
  python -m launch.tpu_pod delete --name=NAME [--queued]

Every subcommand prints each gcloud command (cratemae/tpu_vm.py) before running it; --dry_run (anywhere on the line)
prints them and runs nothing. --project and --zone default to `gcloud config get-value project` / `compute/zone`.
`run` checks the experiment and its overrides here first (registry name, config keys and values, the checks
launch.train makes before compiling), so a typo costs nothing on the slice.
"""

import shutil
import subprocess
import sys

from absl import flags

from cratemae import tpu_vm
from cratemae.data import pod
from launch import cli

FLAGS = cli.flag_values()
_COMMON = {'help', 'name', 'project', 'zone', 'dry_run'}
_OWN = {
    'create': {'accelerator_type', 'version', 'spot', 'queued'},
    'setup': {'source', 'repo', 'branch', 'python', 'data', 'data_mode'},
    'run': {'config', 'bucket', 'workdir', 'allow_config_change', 'data', 'data_mode'},
    'tail': {'lines'},
    'stop': set(),
    'delete': {'queued'},
}
flags.DEFINE_string('name', None, 'TPU VM (and queued resource) name.', flag_values=FLAGS)
flags.DEFINE_string('project', None, 'GCP project (default: gcloud config get-value project).', flag_values=FLAGS)
flags.DEFINE_string('zone', None, 'Zone, e.g. us-central2-b (default: gcloud config compute/zone).', flag_values=FLAGS)
flags.DEFINE_bool('dry_run', False, 'Print the commands; run nothing.', flag_values=FLAGS)
flags.DEFINE_string('accelerator_type', None, 'create: e.g. v4-32, v5litepod-256 (or v5e-256).', flag_values=FLAGS)
flags.DEFINE_string('version', None, 'create: runtime version (default per generation).', flag_values=FLAGS)
flags.DEFINE_bool('spot', False, 'create: spot capacity, cheaper, may be preempted (runs resume).', flag_values=FLAGS)
flags.DEFINE_bool('queued', False, 'create/delete: through a queued resource (waits for capacity).', flag_values=FLAGS)
flags.DEFINE_enum('source', 'copy', ['copy', 'git'], 'setup: scp this checkout, or git clone.', flag_values=FLAGS)
flags.DEFINE_string('repo', None, 'setup: git URL for --source=git.', flag_values=FLAGS)
flags.DEFINE_string('branch', None, 'setup: git branch for --source=git.', flag_values=FLAGS)
flags.DEFINE_string(
    'python', 'python3.11', 'setup: interpreter for the venv (jax 0.10 needs >= 3.11).', flag_values=FLAGS
)
flags.DEFINE_string(
    'data',
    None,
    f'setup/run: gs://BUCKET[/PREFIX] holding prepared tfds datasets, made readable at '
    f'{pod.LOCAL_DIR} on every host; run then reads --config.data.data_dir={pod.LOCAL_DIR} '
    '(docs/data.md, "ImageNet on pod hosts").',
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    'data_mode',
    'gcsfuse',
    list(pod.MODES),
    'setup/run: gcsfuse mounts the bucket; copy rsyncs it to the local disk.',
    flag_values=FLAGS,
)
cli.define_config(FLAGS, help_text='run: the experiment (a registry NAME), then --config.KEY=VALUE overrides.')
flags.DEFINE_string('bucket', None, 'run: gs://BUCKET; the workdir is gs://BUCKET/NAME.', flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'run: explicit workdir (instead of --bucket).', flag_values=FLAGS)
flags.DEFINE_bool('allow_config_change', False, 'run: passed on to launch.train.', flag_values=FLAGS)
flags.DEFINE_integer('lines', 100, 'tail: lines of the log to show first.', flag_values=FLAGS)


def commands(argv):
    """The subcommand's gcloud argv lists, from the flags parsed into FLAGS (positional argv: [prog, SUBCOMMAND])."""
    if len(argv) != 2 or argv[1] not in _OWN:
        raise cli.UsageError(f'expected one subcommand of {", ".join(_OWN)}; got {argv[1:]}.')
    foreign = sorted(n for n in FLAGS if FLAGS[n].present and n.split('.')[0] not in _COMMON | _OWN[argv[1]])
    if foreign:
        raise cli.UsageError(f'{argv[1]} takes no {", ".join("--" + n for n in foreign)} (see --help).')
    overrides = []
    if argv[1] == 'run' and FLAGS.config is not None:
        cli.check_registered_run(FLAGS.config)  # here, before anything runs on the slice
        overrides = cli.override_args(FLAGS) + (['--allow_config_change'] if FLAGS.allow_config_change else [])
    try:
        target = tpu_vm.resolve_target(FLAGS.name, FLAGS.project, FLAGS.zone)
        return tpu_vm.subcommand(argv[1], target, FLAGS, overrides)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def main(argv, out=None):
    if not FLAGS.dry_run and not shutil.which('gcloud'):
        raise cli.UsageError(
            'gcloud is not installed (not on PATH): install the Google Cloud CLI '
            '(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands.'
        )
    for cmd in commands(argv):
        print(tpu_vm.shell_join(cmd), file=out or sys.stdout, flush=True)
        if not FLAGS.dry_run and subprocess.call(cmd, cwd=cli.REPO):  # scp's relative sources are the repo's files
            print('tpu_pod: a command failed; nothing after it ran.', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    cli.main(main, FLAGS)
