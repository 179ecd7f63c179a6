"""Prepare a dataset once: a tfds dataset in array_record format, or a re-encoded copy for training speed.

  python -m launch.prepare_data NAME [--data_dir=D] [--manual_dir=M]
  python -m launch.prepare_data NAME --reencode_to=OUT [--short_side=320] [--max_side=N] [--quality=90]
                                [--splits=train,validation] [--workers=auto] [--data_dir=D | --folder=DIR]

NAME is one of cratemae's tfds datasets (imagenet2012, cifar10, cifar100, oxford_flowers102, oxford_iiit_pet), or
tfds:NAME[:VERSION] for any other tfds image dataset (train it with --config.data.name=tfds:NAME).
Training never downloads; this is the one command that does (except imagenet2012, whose two tars you download
yourself from image-net.org and pass with --manual_dir). data_dir defaults to tfds' own ($TFDS_DATA_DIR, else
~/tensorflow_datasets). Needs TensorFlow for this step only (pip install tensorflow-cpu).

With --reencode_to, a prepared tfds dataset (or NAME=image_folder with --folder) is written to OUT as an image
folder of JPEGs bounded in size, labels and splits kept, in parallel, resumable by running the same command again,
never touching the source (cratemae/data/reencode.py); train with --config.data.name=image_folder
--config.data.folder=OUT.
"""

import json

from absl import flags

from cratemae import data
from cratemae.data import reencode
from cratemae.data import tfds_source
from launch import cli

FLAGS = cli.flag_values()
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data dir (default: tfds\' own).', flag_values=FLAGS)
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder with manually downloaded archives (imagenet2012).', flag_values=FLAGS
)
_REENCODE_TO = flags.DEFINE_string(
    'reencode_to', None, 'Write a re-encoded copy (an image folder) here instead of preparing.', flag_values=FLAGS
)
_FOLDER = flags.DEFINE_string('folder', None, 'The image folder to re-encode (NAME=image_folder).', flag_values=FLAGS)
_SHORT_SIDE = flags.DEFINE_integer(
    'short_side', reencode.DEFAULT_SHORT_SIDE, 'Bound on the shorter side, px (0: none).', flag_values=FLAGS
)
_MAX_SIDE = flags.DEFINE_integer('max_side', 0, 'Bound on the longer side, px (0: none).', flag_values=FLAGS)
_QUALITY = flags.DEFINE_integer('quality', reencode.DEFAULT_QUALITY, 'JPEG quality.', flag_values=FLAGS)
_SPLITS = flags.DEFINE_list(
    'splits', None, 'tfds splits to re-encode (default: all a folder holds).', flag_values=FLAGS
)
_WORKERS = flags.DEFINE_string('workers', 'auto', 'Processes (auto: the cores available).', flag_values=FLAGS)


def _reencode(name):
    bound = reencode.Bound(_SHORT_SIDE.value or None, _MAX_SIDE.value or None, _QUALITY.value)
    if name == 'image_folder':
        if not _FOLDER.value:
            raise cli.UsageError('image_folder needs --folder=DIR to re-encode')
        kwargs = {'folder': _FOLDER.value}
    else:
        kwargs = {'tfds_name': name, 'data_dir': _DATA_DIR.value, 'splits': _SPLITS.value}
    try:
        record = reencode.reencode(_REENCODE_TO.value, bound, workers=_WORKERS.value, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from None
    print(json.dumps(record))
    print(f'train with: --config.data.name=image_folder --config.data.folder={_REENCODE_TO.value}')
    return 0


def main(argv):
    if len(argv) != 2:
        raise cli.UsageError(
            f'expected one dataset NAME, one of {", ".join(tfds_source.TFDS_NAMES)}, or tfds:NAME[:VERSION].'
        )
    name = argv[1]
    if _REENCODE_TO.value:
        return _reencode(name)
    if name in data.DATASETS and name not in tfds_source.TFDS_NAMES:
        print(f"'{name}' needs no preparation (it is embedded or read from a folder).")
        return 0
    try:
        builder = tfds_source.prepare(name, _DATA_DIR.value, _MANUAL_DIR.value)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f'{name}: {splits} in {builder.data_dir}')
    print(
        f'train with: --config.data.name={name}'
        + (f' --config.data.data_dir={_DATA_DIR.value}' if _DATA_DIR.value else '')
    )
    return 0


if __name__ == '__main__':
    cli.main(main, FLAGS)
