"""Train on a Cloud TPU VM slice (one process per host) with the gcloud commands a user would type.

  python -m launch.tpu_pod create --name=NAME --accelerator_type=v4-32 --zone=us-central2-b --project=P [--spot]
                                  [--queued] [--version=RUNTIME]
  python -m launch.tpu_pod setup  --name=NAME [--source=copy|git --repo=URL --branch=B]    # code + venv on all hosts
  python -m launch.tpu_pod run    --name=NAME --config=crate_mae_base --bucket=gs://BUCKET [--config.KEY=VALUE ...]
  python -m launch.tpu_pod tail   --name=NAME                # the log of worker 0
  python -m launch.tpu_pod stop   --name=NAME                # SIGTERM: every host checkpoints, then exits
  python -m launch.tpu_pod delete --name=NAME [--queued]

Every subcommand prints each gcloud command before running it; --dry_run (anywhere on the line) prints them and runs
nothing. --project and --zone default to `gcloud config get-value project` / `compute/zone`. `run` checks the
experiment and its overrides here first (registry name, config keys and values, the checks launch.train makes before
compiling), so a typo costs nothing on the slice.

Multi-host: `run` starts the same `python -m launch.train` on every host (--worker=all). cratemae calls
jax.distributed.initialize() only when the environment asks for it (see docs/scale_out.md). A plain Cloud TPU VM
sets no such variable in the shell (JAX reads the slice layout from the GCE metadata server instead), so `run`
exports JAX_COORDINATOR_ADDRESS = worker 0's address from the metadata key `worker-network-endpoints` (the host
JAX's own Cloud TPU detection picks) and port 8476; JAX then detects the process count and id itself. Orbax's
multi-host checkpointing needs this.
"""

import dataclasses
import shlex
import shutil
import subprocess
import sys

from absl import flags

from launch import cli

REMOTE_DIR = '~/cratemae'
LOG = '~/cratemae-train.log'
PID = '~/cratemae-train.pid'
COORDINATOR_PORT = 8476  # JAX's default coordinator port on Cloud TPU
# What `setup` copies: the installable package (setup.py reads README.md), not .venv, runs/ or .git.
COPIED = ('setup.py', 'README.md', 'cratemae', 'experiments', 'launch')
# Runtime (software) versions for JAX, per https://cloud.google.com/tpu/docs/runtimes (v4 and older: base image).
RUNTIME_VERSIONS = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base', 'v4': 'tpu-ubuntu2204-base',
                    'v5litepod': 'v2-alpha-tpuv5-lite', 'v5p': 'v2-alpha-tpuv5', 'v6e': 'v2-alpha-tpuv6e'}
# worker-network-endpoints is "unknown:unknown:IP0,unknown:unknown:IP1,..."; JAX's GceTpuCluster takes the first IP.
_WORKER0_IP = ('$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/'
               'attributes/worker-network-endpoints | cut -d, -f1 | cut -d: -f3)')

FLAGS = cli.flag_values()
_COMMON = {'help', 'name', 'project', 'zone', 'dry_run'}
_OWN = {'create': {'accelerator_type', 'version', 'spot', 'queued'}, 'setup': {'source', 'repo', 'branch', 'python'},
        'run': {'config', 'bucket', 'workdir', 'allow_config_change'}, 'tail': {'lines'}, 'stop': set(),
        'delete': {'queued'}}
flags.DEFINE_string('name', None, 'TPU VM (and queued resource) name.', flag_values=FLAGS)
flags.DEFINE_string('project', None, 'GCP project (default: gcloud config get-value project).', flag_values=FLAGS)
flags.DEFINE_string('zone', None, 'Zone, e.g. us-central2-b (default: gcloud config compute/zone).', flag_values=FLAGS)
flags.DEFINE_bool('dry_run', False, 'Print the commands; run nothing.', flag_values=FLAGS)
flags.DEFINE_string('accelerator_type', None, 'create: e.g. v4-32, v5litepod-256 (or v5e-256).', flag_values=FLAGS)
flags.DEFINE_string('version', None, 'create: runtime version (default per generation).', flag_values=FLAGS)
flags.DEFINE_bool('spot', False, 'create: spot capacity, cheaper, may be preempted (runs resume).', flag_values=FLAGS)
flags.DEFINE_bool('queued', False, 'create/delete: through a queued resource (waits for capacity).',
                  flag_values=FLAGS)
flags.DEFINE_enum('source', 'copy', ['copy', 'git'], 'setup: scp this checkout, or git clone.', flag_values=FLAGS)
flags.DEFINE_string('repo', None, 'setup: git URL for --source=git.', flag_values=FLAGS)
flags.DEFINE_string('branch', None, 'setup: git branch for --source=git.', flag_values=FLAGS)
flags.DEFINE_string('python', 'python3.11', 'setup: interpreter for the venv (jax 0.10 needs >= 3.11).',
                    flag_values=FLAGS)
cli.define_config(FLAGS, help_text='run: the experiment (NAME or FILE:NAME), then --config.KEY=VALUE overrides.')
flags.DEFINE_string('bucket', None, 'run: gs://BUCKET; the workdir is gs://BUCKET/NAME.', flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'run: explicit workdir (instead of --bucket).', flag_values=FLAGS)
flags.DEFINE_bool('allow_config_change', False, 'run: passed on to launch.train.', flag_values=FLAGS)
flags.DEFINE_integer('lines', 100, 'tail: lines of the log to show first.', flag_values=FLAGS)


def accelerator_type(name: str) -> str:
    """gcloud's spelling: v5e-N is called v5litepod-N by the TPU API."""
    return 'v5litepod-' + name.split('-', 1)[1] if name.startswith('v5e-') else name


def default_version(accelerator: str) -> str:
    generation = accelerator.split('-', 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise cli.UsageError(f'No default runtime for accelerator type {accelerator!r}; pass --version (see '
                             'https://cloud.google.com/tpu/docs/runtimes).')
    return RUNTIME_VERSIONS[generation]


def gcloud_default(key: str):
    """`gcloud config get-value KEY`, or None when unset or gcloud is missing."""
    if not shutil.which('gcloud'):
        return None
    try:
        out = subprocess.run(['gcloud', 'config', 'get-value', key], capture_output=True, text=True, timeout=60,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value and value != '(unset)' else None


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    project: str
    zone: str

    def tpu_vm(self, verb, *args):
        """gcloud compute tpus tpu-vm VERB NAME --project --zone ARGS."""
        return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, self.name, f'--project={self.project}',
                f'--zone={self.zone}', *args]

    def queued(self, verb, *args):
        return ['gcloud', 'compute', 'tpus', 'queued-resources', verb, self.name, f'--project={self.project}',
                f'--zone={self.zone}', *args]

    def scp_to_all(self, sources, remote_dir):
        """scp names no instance positional: the destination NAME:DIR does (DIR is relative to the home)."""
        return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', f'--project={self.project}', f'--zone={self.zone}',
                '--worker=all', '--recurse', *sources, f'{self.name}:{remote_dir}']

    def ssh(self, command, worker='all'):
        return self.tpu_vm('ssh', f'--worker={worker}', f'--command={command}')


# ----------------------------------------------------------------------------------------------------------------
# The commands of each subcommand: lists of argv lists (run in order; each printed with shell_join).


def create_commands(t: Target, f):
    if not f.accelerator_type:
        raise cli.UsageError('create needs --accelerator_type (e.g. v4-32, v5e-256, v5p-128).')
    accelerator = accelerator_type(f.accelerator_type)
    version = f.version or default_version(accelerator)
    spot = ['--spot'] if f.spot else []
    if f.queued:
        # A queued resource waits for capacity instead of failing at once; the node gets the same name.
        return [t.queued('create', f'--node-id={t.name}', f'--accelerator-type={accelerator}',
                         f'--runtime-version={version}', *spot)]
    return [t.tpu_vm('create', f'--accelerator-type={accelerator}', f'--version={version}', *spot)]


def install_command(python: str) -> str:
    """Remote: a Python >= 3.11 venv (jax 0.10 needs 3.11; the TPU images ship 3.10) with cratemae[tpu]."""
    return (f'sudo apt-get update -qq && sudo apt-get install -y -qq {python} {python}-venv git && '
            f'cd {REMOTE_DIR} && {python} -m venv .venv && .venv/bin/pip install -q -U pip && '
            ".venv/bin/pip install -q -e \".[tpu]\"")


def setup_commands(t: Target, f):
    install = install_command(shlex.quote(f.python))
    if f.source == 'git':
        if not f.repo:
            raise cli.UsageError('setup --source=git needs --repo=URL (the git URL every host clones).')
        branch = f' --branch={shlex.quote(f.branch)}' if f.branch else ''
        fetch = (f'sudo apt-get update -qq && sudo apt-get install -y -qq git && '
                 f'if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} pull --ff-only; '
                 f'else git clone{branch} {shlex.quote(f.repo)} {REMOTE_DIR}; fi')
        return [t.ssh(fetch), t.ssh(install)]
    return [t.ssh(f'mkdir -p {REMOTE_DIR}'), t.scp_to_all(COPIED, REMOTE_DIR.replace('~/', '')), t.ssh(install)]


def train_command(name: str, workdir: str, overrides=()) -> str:
    """Remote: launch.train in the background on one host, detached from the ssh session, pid and log in ~."""
    flags_text = ' '.join(shlex.quote(o) for o in (f'--config=experiments/registry.py:{name}', f'--workdir={workdir}',
                                                   *overrides))
    # `;` rather than `&&` before nohup, so `&` backgrounds python itself and $! is its pid (for `stop`).
    return (f'cd {REMOTE_DIR} || exit 1; export JAX_COORDINATOR_ADDRESS={_WORKER0_IP}:{COORDINATOR_PORT}; '
            f'nohup .venv/bin/python -m launch.train {flags_text} > {LOG} 2>&1 < /dev/null & echo $! > {PID}')


def run_commands(t: Target, f):
    config = f.config
    if config is None:
        raise cli.UsageError('run needs --config=NAME (a registered experiment, e.g. crate_mae_base).')
    if not f.workdir and not f.bucket:
        raise cli.UsageError('run needs --bucket=gs://BUCKET (workdir gs://BUCKET/NAME) or --workdir: every host '
                             'must write the checkpoints to the same place, so a local path will not do on a pod.')
    import experiments  # pylint: disable=import-outside-toplevel  (jax: only for `run`)
    from cratemae import train  # pylint: disable=import-outside-toplevel
    if config.name not in experiments.names():  # the hosts run the registry's entry of that name
        raise cli.UsageError(f'run takes a registered experiment (--config=NAME); {config.name!r} is not one.')
    try:  # what launch.train checks before compiling; the device counts are the slice's, unknown here
        train.validate_config(config, 1, 1)
    except ValueError as e:
        raise cli.UsageError(f'{config.name}: {e}') from None
    workdir = f.workdir or f'{f.bucket.rstrip("/")}/{config.name}'
    overrides = cli.override_args(FLAGS) + (['--allow_config_change'] if f.allow_config_change else [])
    return [t.ssh(train_command(config.name, workdir, overrides))]


def tail_commands(t: Target, f):
    return [t.ssh(f'tail -n {int(f.lines)} -F {LOG}', worker='0')]


def stop_commands(t: Target, f):
    # SIGTERM is what a preemption sends: the loop ORs the flag over the hosts, all save the same step and exit.
    return [t.ssh(f'kill -TERM $(cat {PID})')]


def delete_commands(t: Target, f):
    if f.queued:
        return [t.queued('delete', '--force', '--quiet')]  # --force also deletes the node it created
    return [t.tpu_vm('delete', '--quiet')]


SUBCOMMANDS = {'create': create_commands, 'setup': setup_commands, 'run': run_commands, 'tail': tail_commands,
               'stop': stop_commands, 'delete': delete_commands}


def resolve_target(f) -> Target:
    """Name, project, zone; project and zone from gcloud's config when not given; UsageError names what is missing."""
    if not f.name:
        raise cli.UsageError('--name is required (the TPU VM name).')
    values = {'project': f.project or gcloud_default('project'), 'zone': f.zone or gcloud_default('compute/zone')}
    missing = [k for k, v in values.items() if not v]
    if missing:
        how = ('gcloud is not installed, so there is no gcloud config default' if not shutil.which('gcloud') else
               'and no default in gcloud config (gcloud config set project P / gcloud config set compute/zone Z)')
        raise cli.UsageError(f'Missing {" and ".join("--" + k for k in missing)} ({how}).')
    return Target(f.name, values['project'], values['zone'])


def commands(argv):
    """The subcommand's gcloud argv lists, from the flags parsed into FLAGS (positional argv: [prog, SUBCOMMAND])."""
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise cli.UsageError(f'expected one subcommand of {", ".join(SUBCOMMANDS)}; got {argv[1:]}.')
    sub = argv[1]
    foreign = sorted(n for n in FLAGS if FLAGS[n].present and n.split('.')[0] not in _COMMON | _OWN[sub])
    if foreign:
        raise cli.UsageError(f'{sub} takes no {", ".join("--" + n for n in foreign)} (see --help).')
    return SUBCOMMANDS[sub](resolve_target(FLAGS), FLAGS)


def shell_join(cmd) -> str:
    """shlex.join, but --flag=VALUE quotes only VALUE (--command='...'), as a person would type it."""
    def one(arg):
        flag, eq, value = arg.partition('=')
        if arg.startswith('--') and eq and shlex.quote(value) != value:
            return f'{flag}={shlex.quote(value)}'
        return shlex.quote(arg)
    return ' '.join(one(a) for a in cmd)


def main(argv, out=None):
    out = out or sys.stdout
    if not FLAGS.dry_run and not shutil.which('gcloud'):
        raise cli.UsageError('gcloud is not installed (not on PATH): install the Google Cloud CLI '
                             '(https://cloud.google.com/sdk/docs/install), or pass --dry_run to print the commands.')
    for cmd in commands(argv):
        print(shell_join(cmd), file=out, flush=True)
        if FLAGS.dry_run:
            continue
        code = subprocess.call(cmd, cwd=cli.REPO)  # scp's relative sources are the repo's files
        if code:
            print(f'tpu_pod: command failed with exit status {code}.', file=sys.stderr)
            return code
    return 0


if __name__ == '__main__':
    cli.main(main, FLAGS)
