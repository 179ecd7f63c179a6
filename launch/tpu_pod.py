"""Train on a Cloud TPU VM slice (one process per host) with the gcloud commands a user would type.

  python -m launch.tpu_pod create --name=NAME --accelerator-type=v4-32 --zone=us-central2-b --project=P [--spot]
                                  [--queued] [--version=RUNTIME]
  python -m launch.tpu_pod setup  --name=NAME [--source=copy|git --repo=URL --branch=B]    # code + venv on all hosts
                                  [--data=gs://BUCKET/tfds [--data_mode=gcsfuse|copy]]   # + prepared tfds data
  python -m launch.tpu_pod run    --name=NAME --experiment=crate_mae_base --bucket=gs://BUCKET [--data=gs://...]
                                  [--config.KEY=VALUE ...]
  python -m launch.tpu_pod tail   --name=NAME                # the log of worker 0
  python -m launch.tpu_pod stop   --name=NAME                # SIGTERM: every host checkpoints, then exits
  python -m launch.tpu_pod delete --name=NAME [--queued]

Every subcommand prints each gcloud command before running it; --dry-run prints them and runs nothing. --project and
--zone default to `gcloud config get-value project` / `compute/zone`.

Multi-host: `run` starts the same `python -m launch.train` on every host (--worker=all). cratemae calls
jax.distributed.initialize() only when the environment asks for it (cratemae.sharding.distributed_request:
CRATEMAE_COORDINATOR_ADDRESS, JAX_COORDINATOR_ADDRESS, TPU_WORKER_HOSTNAMES listing several hosts,
MEGASCALE_NUM_SLICES>1, SLURM_NTASKS>1, OMPI_COMM_WORLD_SIZE>1). A plain Cloud TPU VM sets none of these in the
shell (JAX reads the slice layout from the GCE metadata server instead), so `run` exports JAX_COORDINATOR_ADDRESS =
worker 0's address from the metadata key `worker-network-endpoints` (the host JAX's own Cloud TPU detection picks)
and port 8476; JAX then detects the process count and id itself. Orbax's multi-host checkpointing needs this.
"""

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys

from cratemae.data import pod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = '~/cratemae'
LOG = '~/cratemae-train.log'
PID = '~/cratemae-train.pid'
COORDINATOR_PORT = 8476  # JAX's default coordinator port on Cloud TPU
# What `setup` copies: the installable package (setup.py reads README.md), not .venv, runs/ or .git.
COPIED = ('setup.py', 'README.md', 'cratemae', 'experiments', 'launch')
# Runtime (software) versions for JAX, per https://cloud.google.com/tpu/docs/runtimes (v4 and older: base image).
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}
# worker-network-endpoints is "unknown:unknown:IP0,unknown:unknown:IP1,..."; JAX's GceTpuCluster takes the first IP.
_WORKER0_IP = ('$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/'
               'attributes/worker-network-endpoints | cut -d, -f1 | cut -d: -f3)')


class UsageError(Exception):
    """A missing or invalid argument; main() prints it and exits with status 2."""


def accelerator_type(name: str) -> str:
    """gcloud's spelling: v5e-N is called v5litepod-N by the TPU API."""
    return 'v5litepod-' + name.split('-', 1)[1] if name.startswith('v5e-') else name


def default_version(accelerator: str) -> str:
    generation = accelerator.split('-', 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise UsageError(f'No default runtime for accelerator type {accelerator!r}; pass --version (see '
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


def create_commands(t: Target, args):
    accelerator = accelerator_type(args.accelerator_type)
    version = args.version or default_version(accelerator)
    spot = ['--spot'] if args.spot else []
    if args.queued:
        # A queued resource waits for capacity instead of failing at once; the node gets the same name.
        return [t.queued('create', f'--node-id={t.name}', f'--accelerator-type={accelerator}',
                         f'--runtime-version={version}', *spot)]
    return [t.tpu_vm('create', f'--accelerator-type={accelerator}', f'--version={version}', *spot)]


def install_command(python: str) -> str:
    """Remote: a Python >= 3.11 venv (jax 0.10 needs 3.11; the TPU images ship 3.10) with cratemae[tpu]."""
    return (f'sudo apt-get update -qq && sudo apt-get install -y -qq {python} {python}-venv git && '
            f'cd {REMOTE_DIR} && {python} -m venv .venv && .venv/bin/pip install -q -U pip && '
            ".venv/bin/pip install -q -e \".[tpu]\"")


def data_commands(t: Target, args):
    """With --data=gs://...: make the prepared tfds data readable at pod.LOCAL_DIR on every host."""
    if not args.data:
        return []
    try:
        return [t.ssh(pod.host_command(args.data, args.data_mode))]
    except ValueError as e:
        raise UsageError(str(e)) from None


def setup_commands(t: Target, args):
    install = install_command(args.python)
    if args.source == 'git':
        if not args.repo:
            raise UsageError('setup --source=git needs --repo=URL (the git URL every host clones).')
        branch = f' --branch={shlex.quote(args.branch)}' if args.branch else ''
        fetch = (f'sudo apt-get update -qq && sudo apt-get install -y -qq git && '
                 f'if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} pull --ff-only; '
                 f'else git clone{branch} {shlex.quote(args.repo)} {REMOTE_DIR}; fi')
        return [t.ssh(fetch), t.ssh(install)] + data_commands(t, args)
    return [t.ssh(f'mkdir -p {REMOTE_DIR}'),
            t.scp_to_all(COPIED, REMOTE_DIR.replace('~/', '')),
            t.ssh(install)] + data_commands(t, args)


def train_command(experiment: str, workdir: str, overrides=()) -> str:
    """Remote: launch.train in the background on one host, detached from the ssh session, pid and log in ~."""
    flags = ' '.join(shlex.quote(o) for o in (f'--config=experiments/registry.py:{experiment}',
                                              f'--workdir={workdir}', *overrides))
    # `;` rather than `&&` before nohup, so `&` backgrounds python itself and $! is its pid (for `stop`).
    return (f'cd {REMOTE_DIR} || exit 1; export JAX_COORDINATOR_ADDRESS={_WORKER0_IP}:{COORDINATOR_PORT}; '
            f'nohup .venv/bin/python -m launch.train {flags} > {LOG} 2>&1 < /dev/null & echo $! > {PID}')


def run_commands(t: Target, args):
    if not args.workdir and not args.bucket:
        raise UsageError('run needs --bucket=gs://BUCKET (workdir gs://BUCKET/EXPERIMENT) or --workdir: every host '
                         'must write the checkpoints to the same place, so a local path will not do on a pod.')
    workdir = args.workdir or f'{args.bucket.rstrip("/")}/{args.experiment}'
    overrides = list(args.overrides)
    if args.data:  # mounted again (a no-op when it is), e.g. after a host restart; then read from there
        overrides = pod.train_overrides() + overrides
    return data_commands(t, args) + [t.ssh(train_command(args.experiment, workdir, overrides))]


def tail_commands(t: Target, args):
    return [t.ssh(f'tail -n {args.lines} -F {LOG}', worker='0')]


def stop_commands(t: Target, args):
    # SIGTERM is what a preemption sends: the loop ORs the flag over the hosts, all save the same step and exit.
    return [t.ssh(f'kill -TERM $(cat {PID})')]


def delete_commands(t: Target, args):
    if args.queued:
        return [t.queued('delete', '--force', '--quiet')]  # --force also deletes the node it created
    return [t.tpu_vm('delete', '--quiet')]


SUBCOMMANDS = {'create': create_commands, 'setup': setup_commands, 'run': run_commands, 'tail': tail_commands,
               'stop': stop_commands, 'delete': delete_commands}


# ----------------------------------------------------------------------------------------------------------------
# Arguments, defaults, execution.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m launch.tpu_pod', description=__doc__.split('\n')[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--name', required=True, help='TPU VM (and queued resource) name.')
    common.add_argument('--project', help='GCP project (default: gcloud config get-value project).')
    common.add_argument('--zone', help='Zone, e.g. us-central2-b (default: gcloud config get-value compute/zone).')
    common.add_argument('--dry-run', action='store_true', help='Print the commands; run nothing.')
    sub = p.add_subparsers(dest='subcommand', required=True)
    c = sub.add_parser('create', parents=[common], help='Create the TPU VM slice.')
    c.add_argument('--accelerator-type', required=True, help='e.g. v4-32, v5litepod-256 (or v5e-256), v5p-128.')
    c.add_argument('--version', help='Runtime version (default per generation, e.g. tpu-ubuntu2204-base for v4).')
    c.add_argument('--spot', action='store_true', help='Spot capacity: cheaper, may be preempted (runs resume).')
    c.add_argument('--queued', action='store_true', help='Request through a queued resource (waits for capacity).')
    s = sub.add_parser('setup', parents=[common], help='Copy or clone the code and install it on every host.')
    s.add_argument('--source', choices=('copy', 'git'), default='copy', help='scp this checkout, or git clone.')
    s.add_argument('--repo', help='git URL for --source=git.')
    s.add_argument('--branch', help='git branch for --source=git.')
    s.add_argument('--python', default='python3.11', help='Interpreter for the venv (jax 0.10 needs >= 3.11).')
    data_help = (f'gs://BUCKET[/PREFIX] holding prepared tfds datasets: made readable at {pod.LOCAL_DIR} on every '
                 'host (docs/data.md, "ImageNet on pod hosts").')
    s.add_argument('--data', help=data_help)
    s.add_argument('--data_mode', '--data-mode', choices=pod.MODES, default='gcsfuse',
                   help='gcsfuse: mount the bucket; copy: gcloud storage rsync it to the local disk.')
    r = sub.add_parser('run', parents=[common], help='Start training on every host, in the background.')
    r.add_argument('--experiment', required=True, help='Registry name, e.g. crate_mae_base.')
    r.add_argument('--bucket', help='gs://BUCKET; the workdir is gs://BUCKET/EXPERIMENT.')
    r.add_argument('--workdir', help='Explicit workdir (overrides --bucket).')
    r.add_argument('--data', help=data_help + f' Training reads --config.data.data_dir={pod.LOCAL_DIR}.')
    r.add_argument('--data_mode', '--data-mode', choices=pod.MODES, default='gcsfuse',
                   help='as for setup')
    t = sub.add_parser('tail', parents=[common], help='Follow the training log of worker 0.')
    t.add_argument('--lines', type=int, default=100)
    sub.add_parser('stop', parents=[common], help='SIGTERM the training: checkpoint, then exit.')
    d = sub.add_parser('delete', parents=[common], help='Delete the TPU VM (or the queued resource and its node).')
    d.add_argument('--queued', action='store_true', help='It was created with --queued.')
    return p


def parse(argv):
    """Parsed arguments; for `run`, extra --config.KEY=VALUE / --allow_config_change go to launch.train."""
    args, extra = parser().parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith('--config.') or a == '--allow_config_change')]
    if bad or (extra and args.subcommand != 'run'):
        raise UsageError(f'Unrecognised arguments {bad or extra}; only `run` passes --config.KEY=VALUE and '
                         '--allow_config_change on to launch.train.')
    args.overrides = extra
    return args


def resolve_target(args) -> Target:
    """Name, project, zone; project and zone from gcloud's config when not given; UsageError names what is missing."""
    values = {'project': args.project or gcloud_default('project'),
              'zone': args.zone or gcloud_default('compute/zone')}
    missing = [k for k, v in values.items() if not v]
    if missing:
        how = ('gcloud is not installed, so there is no gcloud config default' if not shutil.which('gcloud') else
               'and no default in gcloud config (gcloud config set project P / gcloud config set compute/zone Z)')
        raise UsageError(f'Missing {" and ".join("--" + k for k in missing)} ({how}).')
    return Target(args.name, values['project'], values['zone'])


def shell_join(cmd) -> str:
    """shlex.join, but --flag=VALUE quotes only VALUE (--command='...'), as a person would type it."""
    def one(arg):
        flag, eq, value = arg.partition('=')
        if arg.startswith('--') and eq and shlex.quote(value) != value:
            return f'{flag}={shlex.quote(value)}'
        return shlex.quote(arg)
    return ' '.join(one(a) for a in cmd)


def main(argv=None, out=sys.stdout) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if not args.dry_run and not shutil.which('gcloud'):
            raise UsageError('gcloud is not installed (not on PATH): install the Google Cloud CLI '
                             '(https://cloud.google.com/sdk/docs/install), or pass --dry-run to print the commands.')
        commands = SUBCOMMANDS[args.subcommand](resolve_target(args), args)
    except UsageError as e:
        print(f'tpu_pod: {e}', file=sys.stderr)
        return 2
    for cmd in commands:
        print(shell_join(cmd), file=out, flush=True)
        if args.dry_run:
            continue
        code = subprocess.call(cmd, cwd=REPO)  # scp's relative sources are the repo's files
        if code:
            print(f'tpu_pod: command failed with exit status {code}.', file=sys.stderr)
            return code
    return 0


if __name__ == '__main__':
    sys.exit(main())
