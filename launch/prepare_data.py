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
folder of bounded JPEGs, labels and splits kept; run it again to resume (cratemae/data/prepare.py, reencode.py).
"""

import json

from absl import flags

from cratemae.data import prepare
from cratemae.data import reencode
from cratemae.data import tfds_source
from launch import cli

FLAGS = cli.flag_values()
flags.DEFINE_string('data_dir', None, 'tfds data dir (default: tfds\' own).', flag_values=FLAGS)
flags.DEFINE_string('manual_dir', None, 'Folder with manually downloaded archives (imagenet2012).', flag_values=FLAGS)
flags.DEFINE_string('reencode_to', None, 'Write a re-encoded copy (an image folder) here instead.', flag_values=FLAGS)
flags.DEFINE_string('folder', None, 'The image folder to re-encode (NAME=image_folder).', flag_values=FLAGS)
flags.DEFINE_integer('short_side', reencode.DEFAULT_SHORT_SIDE, 'Shorter side bound, px (0: none).', flag_values=FLAGS)
flags.DEFINE_integer('max_side', 0, 'Bound on the longer side, px (0: none).', flag_values=FLAGS)
flags.DEFINE_integer('quality', reencode.DEFAULT_QUALITY, 'JPEG quality.', flag_values=FLAGS)
flags.DEFINE_list('splits', None, 'tfds splits to re-encode (default: all a folder holds).', flag_values=FLAGS)
flags.DEFINE_string('workers', 'auto', 'Processes (auto: the cores available).', flag_values=FLAGS)


def main(argv):
    if len(argv) != 2:
        raise cli.UsageError(
            f'expected one dataset NAME, one of {", ".join(tfds_source.TFDS_NAMES)}, or tfds:NAME[:VERSION].'
        )
    f = FLAGS
    bound = reencode.Bound(f.short_side or None, f.max_side or None, f.quality)
    try:
        lines = prepare.run(
            argv[1],
            data_dir=f.data_dir,
            manual_dir=f.manual_dir,
            reencode_to=f.reencode_to,
            folder=f.folder,
            bound=bound,
            splits=f.splits,
            workers=f.workers,
        )
    except (ValueError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from None
    for line in lines:
        print(json.dumps(line) if isinstance(line, dict) else line)
    return 0


if __name__ == '__main__':
    cli.main(main, FLAGS)
