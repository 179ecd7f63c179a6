"""Prepared tfds data on every host of a TPU pod: one copy in GCS, read on each host at LOCAL_DIR.

Every host reads its slice of every global batch, and a global batch spans the whole dataset, so every host needs
all of it. The data is prepared once (`python -m launch.prepare_data ...`), copied to `gs://BUCKET/PREFIX`, and each
host either mounts that prefix with gcsfuse (`how='gcsfuse'`) or copies it to its own disk (`how='copy'`,
`gcloud storage rsync`, which a rerun resumes). Training then reads `--config.data.data_dir=LOCAL_DIR`.
`launch.tpu_pod setup --data=gs://... [--data_mode=copy]` and `run --data=gs://...` use these commands.
"""

import shlex

LOCAL_DIR = '/mnt/tfds'
MODES = ('gcsfuse', 'copy')
# Google's apt repository for gcsfuse (https://cloud.google.com/storage/docs/cloud-storage-fuse/install).
_INSTALL_GCSFUSE = (
    'command -v gcsfuse >/dev/null || { '
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
    'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && '
    'curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc '
    '>/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }'
)


def split_gcs(url):
    """'gs://BUCKET/PREFIX' -> (BUCKET, PREFIX or ''); ValueError for anything else."""
    if not isinstance(url, str) or not url.startswith('gs://') or not url[5:].strip('/'):
        raise ValueError(
            f'--data={url!r} must be gs://BUCKET[/PREFIX], the GCS folder holding the prepared tfds '
            'datasets (the --data_dir that launch.prepare_data wrote, copied there)'
        )
    bucket, _, prefix = url[5:].strip('/').partition('/')
    return bucket, prefix


def host_command(url, how='gcsfuse', local=LOCAL_DIR):
    """Remote shell command that makes gs://BUCKET/PREFIX readable at `local` on one host (idempotent)."""
    if how not in MODES:
        raise ValueError(f'--data_mode={how!r} must be one of {MODES}')
    bucket, prefix = split_gcs(url)
    make = f'sudo mkdir -p {local} && sudo chown "$USER" {local}'
    if how == 'copy':
        return f'{make} && gcloud storage rsync --recursive {shlex.quote(url.rstrip("/"))} {local}'
    only = f' --only-dir {shlex.quote(prefix)}' if prefix else ''
    return (
        f'{_INSTALL_GCSFUSE} && {make} && '
        f'{{ mountpoint -q {local} || gcsfuse --implicit-dirs{only} {shlex.quote(bucket)} {local}; }}'
    )


def train_overrides(local=LOCAL_DIR):
    """What launch.train needs to read the data there."""
    return [f'--config.data.data_dir={local}']
