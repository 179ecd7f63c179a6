"""The sbatch script that runs cratemae on a Slurm GPU cluster (``python -m launch.slurm`` writes and submits it).

One process per node, each seeing all of its node's GPUs: ``srun`` starts the same ``python -m launch.train`` once
on every node of the allocation. ``cratemae.distributed`` calls ``jax.distributed.initialize()`` when it sees
``SLURM_NTASKS`` > 1, and JAX's Slurm detection reads the coordinator (the first host of
``SLURM_STEP_NODELIST``), the process count (``SLURM_NTASKS``) and the process id (``SLURM_PROCID``) from the
environment srun sets. That detection would also restrict each process to the one GPU numbered
``SLURM_LOCALID`` (it assumes a process per GPU); with one process per node that is GPU 0 alone, so the script
exports ``JAX_LOCAL_DEVICE_IDS=0,...,G-1``, which ``jax.distributed.initialize`` reads instead. On one node
there is one process and no distributed start-up at all.

Time limit and requeue: ``--signal=B:USR1@S`` makes Slurm signal the batch shell S seconds before the time limit.
The shell then sends SIGTERM to the training processes (``scancel --signal=TERM``, which signals the job steps;
srun itself does not reliably pass a SIGTERM on as one), the engine saves a checkpoint at the next step boundary and
exits with status 0, and the shell requeues the job (``scontrol requeue``). The requeued job runs the same
command, which resumes from the newest checkpoint in the workdir. A preemption by a job of higher priority sends
SIGTERM to the processes directly, and Slurm requeues the job itself (``--requeue``).

Every value that reaches the shell is quoted with shlex; values in ``#SBATCH`` lines, which sbatch parses itself,
must be plain tokens (checked here).
"""

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r'^(\d+)(?::(\d+))?(?::(\d+))?$|^(\d+)-(\d+)(?::(\d+))?(?::(\d+))?$')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+:@%,-]*$')  # job names, partitions, accounts, GPU types
# An extra #SBATCH option: --key or --key=value, one token with no quotes, backslashes or spaces (sbatch would split
# or unquote them) and no control characters (a newline would end the comment and start a shell line).
_EXTRA = re.compile(r'^--[a-z][a-z0-9-]*(=[!#-&(-\[\]-~]+)?$')


@dataclasses.dataclass(frozen=True)
class Job:
    """What sbatch allocates and how the script runs.

    cpus_per_node None takes whole nodes (``--exclusive --mem=0``: all their CPUs and memory); a number asks for
    that many CPUs per node and shares the node. signal_seconds is the warning before the time limit: it must cover
    up to train.log_every steps (on several nodes the processes agree to stop at log steps only) and one save.
    """

    name: str
    nodes: int
    gpus_per_node: int
    code_dir: str
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    gpu_type: str | None = None
    cpus_per_node: int | None = None
    signal_seconds: int = 120
    log: str = 'slurm-%x-%j.out'
    extra: tuple[str, ...] = ()

    def __post_init__(self):
        check_job(self)


def time_limit_seconds(text: str) -> int:
    """Slurm's --time text in seconds (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); ValueError for anything else."""
    match = _TIME.fullmatch(text)
    if not match:
        raise ValueError(
            f'--time={text!r} is not a Slurm time limit; use MINUTES, HOURS:MINUTES:SECONDS or DAYS-HOURS[:MINUTES], '
            'e.g. --time=24:00:00 or --time=2-00:00.'
        )
    a, b, c, days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if match.group(4) is None:  # M, M:S or H:M:S
        return a * 3600 + b * 60 + c if match.group(3) else a * 60 + b
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def check_job(job: Job) -> None:
    """ValueError naming the flag for anything sbatch would reject or misread."""
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ValueError(f'--nodes={job.nodes} and --gpus_per_node={job.gpus_per_node} must both be at least 1.')
    for flag, value in (
        ('job_name', job.name),
        ('partition', job.partition),
        ('account', job.account),
        ('gpu_type', job.gpu_type),
    ):
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(
                f'--{flag}={value!r}: use letters, digits and _ . + : @ % , - only (it goes into an #SBATCH line).'
            )
    if job.cpus_per_node is not None and job.cpus_per_node < 1:
        raise ValueError(f'--cpus_per_node={job.cpus_per_node} must be at least 1 (or unset for whole nodes).')
    if job.signal_seconds < 1:
        raise ValueError(f'--signal_seconds={job.signal_seconds} must be at least 1.')
    if job.time is not None and time_limit_seconds(job.time) <= job.signal_seconds:
        raise ValueError(
            f'--time={job.time} leaves no time to train before the checkpoint signal --signal_seconds='
            f'{job.signal_seconds}; raise --time or lower --signal_seconds.'
        )
    if not re.fullmatch(r'[!#-&(-\[\]-~]+', job.log):
        raise ValueError(f'--log={job.log!r}: one path without spaces, quotes or backslashes (an #SBATCH line).')
    for option in job.extra:
        if not _EXTRA.fullmatch(option):
            raise ValueError(
                f'--sbatch={option!r}: give one sbatch option as --key or --key=value, without spaces, quotes or '
                'backslashes (it becomes an #SBATCH line).'
            )


def directives(job: Job) -> list[str]:
    """The sbatch options, one per #SBATCH line."""
    gres = f'gpu:{job.gpu_type}:{job.gpus_per_node}' if job.gpu_type else f'gpu:{job.gpus_per_node}'
    options = [
        f'--job-name={job.name}',
        f'--nodes={job.nodes}',
        '--ntasks-per-node=1',
        f'--gres={gres}',
    ]
    options += ['--exclusive', '--mem=0'] if job.cpus_per_node is None else [f'--cpus-per-task={job.cpus_per_node}']
    options += [f'--partition={job.partition}'] if job.partition else []
    options += [f'--account={job.account}'] if job.account else []
    options += [f'--time={job.time}'] if job.time else []
    options += [
        f'--output={job.log}',
        '--open-mode=append',  # a requeued job continues the same log
        '--requeue',
        f'--signal=B:USR1@{job.signal_seconds}',
    ]
    return options + list(job.extra)


def srun_command(job: Job, train_argv) -> str:
    """srun: one task per node with all of the node's CPUs (srun does not inherit sbatch's --cpus-per-task), and
    the whole step ends if one process fails (the others would wait in a collective forever)."""
    cpus = str(job.cpus_per_node) if job.cpus_per_node else '"$SLURM_CPUS_ON_NODE"'
    srun = f'srun --nodes={job.nodes} --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=1'
    return f'{srun} {shlex.join(train_argv)}'


def train_argv(python: str, name: str, workdir: str, overrides=()) -> list[str]:
    """What every node runs: launch.train on the registry's experiment NAME with the --config.KEY overrides."""
    return [
        python,
        '-m',
        'launch.train',
        f'--config=experiments/registry.py:{name}',
        f'--workdir={workdir}',
        *overrides,
    ]


def batch_script(job: Job, argv) -> str:
    """The whole sbatch script for ``job`` running ``argv`` (from ``train_argv``) on every node."""
    devices = ','.join(str(i) for i in range(job.gpus_per_node))
    header = '\n'.join(f'#SBATCH {option}' for option in directives(job))
    return f"""#!/bin/bash
{header}
#
# Written by python -m launch.slurm: cratemae on {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one process per node.
# Near the time limit (USR1): SIGTERM to the processes, checkpoint, requeue; the requeued job resumes.

: "${{SLURM_JOB_ID:?submit this script with sbatch}}"
cd {shlex.quote(job.code_dir)} || exit 1
export PYTHONUNBUFFERED=1
# JAX's Slurm detection would give each process only GPU number SLURM_LOCALID (0 here): give it all of them.
export JAX_LOCAL_DEVICE_IDS={devices}
echo "cratemae: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, nodes ${{SLURM_JOB_NODELIST:-?}}"

time_limit_near=0
on_time_limit() {{
  time_limit_near=1
  echo "cratemae: the time limit is near: every process checkpoints and exits, then the job is requeued"
  scancel --signal=TERM "$SLURM_JOB_ID"
}}
trap on_time_limit USR1
trap 'echo "cratemae: SIGTERM: waiting for the processes to checkpoint and exit"' TERM

{srun_command(job, argv)} &
train_pid=$!
while true; do
  wait "$train_pid"
  status=$?
  kill -0 "$train_pid" 2>/dev/null || break  # a trapped signal ends wait early: wait again until srun is gone
done
if [ "$time_limit_near" = 1 ] && [ "$status" = 0 ]; then
  echo "cratemae: requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in the workdir"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def sbatch_command(script_path: str | None) -> list[str]:
    """sbatch FILE, or plain sbatch reading the script from stdin (Slurm keeps a copy either way, for requeues)."""
    return ['sbatch', script_path] if script_path else ['sbatch']


def check_submission(job, python):
    """Before sbatch: sbatch is here, and the paths the nodes use exist here (a shared filesystem shows them the
    same). Raises ValueError naming what is missing and the flags that set it."""
    if not shutil.which('sbatch'):
        raise ValueError('sbatch is not on PATH: run this on the cluster\'s login node, or drop --submit.')
    interpreter = os.path.join(job.code_dir, python)
    if not os.path.isfile(os.path.join(job.code_dir, 'launch', 'train.py')) or not os.access(interpreter, os.X_OK):
        raise ValueError(
            f'{job.code_dir} holds no cratemae checkout with {python}: pass --code_dir and --python as the nodes '
            "see them, or create the venv there (python3 -m venv .venv && .venv/bin/pip install -e '.[gpu]')."
        )


def deliver(job, script, command, out_file, python, dry_run=False, submit=False, out=None):
    """What ``launch.slurm`` does with a script: print it (and the sbatch command) on a dry run; else write it to
    ``out_file`` or print it, and with ``submit`` run ``command`` (sbatch) on it after ``check_submission``. Messages
    go to stderr, the script to ``out`` (stdout). Returns the exit status."""
    out = out or sys.stdout
    if dry_run:
        print(script, end='', file=out)
        wrote = f'write {out_file} and ' if out_file else ''
        stdin = '' if out_file else ' (the script on its stdin)'
        print(f'slurm: dry run; would {wrote}run: {shlex.join(command)}{stdin}', file=sys.stderr)
        return 0
    if submit:
        check_submission(job, python)
    if out_file:
        with open(out_file, 'w') as f:
            f.write(script)
        print(f'slurm: wrote {out_file}', file=sys.stderr)
    elif not submit:
        print(script, end='', file=out)
    if not submit:
        print(f'slurm: submit with --submit, or: {shlex.join(sbatch_command(out_file or "FILE"))}', file=sys.stderr)
        return 0
    print(shlex.join(command), file=out, flush=True)
    return 1 if subprocess.run(command, input=None if out_file else script, text=True).returncode else 0
