"""launch.slurm / cratemae.slurm: the sbatch script it writes (syntax-checked with bash -n, its #SBATCH lines read
back, and run by bash with srun, scancel, scontrol and sbatch faked on PATH), and the checks made before anything is
written or submitted. No Slurm cluster is involved: what Slurm itself does with the script is not tested here."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cratemae import slurm
from launch import cli
from launch import slurm as slurm_launcher

JOB_ID = '4242'
# Shell syntax in every value that reaches the script; none of it may run, all of it must reach python unchanged.
NASTY = """a b;touch PWNED $(touch PWNED2) `touch PWNED3` 'q' "d" \\ $HOME"""


def _run(*argv):
    """(status, stdout) of launch.slurm with these flags."""
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    code = cli.run(lambda positional: slurm_launcher.main(positional, out=Out()), slurm_launcher.FLAGS, list(argv))
    return code, ''.join(lines)


def _script(*argv):
    code, text = _run('--dry_run', *argv)
    assert code == 0
    check = subprocess.run(['bash', '-n'], input=text, capture_output=True, text=True)
    assert check.returncode == 0, (text, check.stderr)
    return text


def _directives(script):
    """The #SBATCH options, as sbatch reads them: {'--key': 'value' or True}."""
    options = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith('#SBATCH ')]
    return {o.split('=', 1)[0]: o.split('=', 1)[1] if '=' in o else True for o in options}


def _fake_bin(tmp_path, srun_body):
    """A bin/ with srun (python running `srun_body` after recording argv, cwd and env), scancel and scontrol (record
    their argv; scancel --signal=TERM signals the fake srun, as Slurm signals the job step) and sbatch."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    record = tmp_path / 'calls'
    record.mkdir()
    tools = {
        'srun': f"""\
            #!{sys.executable}
            import json, os, signal, sys, time
            json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'pid': os.getpid(),
                       'devices': os.environ.get('JAX_LOCAL_DEVICE_IDS'),
                       'unbuffered': os.environ.get('PYTHONUNBUFFERED')}}, open({str(record / 'srun.json')!r}, 'w'))
            {{body}}""",
        'scancel': f"""\
            #!{sys.executable}
            import json, os, signal, sys
            json.dump(sys.argv[1:], open({str(record / 'scancel.json')!r}, 'w'))
            if '--signal=TERM' in sys.argv:
                os.kill(json.load(open({str(record / 'srun.json')!r}))['pid'], signal.SIGTERM)
            """,
        'scontrol': f"""\
            #!{sys.executable}
            import json, sys
            json.dump(sys.argv[1:], open({str(record / 'scontrol.json')!r}, 'w'))
            """,
        'sbatch': f"""\
            #!{sys.executable}
            import json, sys
            json.dump({{'argv': sys.argv[1:], 'stdin': sys.stdin.read()}}, open({str(record / 'sbatch.json')!r}, 'w'))
            print('Submitted batch job {JOB_ID}')
            """,
    }
    for name, text in tools.items():
        path = bin_dir / name
        path.write_text(textwrap.dedent(text).replace('{body}', textwrap.dedent(srun_body)))
        path.chmod(0o755)
    return bin_dir, record


def _calls(record, name):
    path = record / f'{name}.json'
    return json.loads(path.read_text()) if path.exists() else None


def _start(script, tmp_path, bin_dir):
    path = tmp_path / 'job.sbatch'
    path.write_text(script)
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_ID': JOB_ID, 'SLURM_CPUS_ON_NODE': '32'}
    return subprocess.Popen(['bash', str(path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f'{path} never appeared'
        time.sleep(0.05)


def test_dry_run_prints_a_valid_script_whose_directives_carry_the_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = _script(
        '--config=crate_mae_base',
        '--nodes=4',
        '--gpus_per_node=8',
        '--partition=gpu',
        '--account=my-lab',
        '--time=2-00:00',
        '--job_name=base-run',
        '--sbatch=--qos=high',
        '--out=job.sbatch',
    )
    assert script.startswith('#!/bin/bash\n') and not (tmp_path / 'job.sbatch').exists()
    assert 'would write job.sbatch and run: sbatch job.sbatch' in capsys.readouterr().err
    assert _directives(script) == {
        '--job-name': 'base-run',
        '--nodes': '4',
        '--ntasks-per-node': '1',
        '--gres': 'gpu:8',
        '--exclusive': True,
        '--mem': '0',
        '--partition': 'gpu',
        '--account': 'my-lab',
        '--time': '2-00:00',
        '--output': 'slurm-%x-%j.out',
        '--open-mode': 'append',
        '--requeue': True,
        '--signal': 'B:USR1@120',
        '--qos': 'high',
    }
    assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n' in script
    shared = _directives(
        _script('--config=crate_mae_base', '--gpus_per_node=2', '--gpu_type=a100', '--cpus_per_node=16')
    )
    assert shared['--gres'] == 'gpu:a100:2' and shared['--cpus-per-task'] == '16' and '--exclusive' not in shared
    assert shared['--job-name'] == 'crate_mae_base' and '--partition' not in shared and '--time' not in shared


def test_the_script_runs_launch_train_on_every_node_with_every_value_quoted(tmp_path):
    """Run by bash with a fake srun: python gets exactly the flags, nothing in them runs, the working directory is
    the code directory, and JAX sees all the node's GPUs."""
    code_dir = tmp_path / f'code {NASTY}'
    code_dir.mkdir()
    workdir = tmp_path / f'work {NASTY}'
    script = _script(
        '--config=crate_mae_base',
        '--nodes=2',
        '--gpus_per_node=4',
        f'--code_dir={code_dir}',
        f'--workdir={workdir}',
        f'--python=/opt/{NASTY}/python',
        f'--data_dir=/data/{NASTY}',
        '--config.model.remat=full',
        f'--config.data.image_key={NASTY}',
        '--allow_config_change',
    )
    bin_dir, record = _fake_bin(tmp_path, 'sys.exit(0)')
    job = _start(script, tmp_path, bin_dir)
    assert job.wait(timeout=60) == 0
    ran = _calls(record, 'srun')
    assert ran['argv'] == [
        '--nodes=2',
        '--ntasks-per-node=1',
        '--cpus-per-task=32',
        '--kill-on-bad-exit=1',
        f'/opt/{NASTY}/python',
        '-m',
        'launch.train',
        '--config=experiments/registry.py:crate_mae_base',
        f'--workdir={workdir}',
        f'--config.data.data_dir=/data/{NASTY}',
        '--config.model.remat=full',
        f'--config.data.image_key={NASTY}',
        '--allow_config_change',
    ]
    assert ran['cwd'] == str(code_dir) and ran['devices'] == '0,1,2,3' and ran['unbuffered'] == '1'
    assert not [p for p in (tmp_path, code_dir) for f in os.listdir(p) if f.startswith('PWNED')]
    assert _calls(record, 'scancel') is None and _calls(record, 'scontrol') is None


@pytest.mark.parametrize('srun_status', [0, 3])
def test_near_the_time_limit_the_processes_checkpoint_and_the_job_requeues(tmp_path, srun_status):
    """USR1 (sbatch --signal=B:USR1@S) to the batch shell: it sends SIGTERM to the step (scancel --signal=TERM),
    waits for the processes to save and exit, and requeues the job, but only if they exited cleanly."""
    script = _script('--config=crate_mae_base', f'--code_dir={cli.REPO}')
    bin_dir, record = _fake_bin(
        tmp_path,
        f"""\
        def on_term(signum, frame):
            open({str(tmp_path / 'terminated')!r}, 'w').close()
            time.sleep(0.5)  # the checkpoint
            sys.exit({srun_status})
        signal.signal(signal.SIGTERM, on_term)
        open({str(tmp_path / 'started')!r}, 'w').close()
        time.sleep(60)
        sys.exit(99)
        """,
    )
    job = _start(script, tmp_path, bin_dir)
    _wait_for(tmp_path / 'started')
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=60) == srun_status
    assert (tmp_path / 'terminated').exists()
    assert _calls(record, 'scancel') == ['--signal=TERM', JOB_ID]
    assert _calls(record, 'scontrol') == (['requeue', JOB_ID] if srun_status == 0 else None)


def test_sigterm_to_the_batch_shell_waits_for_the_checkpoint_and_does_not_requeue(tmp_path):
    """Cancel or preemption: Slurm sends SIGTERM to the processes and the batch shell; the shell outlives the save
    and leaves requeueing to Slurm (a preempted job with --requeue) or to no one (scancel)."""
    script = _script('--config=crate_mae_base', f'--code_dir={cli.REPO}')
    bin_dir, record = _fake_bin(
        tmp_path,
        f"""\
        def on_term(signum, frame):
            time.sleep(1.0)  # the checkpoint
            open({str(tmp_path / 'saved')!r}, 'w').close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open({str(tmp_path / 'started')!r}, 'w').close()
        time.sleep(60)
        """,
    )
    job = _start(script, tmp_path, bin_dir)
    _wait_for(tmp_path / 'started')
    job.send_signal(signal.SIGTERM)
    os.kill(_calls(record, 'srun')['pid'], signal.SIGTERM)
    assert job.wait(timeout=60) == 0 and (tmp_path / 'saved').exists()
    assert _calls(record, 'scontrol') is None and _calls(record, 'scancel') is None


def test_submit_runs_sbatch_on_the_written_script_or_on_stdin(tmp_path, monkeypatch):
    bin_dir, record = _fake_bin(tmp_path, 'sys.exit(0)')
    monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
    monkeypatch.chdir(tmp_path)
    flags = ['--config=crate_mae_base', '--nodes=2', '--partition=gpu', f'--python={sys.executable}']
    expected = _script(*flags)
    code, out = _run(*flags, '--submit', '--out=job.sbatch')
    assert code == 0 and out == 'sbatch job.sbatch\n'
    assert _calls(record, 'sbatch') == {'argv': ['job.sbatch'], 'stdin': ''}
    assert (tmp_path / 'job.sbatch').read_text() == expected
    code, out = _run(*flags, '--submit')
    assert code == 0 and out == 'sbatch\n'
    assert _calls(record, 'sbatch') == {'argv': [], 'stdin': expected}


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--config=crate_mae_bsae'], 'Unknown experiment'),
        (['--config=crate_mae_base; touch PWNED'], 'Unknown experiment'),
        (['--config=crate_mae_base', '--config.model.widht=3'], 'widht'),
        (['--config=crate_mae_base', '--config.model.heads=5'], 'heads'),
        (['--config=crate_mae_base', '--config.train.global_batch=100', '--config.optim.accum_steps=3'], 'accum_steps'),
        (['--nodes=2'], '--config=NAME is required'),
        # 2 nodes x 8 GPUs = 16 data-parallel devices: a batch of 100 does not split over them
        (['--config=crate_mae_base', '--nodes=2', '--config.train.global_batch=100'], 'over the 16 devices'),
        (
            [
                '--config=crate_mae_base',
                '--nodes=3',
                '--gpus_per_node=1',
                '--config.train.global_batch=3072',
                '--config.train.eval_batch=64',
            ],
            'eval_batch=64',
        ),
        (['--config=crate_mae_base', '--nodes=0'], '--nodes=0'),
        (['--config=crate_mae_base', '--time=1 day'], "--time='1 day' is not a Slurm time limit"),
        (['--config=crate_mae_base', '--time=2', '--signal_seconds=120'], 'leaves no time to train'),
        (['--config=crate_mae_base', '--partition=gpu\ntouch PWNED'], '--partition='),
        (['--config=crate_mae_base', '--partition=gpu\n'], '--partition='),
        (['--config=crate_mae_base', '--time=30\n'], 'is not a Slurm time limit'),
        (['--config=crate_mae_base', '--sbatch=--qos=high\ntouch PWNED'], '--sbatch='),
        (['--config=crate_mae_base', '--sbatch=qos=high'], '--sbatch='),
        (['--config=crate_mae_base', '--log=my log'], '--log='),
        (['--config=crate_mae_base', f'--python={sys.executable}', '--code_dir=/no/such/dir'], 'no cratemae checkout'),
    ],
)
def test_bad_input_exits_2_before_anything_is_written_or_submitted(argv, message, tmp_path, monkeypatch, capsys):
    bin_dir, record = _fake_bin(tmp_path, 'sys.exit(0)')
    monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
    monkeypatch.chdir(tmp_path)
    if '--python' not in str(argv):
        argv = [*argv, f'--python={sys.executable}']
    assert _run(*argv, '--submit', '--out=job.sbatch') == (2, '')
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'job.sbatch').exists() and _calls(record, 'sbatch') is None
    assert not [f for f in os.listdir(tmp_path) if f.startswith('PWNED')]


def test_submit_without_sbatch_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('PATH', str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert _run('--config=crate_mae_base', '--submit', '--out=job.sbatch') == (2, '')
    assert 'sbatch is not on PATH' in capsys.readouterr().err and not (tmp_path / 'job.sbatch').exists()


def test_time_limits_in_slurm_formats():
    assert [slurm.time_limit_seconds(t) for t in ('30', '30:15', '24:00:00', '2-00', '1-12:30', '1-00:00:05')] == [
        1800,
        1815,
        86400,
        172800,
        131400,
        86405,
    ]


def test_jax_slurm_detection_reads_what_srun_sets_and_needs_the_device_ids(monkeypatch):
    """The assumption the script rests on (jax 0.10): JAX takes coordinator, count and id from srun's variables and,
    unless told the local device ids, restricts a process to GPU SLURM_LOCALID, one GPU per node here."""
    from jax._src import clusters

    from cratemae import distributed

    env = {
        'SLURM_JOB_ID': JOB_ID,
        'SLURM_STEP_NODELIST': 'gpu[003-004]',
        'SLURM_NTASKS': '2',
        'SLURM_PROCID': '1',
        'SLURM_LOCALID': '0',
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    port = int(JOB_ID) % 2**12 + 65535 - 2**12 + 1
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    assert detect(None, None, None, None, None, 300) == (f'gpu003:{port}', 2, 1, [0])
    assert detect(None, None, None, [0, 1, 2, 3], None, 300) == (f'gpu003:{port}', 2, 1, [0, 1, 2, 3])
    assert distributed.distributed_request(env) == ('SLURM_NTASKS=2', {})
