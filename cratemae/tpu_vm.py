"""The gcloud command lines that run cratemae on a Cloud TPU VM slice (``python -m launch.tpu_pod`` prints and runs them).

Each ``*_commands`` function returns the argv lists of one step (create, setup, run, tail, stop, delete), in order.
``run`` starts the same ``python -m launch.train`` on every host (--worker=all), in the background, detached from
the ssh session, with its pid and log in the home directory. cratemae calls jax.distributed.initialize() only when
the environment asks for it (see docs/scale_out.md). A plain Cloud TPU VM sets no such variable in the shell (JAX
reads the slice layout from the GCE metadata server instead), so ``run`` exports JAX_COORDINATOR_ADDRESS = worker 0's
address from the metadata key ``worker-network-endpoints`` (the host JAX's own Cloud TPU detection picks) and port
8476; JAX then detects the process count and id itself. Orbax's multi-host checkpointing needs this.
"""

import dataclasses
import shlex
import shutil
import subprocess

from cratemae.data import pod

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
_WORKER0_IP = (
    '$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/'
    'attributes/worker-network-endpoints | cut -d, -f1 | cut -d: -f3)'
)


def accelerator_type(name: str) -> str:
    """gcloud's spelling: v5e-N is called v5litepod-N by the TPU API."""
    return 'v5litepod-' + name.split('-', 1)[1] if name.startswith('v5e-') else name


def default_version(accelerator: str) -> str:
    generation = accelerator.split('-', 1)[0]
    if generation not in RUNTIME_VERSIONS:
        raise ValueError(
            f'No default runtime for accelerator type {accelerator!r}; pass --version (see '
            'https://cloud.google.com/tpu/docs/runtimes).'
        )
    return RUNTIME_VERSIONS[generation]


def gcloud_default(key: str):
    """`gcloud config get-value KEY`, or None when unset or gcloud is missing."""
    if not shutil.which('gcloud'):
        return None
    try:
        out = subprocess.run(
            ['gcloud', 'config', 'get-value', key], capture_output=True, text=True, timeout=60, check=False
        )
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
        return [
            'gcloud',
            'compute',
            'tpus',
            'tpu-vm',
            verb,
            self.name,
            f'--project={self.project}',
            f'--zone={self.zone}',
            *args,
        ]

    def queued(self, verb, *args):
        return [
            'gcloud',
            'compute',
            'tpus',
            'queued-resources',
            verb,
            self.name,
            f'--project={self.project}',
            f'--zone={self.zone}',
            *args,
        ]

    def scp_to_all(self, sources, remote_dir):
        """scp names no instance positional: the destination NAME:DIR does (DIR is relative to the home)."""
        return [
            'gcloud',
            'compute',
            'tpus',
            'tpu-vm',
            'scp',
            f'--project={self.project}',
            f'--zone={self.zone}',
            '--worker=all',
            '--recurse',
            *sources,
            f'{self.name}:{remote_dir}',
        ]

    def ssh(self, command, worker='all'):
        return self.tpu_vm('ssh', f'--worker={worker}', f'--command={command}')


# ----------------------------------------------------------------------------------------------------------------
# The commands of each subcommand: lists of argv lists (run in order; each printed with shell_join).


def create_commands(t: Target, accelerator, version=None, spot=False, queued=False):
    if not accelerator:
        raise ValueError('create needs --accelerator_type (e.g. v4-32, v5e-256, v5p-128).')
    accelerator = accelerator_type(accelerator)
    version = version or default_version(accelerator)
    spot = ['--spot'] if spot else []
    if queued:
        # A queued resource waits for capacity instead of failing at once; the node gets the same name.
        return [
            t.queued(
                'create',
                f'--node-id={t.name}',
                f'--accelerator-type={accelerator}',
                f'--runtime-version={version}',
                *spot,
            )
        ]
    return [t.tpu_vm('create', f'--accelerator-type={accelerator}', f'--version={version}', *spot)]


def install_command(python: str) -> str:
    """Remote: a Python >= 3.11 venv (jax 0.10 needs 3.11; the TPU images ship 3.10) with cratemae[tpu]."""
    return (
        f'sudo apt-get update -qq && sudo apt-get install -y -qq {python} {python}-venv git && '
        f'cd {REMOTE_DIR} && {python} -m venv .venv && .venv/bin/pip install -q -U pip && '
        ".venv/bin/pip install -q -e \".[tpu]\""
    )


def setup_commands(t: Target, source='copy', repo=None, branch=None, python='python3.11'):
    install = install_command(shlex.quote(python))
    if source == 'git':
        if not repo:
            raise ValueError('setup --source=git needs --repo=URL (the git URL every host clones).')
        branch = f' --branch={shlex.quote(branch)}' if branch else ''
        fetch = (
            f'sudo apt-get update -qq && sudo apt-get install -y -qq git && '
            f'if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} pull --ff-only; '
            f'else git clone{branch} {shlex.quote(repo)} {REMOTE_DIR}; fi'
        )
        return [t.ssh(fetch), t.ssh(install)]
    return [t.ssh(f'mkdir -p {REMOTE_DIR}'), t.scp_to_all(COPIED, REMOTE_DIR.replace('~/', '')), t.ssh(install)]


def train_command(name: str, workdir: str, overrides=()) -> str:
    """Remote: launch.train in the background on one host, detached from the ssh session, pid and log in ~."""
    flags_text = ' '.join(
        shlex.quote(o) for o in (f'--config=experiments/registry.py:{name}', f'--workdir={workdir}', *overrides)
    )
    # `;` rather than `&&` before nohup, so `&` backgrounds python itself and $! is its pid (for `stop`).
    return (
        f'cd {REMOTE_DIR} || exit 1; export JAX_COORDINATOR_ADDRESS={_WORKER0_IP}:{COORDINATOR_PORT}; '
        f'nohup .venv/bin/python -m launch.train {flags_text} > {LOG} 2>&1 < /dev/null & echo $! > {PID}'
    )


def run_commands(t: Target, name, workdir, overrides=()):
    """`python -m launch.train --config=experiments/registry.py:NAME --workdir=WORKDIR OVERRIDES` on every host."""
    return [t.ssh(train_command(name, workdir, overrides))]


def tail_commands(t: Target, lines=100):
    return [t.ssh(f'tail -n {int(lines)} -F {LOG}', worker='0')]


def stop_commands(t: Target):
    # SIGTERM is what a preemption sends: the loop ORs the flag over the hosts, all save the same step and exit.
    return [t.ssh(f'kill -TERM $(cat {PID})')]


def delete_commands(t: Target, queued=False):
    if queued:
        return [t.queued('delete', '--force', '--quiet')]  # --force also deletes the node it created
    return [t.tpu_vm('delete', '--quiet')]


def data_commands(t: Target, f):
    """With ``f.data`` = gs://...: make the prepared tfds data readable at pod.LOCAL_DIR on every host."""
    return [t.ssh(pod.host_command(f.data, f.data_mode))] if f.data else []


def pod_run_commands(t: Target, f, overrides=()):
    """``run``: launch.train of ``f.config`` on every host, its workdir in the bucket every host writes to."""
    if f.config is None:
        raise ValueError('run needs --config=NAME (a registered experiment, e.g. crate_mae_base).')
    if not f.workdir and not f.bucket:
        raise ValueError(
            'run needs --bucket=gs://BUCKET (workdir gs://BUCKET/NAME) or --workdir: every host must '
            'write the checkpoints to the same place, so a local path will not do on a pod.'
        )
    workdir = f.workdir or f'{f.bucket.rstrip("/")}/{f.config.name}'
    if f.data:  # mounted again (a no-op when it is), e.g. after a host restart; then read from there
        overrides = pod.train_overrides() + list(overrides)
    return data_commands(t, f) + run_commands(t, f.config.name, workdir, overrides)


SUBCOMMANDS = {
    'create': lambda t, f, _: create_commands(t, f.accelerator_type, f.version, f.spot, f.queued),
    'setup': lambda t, f, _: setup_commands(t, f.source, f.repo, f.branch, f.python) + data_commands(t, f),
    'run': pod_run_commands,
    'tail': lambda t, f, _: tail_commands(t, f.lines),
    'stop': lambda t, f, _: stop_commands(t),
    'delete': lambda t, f, _: delete_commands(t, f.queued),
}


def subcommand(name, t: Target, f, overrides=()):
    """The gcloud argv lists of subcommand ``name`` of ``launch.tpu_pod``, ``f`` carrying its flags as attributes and
    ``overrides`` the --config.KEY=VALUE arguments ``run`` passes on."""
    return SUBCOMMANDS[name](t, f, overrides)


def resolve_target(name, project=None, zone=None) -> Target:
    """Name, project, zone; project and zone from gcloud's config when not given; ValueError names what is missing."""
    if not name:
        raise ValueError('--name is required (the TPU VM name).')
    values = {'project': project or gcloud_default('project'), 'zone': zone or gcloud_default('compute/zone')}
    missing = [k for k, v in values.items() if not v]
    if missing:
        how = (
            'gcloud is not installed, so there is no gcloud config default'
            if not shutil.which('gcloud')
            else 'and no default in gcloud config (gcloud config set project P / gcloud config set compute/zone Z)'
        )
        raise ValueError(f'Missing {" and ".join("--" + k for k in missing)} ({how}).')
    return Target(name, values['project'], values['zone'])


def shell_join(cmd) -> str:
    """shlex.join, but --flag=VALUE quotes only VALUE (--command='...'), as a person would type it."""

    def one(arg):
        flag, eq, value = arg.partition('=')
        if arg.startswith('--') and eq and shlex.quote(value) != value:
            return f'{flag}={shlex.quote(value)}'
        return shlex.quote(arg)

    return ' '.join(one(a) for a in cmd)
