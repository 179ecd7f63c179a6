"""Prepares a tfds dataset in array_record format, the one training reads.

    python -m launch.prepare_data NAME [--data_dir D] [--manual_dir M]

NAME is one of cratemae's tfds datasets (imagenet2012, cifar10, cifar100,
oxford_flowers102, oxford_iiit_pet) or tfds:NAME[:VERSION] for any other tfds
image dataset (train it with --config.data.name=tfds:NAME). Training never downloads; this is the one
command that does (except imagenet2012, whose two tars you download yourself
from image-net.org and pass with --manual_dir). data_dir defaults to tfds'
own ($TFDS_DATA_DIR, else ~/tensorflow_datasets).

Needs TensorFlow for this step only: tfds encodes `Image` features with TF
(`pip install tensorflow-cpu`); reading the prepared files needs no TF.
"""

import argparse
import importlib.util
import sys

from cratemae import data
from cratemae.data import tfds_source


def _parser():
    p = argparse.ArgumentParser(prog='python -m launch.prepare_data',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('name', help=f'one of {", ".join(tfds_source.TFDS_NAMES)}, or tfds:NAME[:VERSION]')
    p.add_argument('--data_dir', default=None,
                   help=f'tfds data dir (default {tfds_source.default_data_dir()})')
    p.add_argument('--manual_dir', default=None,
                   help='folder with manually downloaded archives (imagenet2012)')
    return p


def tensorflow_available():
    return importlib.util.find_spec('tensorflow') is not None


def prepare(name, data_dir=None, manual_dir=None):
    """Downloads (if needed) and writes `name` as array_record; returns the
    builder, or None for a dataset that needs no preparation."""
    generic = name.startswith(tfds_source.PREFIX)
    if generic and (problem := tfds_source.check_name(name)) is not None:
        raise SystemExit(problem)
    if name not in tfds_source.TFDS_NAMES and not generic:
        if name in data.DATASETS:
            print(f"'{name}' needs no preparation (it is embedded or read from a folder).")
            return None
        raise SystemExit(f'unknown dataset {name!r}; tfds datasets: '
                         f'{", ".join(tfds_source.TFDS_NAMES)}, or tfds:NAME[:VERSION]')
    if tfds_source.tfds_name(name).split(':')[0] == 'imagenet2012' and not manual_dir:
        raise SystemExit('imagenet2012 cannot be downloaded automatically: put '
                         'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
                         '(from image-net.org) in a folder and pass --manual_dir.')
    if not tensorflow_available():
        raise SystemExit('preparing a tfds image dataset needs TensorFlow to encode '
                         'images: pip install tensorflow-cpu (training does not).')
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = tfds.builder(tfds_source.tfds_name(name), data_dir=data_dir,
                           file_format='array_record')
    if builder.is_prepared():
        print(f'{name} is already prepared in {builder.data_dir}')
        return builder
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=config, file_format='array_record')
    return builder


def main(argv=None):
    args = _parser().parse_args(argv)
    builder = prepare(args.name, args.data_dir, args.manual_dir)
    if builder is None:
        return 0
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f'{args.name}: {splits} in {builder.data_dir}')
    print(f'train with: --config.data.name={args.name}'
          + (f' --config.data.data_dir={args.data_dir}' if args.data_dir else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
