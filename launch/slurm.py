"""Train on a Slurm GPU cluster: write the sbatch script (one process per node, all its GPUs) and submit it.

  python -m launch.slurm --config=NAME --nodes=2 --gpus_per_node=8 [--partition=P] [--time=24:00:00]
                         [--account=A] [--workdir=DIR] [--data_dir=TFDS_DIR] [--config.KEY=VALUE ...]
                         [--out=FILE] [--submit] [--dry_run]

Without --submit the script is printed (or written to --out); --submit runs sbatch on it; --dry_run prints the
script and the sbatch command and writes and runs nothing. The experiment and its overrides are checked here first
(registry name, config keys and values, the checks launch.train makes before compiling), so a typo costs no queue
time. Near the time limit every process checkpoints and the job requeues itself; the requeued job resumes from the
newest checkpoint in the workdir (cratemae/slurm.py, docs/scale_out.md).
"""

import os

from absl import flags

from cratemae import slurm
from launch import cli

FLAGS = cli.flag_values()
cli.define_config(FLAGS, help_text='The experiment (a registry NAME), then --config.KEY=VALUE overrides.')
flags.DEFINE_string(
    'workdir',
    None,
    'Checkpoints and metrics, on a filesystem every node sees (or gs://...); default CODE_DIR/runs/NAME. '
    'A relative path is taken from the current directory.',
    flag_values=FLAGS,
)
flags.DEFINE_integer('nodes', 1, 'Nodes; one training process runs on each.', flag_values=FLAGS)
flags.DEFINE_integer(
    'gpus_per_node', 8, 'GPUs per node (--gres=gpu:N); each process uses all of them.', flag_values=FLAGS
)
flags.DEFINE_string(
    'gpu_type', None, 'GPU type for --gres=gpu:TYPE:N, e.g. a100 (as the cluster names it).', flag_values=FLAGS
)
flags.DEFINE_integer(
    'cpus_per_node', None, 'CPUs per node; unset takes whole nodes (--exclusive --mem=0).', flag_values=FLAGS
)
flags.DEFINE_string('partition', None, 'Slurm partition (default: the cluster default).', flag_values=FLAGS)
flags.DEFINE_string('account', None, 'Slurm account to charge.', flag_values=FLAGS)
flags.DEFINE_string('time', None, 'Time limit, e.g. 24:00:00 (default: the partition\'s).', flag_values=FLAGS)
flags.DEFINE_integer('signal_seconds', 120, 'Seconds before the limit to save and requeue.', flag_values=FLAGS)
flags.DEFINE_string('job_name', None, 'Job name (default: the experiment name).', flag_values=FLAGS)
flags.DEFINE_string('log', 'slurm-%x-%j.out', 'The job log (sbatch --output; %x name, %j job id).', flag_values=FLAGS)
flags.DEFINE_multi_string('sbatch', [], 'Another sbatch option, e.g. --sbatch=--qos=high.', flag_values=FLAGS)
flags.DEFINE_string('code_dir', cli.REPO, 'The checkout the nodes run, as they see it.', flag_values=FLAGS)
flags.DEFINE_string(
    'python', '.venv/bin/python', 'Python with cratemae[gpu] (relative: to --code_dir).', flag_values=FLAGS
)
flags.DEFINE_string('data_dir', None, 'tfds data dir every node reads (config.data.data_dir).', flag_values=FLAGS)
flags.DEFINE_bool('allow_config_change', False, 'Passed on to launch.train.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Write the script to this file (instead of printing it).', flag_values=FLAGS)
flags.DEFINE_bool('submit', False, 'Submit the script with sbatch.', flag_values=FLAGS)
flags.DEFINE_bool('dry_run', False, 'Print the script and the sbatch command only.', flag_values=FLAGS)


def script_and_command(f):
    """The script text and the sbatch argv, after checking the experiment and the job here."""
    config = f.config
    try:
        job = slurm.Job(
            name=f.job_name or (config.name if config else 'cratemae'),
            nodes=f.nodes,
            gpus_per_node=f.gpus_per_node,
            code_dir=os.path.abspath(f.code_dir),
            partition=f.partition,
            account=f.account,
            time=f.time,
            gpu_type=f.gpu_type,
            cpus_per_node=f.cpus_per_node,
            signal_seconds=f.signal_seconds,
            log=f.log,
            extra=tuple(f.sbatch),
        )
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    cli.check_registered_run(config, job.nodes * job.gpus_per_node, job.nodes)
    workdir = f.workdir or os.path.join(f.code_dir, 'runs', config.name)
    if '://' not in workdir:
        workdir = os.path.abspath(workdir)
    overrides = [f'--config.data.data_dir={f.data_dir}'] if f.data_dir else []
    overrides += cli.override_args(FLAGS) + (['--allow_config_change'] if f.allow_config_change else [])
    argv = slurm.train_argv(f.python, config.name, workdir, overrides)
    script = slurm.batch_script(job, argv)
    return job, script, slurm.sbatch_command(f.out)


def main(argv, out=None):
    cli.no_positional(argv)
    job, script, command = script_and_command(FLAGS)
    try:
        return slurm.deliver(job, script, command, FLAGS.out, FLAGS.python, FLAGS.dry_run, FLAGS.submit, out)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


if __name__ == '__main__':
    cli.main(main, FLAGS)
