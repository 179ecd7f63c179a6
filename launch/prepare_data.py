"""Prepare a tfds dataset in array_record format, the one training reads.

  python -m launch.prepare_data NAME [--data_dir=D] [--manual_dir=M]

NAME is one of cratemae's tfds datasets (imagenet2012, cifar10, cifar100, oxford_flowers102, oxford_iiit_pet), or
tfds:NAME[:VERSION] for any other tfds image dataset (train it with --config.data.name=tfds:NAME).
Training never downloads; this is the one command that does (except imagenet2012, whose two tars you download
yourself from image-net.org and pass with --manual_dir). data_dir defaults to tfds' own ($TFDS_DATA_DIR, else
~/tensorflow_datasets). Needs TensorFlow for this step only (pip install tensorflow-cpu).
"""

from absl import flags

from cratemae import data
from cratemae.data import tfds_source
from launch import cli

FLAGS = cli.flag_values()
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data dir (default: tfds\' own).', flag_values=FLAGS)
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Folder with manually downloaded archives (imagenet2012).', flag_values=FLAGS
)


def main(argv):
    if len(argv) != 2:
        raise cli.UsageError(
            f'expected one dataset NAME, one of {", ".join(tfds_source.TFDS_NAMES)}, or tfds:NAME[:VERSION].'
        )
    name = argv[1]
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
