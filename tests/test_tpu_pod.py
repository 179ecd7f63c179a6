"""launch.tpu_pod prints the gcloud commands a user would type (checked verbatim; nothing is run: --dry-run)."""

import io

import pytest

from launch import tpu_pod

V4 = ['--name=crate-v4', '--project=my-project', '--zone=us-central2-b', '--dry-run']
V5E = ['--name=crate-v5e', '--project=my-project', '--zone=us-west4-a', '--dry-run']
INSTALL = ("--command='sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv git && "
           'cd ~/cratemae && python3.11 -m venv .venv && .venv/bin/pip install -q -U pip && '
           ".venv/bin/pip install -q -e \".[tpu]\"'")
COORDINATOR = ('export JAX_COORDINATOR_ADDRESS=$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/'
               'computeMetadata/v1/instance/attributes/worker-network-endpoints | cut -d, -f1 | cut -d: -f3):8476')


def _printed(*argv):
    out = io.StringIO()
    assert tpu_pod.main(list(argv), out=out) == 0
    return out.getvalue().splitlines()


def test_v4_32_create_setup_run_tail_stop_delete():
    ssh = 'gcloud compute tpus tpu-vm ssh crate-v4 --project=my-project --zone=us-central2-b'
    assert _printed('create', '--accelerator-type=v4-32', *V4) == [
        ('gcloud compute tpus tpu-vm create crate-v4 --project=my-project --zone=us-central2-b '
        '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base')
    ]
    assert _printed('setup', *V4) == [
        f"{ssh} --worker=all --command='mkdir -p ~/cratemae'",
        ('gcloud compute tpus tpu-vm scp --project=my-project --zone=us-central2-b --worker=all --recurse '
        'setup.py README.md cratemae experiments launch crate-v4:cratemae'),
        f'{ssh} --worker=all {INSTALL}',
    ]
    assert _printed('run', '--experiment=crate_mae_base', '--bucket=gs://my-bucket', *V4) == [
        (f"{ssh} --worker=all --command='cd ~/cratemae || exit 1; {COORDINATOR}; nohup .venv/bin/python -m "
        'launch.train --config=experiments/registry.py:crate_mae_base --workdir=gs://my-bucket/crate_mae_base '
        "> ~/cratemae-train.log 2>&1 < /dev/null & echo $! > ~/cratemae-train.pid'")
    ]
    assert _printed('tail', *V4) == [f"{ssh} --worker=0 --command='tail -n 100 -F ~/cratemae-train.log'"]
    assert _printed('stop', *V4) == [f"{ssh} --worker=all --command='kill -TERM $(cat ~/cratemae-train.pid)'"]
    assert _printed('delete', *V4) == [
        'gcloud compute tpus tpu-vm delete crate-v4 --project=my-project --zone=us-central2-b --quiet'
    ]


def test_v5e_256_spot_queued_resource_git_setup_and_overrides():
    ssh = 'gcloud compute tpus tpu-vm ssh crate-v5e --project=my-project --zone=us-west4-a'
    assert _printed('create', '--accelerator-type=v5e-256', '--spot', '--queued', *V5E) == [
        ('gcloud compute tpus queued-resources create crate-v5e --project=my-project --zone=us-west4-a '
        '--node-id=crate-v5e --accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --spot')
    ]
    assert _printed('setup', '--source=git', '--repo=https://github.com/me/cratemae.git', *V5E) == [
        (f"{ssh} --worker=all --command='sudo apt-get update -qq && sudo apt-get install -y -qq git && "
        'if [ -d ~/cratemae/.git ]; then git -C ~/cratemae pull --ff-only; '
        "else git clone https://github.com/me/cratemae.git ~/cratemae; fi'"),
        f'{ssh} --worker=all {INSTALL}',
    ]
    assert _printed('run', '--experiment=crate_mae_large', '--bucket=gs://b/', '--config.train.eval_batch=256',
                    '--config.model.remat=full', *V5E) == [
        (f"{ssh} --worker=all --command='cd ~/cratemae || exit 1; {COORDINATOR}; nohup .venv/bin/python -m "
        'launch.train --config=experiments/registry.py:crate_mae_large --workdir=gs://b/crate_mae_large '
        '--config.train.eval_batch=256 --config.model.remat=full '
        "> ~/cratemae-train.log 2>&1 < /dev/null & echo $! > ~/cratemae-train.pid'")
    ]
    assert _printed('delete', '--queued', *V5E) == [
        'gcloud compute tpus queued-resources delete crate-v5e --project=my-project --zone=us-west4-a --force --quiet'
    ]


def test_default_runtime_per_generation():
    assert [tpu_pod.default_version(tpu_pod.accelerator_type(a)) for a in ('v4-8', 'v5e-16', 'v5litepod-4',
                                                                             'v5p-128', 'v6e-256')] == [
        'tpu-ubuntu2204-base', 'v2-alpha-tpuv5-lite', 'v2-alpha-tpuv5-lite', 'v2-alpha-tpuv5', 'v2-alpha-tpuv6e']
    with pytest.raises(tpu_pod.UsageError, match='--version'):
        tpu_pod.default_version('v7x-64')


def test_missing_gcloud_project_zone_and_bucket_are_named(monkeypatch, capsys):
    monkeypatch.setattr(tpu_pod.shutil, 'which', lambda name: None)
    assert tpu_pod.main(['stop', '--name=x', '--project=p', '--zone=z']) == 2
    assert 'gcloud is not installed' in capsys.readouterr().err
    assert tpu_pod.main(['stop', '--name=x', '--dry-run']) == 2
    err = capsys.readouterr().err
    assert 'Missing --project and --zone (gcloud is not installed' in err
    assert tpu_pod.main(['stop', '--name=x', '--zone=z', '--dry-run']) == 2
    assert 'Missing --project (' in capsys.readouterr().err
    assert tpu_pod.main(['run', '--name=x', '--project=p', '--zone=z', '--experiment=e', '--dry-run']) == 2
    assert '--bucket' in capsys.readouterr().err
    assert tpu_pod.main(['stop', '--name=x', '--project=p', '--zone=z', '--dry-run', '--config.a=1']) == 2
    assert 'only `run` passes' in capsys.readouterr().err


def _remote(argv):
    """The --command= of each ssh the subcommand would run (argv lists, as main runs them)."""
    args = tpu_pod.parse(argv)
    commands = tpu_pod.SUBCOMMANDS[args.subcommand](tpu_pod.resolve_target(args), args)
    return [a.split('=', 1)[1] for cmd in commands for a in cmd if a.startswith('--command=')]


def test_setup_and_run_make_the_prepared_data_readable_on_every_host():
    import subprocess  # pylint: disable=import-outside-toplevel
    printed = _printed('setup', '--data=gs://my-bucket/tfds', *V4)
    assert printed[-1].startswith('gcloud compute tpus tpu-vm ssh crate-v4 --project=my-project '
                                  '--zone=us-central2-b --worker=all --command=')
    mount = _remote(['setup', '--data=gs://my-bucket/tfds', *V4])[-1]
    assert 'gcsfuse --implicit-dirs --only-dir tfds my-bucket /mnt/tfds' in mount
    assert 'mountpoint -q /mnt/tfds ||' in mount and 'apt-get install -y -qq gcsfuse' in mount
    copy = _remote(['setup', '--data=gs://my-bucket/tfds', '--data_mode=copy', *V4])[-1]
    assert copy.endswith('gcloud storage rsync --recursive gs://my-bucket/tfds /mnt/tfds')
    whole_bucket = _remote(['setup', '--data=gs://my-bucket', *V4])[-1]
    assert 'gcsfuse --implicit-dirs my-bucket /mnt/tfds' in whole_bucket
    for command in (mount, copy, whole_bucket):
        assert subprocess.run(['bash', '-n', '-c', command]).returncode == 0  # parses as shell
    run = _remote(['run', '--experiment=crate_mae_base', '--bucket=gs://my-bucket', '--data=gs://my-bucket/tfds',
                   '--config.train.eval_batch=256', *V4])
    assert run[0] == mount  # remounted if a host restarted, a no-op otherwise
    assert ('launch.train --config=experiments/registry.py:crate_mae_base --workdir=gs://my-bucket/crate_mae_base '
            '--config.data.data_dir=/mnt/tfds --config.train.eval_batch=256 >') in run[1]
    assert 'data_dir' not in _remote(['run', '--experiment=crate_mae_base', '--bucket=gs://b', *V4])[0]


def test_bad_data_url_is_a_usage_error(capsys):
    assert tpu_pod.main(['setup', '--data=/local/tfds', *V4]) == 2
    assert 'must be gs://BUCKET[/PREFIX]' in capsys.readouterr().err
