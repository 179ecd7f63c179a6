"""launch.tpu_pod: the gcloud command lines it prints (parsed back and checked piece by piece), the remote shell
commands (syntax-checked with bash -n, and the `run` one executed against a fake host), and local validation."""

import os
import shlex
import shutil
import subprocess
import textwrap

import pytest

from cratemae import tpu_vm
from launch import cli
from launch import tpu_pod

V4 = ['--name=crate-v4', '--project=my-project', '--zone=us-central2-b', '--dry_run']
V5E = ['--name=crate-v5e', '--project=my-project', '--zone=us-west4-a', '--dry-run']


def _printed(*argv):
    """Each printed command line, split back into its argv as the shell would."""
    lines = []

    class Out:
        def write(self, text):
            lines.extend(line for line in text.splitlines() if line)

        def flush(self):
            pass

    code = cli.run(lambda positional: tpu_pod.main(positional, out=Out()), tpu_pod.FLAGS, list(argv))
    assert code == 0
    return [shlex.split(line) for line in lines]


def _remote(cmd):
    """The --command= of an ssh argv, after checking the ssh part."""
    assert cmd[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
    (command,) = [a.split('=', 1)[1] for a in cmd if a.startswith('--command=')]
    check = subprocess.run(['bash', '-n', '-c', command], capture_output=True, text=True)
    assert check.returncode == 0, (command, check.stderr)
    return command


def _gcloud_flags(cmd):
    return {a.split('=', 1)[0]: a.split('=', 1)[1] if '=' in a else True for a in cmd if a.startswith('--')}


def test_create_on_v4_and_a_queued_spot_v5e():
    (cmd,) = _printed('create', '--accelerator_type=v4-32', *V4)
    assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'crate-v4']
    assert _gcloud_flags(cmd) == {
        '--project': 'my-project',
        '--zone': 'us-central2-b',
        '--accelerator-type': 'v4-32',
        '--version': 'tpu-ubuntu2204-base',
    }
    (cmd,) = _printed('create', '--accelerator-type=v5e-256', '--spot', '--queued', *V5E)
    assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'crate-v5e']
    assert _gcloud_flags(cmd) == {
        '--project': 'my-project',
        '--zone': 'us-west4-a',
        '--node-id': 'crate-v5e',
        '--accelerator-type': 'v5litepod-256',
        '--runtime-version': 'v2-alpha-tpuv5-lite',
        '--spot': True,
    }


def test_setup_copies_the_package_and_installs_it_with_valid_shell():
    mkdir, scp, install = _printed('setup', *V4)
    assert _remote(mkdir) == 'mkdir -p ~/cratemae' and _gcloud_flags(mkdir)['--worker'] == 'all'
    assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and scp[-1] == 'crate-v4:cratemae'
    assert set(tpu_vm.COPIED) <= set(scp) and all(os.path.exists(os.path.join(cli.REPO, p)) for p in tpu_vm.COPIED)
    assert '.venv/bin/pip install -q -e ".[tpu]"' in _remote(install)
    clone, install = _printed(
        'setup', '--source=git', '--repo=https://example.com/me/cratemae.git', '--branch=dev', *V5E
    )
    assert 'git clone --branch=dev https://example.com/me/cratemae.git ~/cratemae' in _remote(clone)
    _remote(install)


def test_run_executes_launch_train_with_the_overrides_on_a_fake_host(tmp_path):
    """The remote `run` command, run by bash with HOME, curl and the venv's python faked: python gets exactly the
    flags (quoting survives two shells), the coordinator is worker 0's address, and the pid file names python."""
    (cmd,) = _printed(
        '--dry-run',
        'run',
        '--name=crate-v5e',
        '--project=p',
        '--zone=z',
        '--config=crate_mae_large',
        '--bucket=gs://b/',
        '--config.model.remat=full',
        "--config.sharding_rules=(('.*', 'fsdp_largest'),)",
        '--allow-config-change',
    )
    command = _remote(cmd)
    home, bin_dir = tmp_path / 'home', tmp_path / 'bin'
    (home / 'cratemae' / '.venv' / 'bin').mkdir(parents=True)
    bin_dir.mkdir()
    fake_python = home / 'cratemae' / '.venv' / 'bin' / 'python'
    fake_python.write_text(
        textwrap.dedent('''\
        #!/usr/bin/env python3
        import json, os, sys
        json.dump({'argv': sys.argv[1:], 'coordinator': os.environ['JAX_COORDINATOR_ADDRESS'], 'pid': os.getpid(),
                   'cwd': os.getcwd()}, open(os.path.join(os.environ['HOME'], 'ran.json'), 'w'))
        ''')
    )
    (bin_dir / 'curl').write_text('#!/bin/sh\necho unknown:unknown:10.0.0.7,unknown:unknown:10.0.0.8\n')
    for f in (fake_python, bin_dir / 'curl'):
        f.chmod(0o755)
    env = {'HOME': str(home), 'PATH': f'{bin_dir}:{os.environ["PATH"]}'}
    subprocess.run(['bash', '-c', command + '; wait'], env=env, check=True, timeout=60)
    import json

    ran = json.loads((home / 'ran.json').read_text())
    assert ran['argv'] == [
        '-m',
        'launch.train',
        '--config=experiments/registry.py:crate_mae_large',
        '--workdir=gs://b/crate_mae_large',
        '--config.model.remat=full',
        "--config.sharding_rules=(('.*', 'fsdp_largest'),)",
        '--allow_config_change',
    ]
    assert ran['coordinator'] == '10.0.0.7:8476' and ran['cwd'] == str(home / 'cratemae')
    assert int((home / 'cratemae-train.pid').read_text()) == ran['pid']


def test_tail_stop_delete():
    (tail,) = _printed('tail', '--lines=5', *V4)
    assert _remote(tail) == 'tail -n 5 -F ~/cratemae-train.log' and _gcloud_flags(tail)['--worker'] == '0'
    (stop,) = _printed('stop', *V4)
    assert _remote(stop) == 'kill -TERM $(cat ~/cratemae-train.pid)'
    (delete,) = _printed('delete', *V4)
    assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'crate-v4'] and '--quiet' in delete
    (delete,) = _printed('delete', '--queued', *V5E)
    assert delete[3:5] == ['queued-resources', 'delete'] and {'--force', '--quiet'} <= set(delete)


def test_default_runtime_per_generation():
    assert [
        tpu_vm.default_version(tpu_vm.accelerator_type(a))
        for a in ('v4-8', 'v5e-16', 'v5litepod-4', 'v5p-128', 'v6e-256')
    ] == ['tpu-ubuntu2204-base', 'v2-alpha-tpuv5-lite', 'v2-alpha-tpuv5-lite', 'v2-alpha-tpuv5', 'v2-alpha-tpuv6e']
    with pytest.raises(ValueError, match='--version'):
        tpu_vm.default_version('v7x-64')


@pytest.mark.parametrize(
    'argv, message',
    [
        (['run', '--config=crate_mae_base; touch x', '--bucket=gs://b'], 'Unknown experiment'),
        (['run', '--config=crate_mae_base', '--bucket=gs://b', '--config.model.widht=3'], 'widht'),
        (['run', '--config=crate_mae_base', '--bucket=gs://b', '--config.model.heads=5'], 'heads'),
        (
            [
                'run',
                '--config=crate_mae_base',
                '--bucket=gs://b',
                '--config.train.global_batch=100',
                '--config.optim.accum_steps=3',
            ],
            'accum_steps',
        ),
        (['run', '--config=crate_mae_base'], '--bucket'),
        (['run', '--bucket=gs://b'], '--config'),
        (['stop', '--config=crate_mae_base', '--config.train.steps=1'], 'stop takes no --config'),
        (['stop', '--config.train.steps=1'], 'config.train.steps'),
        (['create'], '--accelerator_type'),
        (['launch'], 'subcommand'),
    ],
)
def test_bad_runs_are_refused_here_before_any_command(argv, message, capsys):
    assert cli.run(tpu_pod.main, tpu_pod.FLAGS, [*argv, '--name=x', '--project=p', '--zone=z', '--dry_run']) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ''


def test_missing_gcloud_project_and_zone_are_named(monkeypatch, capsys):
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    assert cli.run(tpu_pod.main, tpu_pod.FLAGS, ['stop', '--name=x', '--project=p', '--zone=z']) == 2
    assert 'gcloud is not installed' in capsys.readouterr().err
    assert cli.run(tpu_pod.main, tpu_pod.FLAGS, ['stop', '--name=x', '--dry_run']) == 2
    assert 'Missing --project and --zone (gcloud is not installed' in capsys.readouterr().err
    assert cli.run(tpu_pod.main, tpu_pod.FLAGS, ['stop', '--name=x', '--zone=z', '--dry_run']) == 2
    assert 'Missing --project (' in capsys.readouterr().err


def test_setup_and_run_make_the_prepared_data_readable_on_every_host():
    mount = _remote(_printed('setup', '--data=gs://my-bucket/tfds', *V4)[-1])
    assert 'gcsfuse --implicit-dirs --only-dir tfds my-bucket /mnt/tfds' in mount
    assert 'mountpoint -q /mnt/tfds ||' in mount and 'apt-get install -y -qq gcsfuse' in mount
    copy = _remote(_printed('setup', '--data=gs://my-bucket/tfds', '--data_mode=copy', *V4)[-1])
    assert copy.endswith('gcloud storage rsync --recursive gs://my-bucket/tfds /mnt/tfds')
    whole_bucket = _remote(_printed('setup', '--data=gs://my-bucket', *V4)[-1])
    assert 'gcsfuse --implicit-dirs my-bucket /mnt/tfds' in whole_bucket
    run = _printed(
        'run',
        '--config=crate_mae_base',
        '--bucket=gs://my-bucket',
        '--data=gs://my-bucket/tfds',
        '--config.train.eval_batch=256',
        *V4,
    )
    assert _remote(run[0]) == mount  # remounted if a host restarted, a no-op otherwise
    train = _remote(run[1])
    assert '--config.data.data_dir=/mnt/tfds' in train and '--config.train.eval_batch=256' in train
    assert train.index('--config.data.data_dir=/mnt/tfds') < train.index('--config.train.eval_batch=256')
    assert 'data_dir' not in _remote(_printed('run', '--config=crate_mae_base', '--bucket=gs://b', *V4)[0])


def test_bad_data_url_is_a_usage_error(capsys):
    assert cli.run(tpu_pod.main, tpu_pod.FLAGS, ['setup', '--data=/local/tfds', *V4]) == 2
    assert 'must be gs://BUCKET[/PREFIX]' in capsys.readouterr().err
