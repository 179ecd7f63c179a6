"""tensorflow-datasets read through `tfds.data_source` (array_record), no TF.

Training never downloads: the data source is opened with download=False, and
a dataset that is not prepared in array_record format is an immediate
`DatasetNotPreparedError` naming the command that prepares it
(`python -m launch.prepare_data NAME --data_dir D`). tfds itself would retry a
download for ~205 s offline before failing.
"""

import importlib.util
import os

TFDS_NAMES = ('imagenet2012', 'cifar10', 'cifar100', 'oxford_flowers102',
              'oxford_iiit_pet')


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset is absent (or not in array_record format) in data_dir."""


def default_data_dir():
    """tfds' own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get('TFDS_DATA_DIR') or os.path.join(
        os.path.expanduser('~'), 'tensorflow_datasets')


def prepare_command(name, data_dir=None):
    cmd = f'python -m launch.prepare_data {name} --data_dir {data_dir or default_data_dir()}'
    if name == 'imagenet2012':
        cmd += ' --manual_dir DIR_WITH_ILSVRC2012_img_{train,val}.tar'
    return cmd


def _not_prepared(name, split, data_dir, why):
    return DatasetNotPreparedError(
        f"tfds dataset '{name}' (split {split!r}) is not prepared in array_record "
        f'format under {data_dir or default_data_dir()} ({why}). Training never '
        f'downloads; prepare it once with:\n    {prepare_command(name, data_dir)}')


class TfdsSource:
    """ds[i] -> (uint8 HWC image, int label) over a tfds array_record source.

    Reads one record at a time (`__getitem__`): the record is decoded by tfds
    with PIL. The underlying ArrayRecord source pickles, so worker processes
    can open it.
    """

    def __init__(self, source, num_classes, image_key='image', label_key='label'):
        self.source = source
        self.num_classes = num_classes
        self.image_key = image_key
        self.label_key = label_key

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[int(i)]
        return record[self.image_key], int(record[self.label_key])


def _file_formats(info):
    """Formats a prepared dataset is stored in (tfds >= 4.9.5 lists several)."""
    available = getattr(info, 'available_file_formats', None)
    formats = list(available()) if callable(available) else []
    return formats or [info.file_format]


def open_split(name, split, data_dir=None):
    """Opens split of tfds dataset `name` for random access, never downloading."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
        source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False, try_gcs=False,
            builder_kwargs={'file_format': 'array_record'})
    except (KeyError, AssertionError, FileNotFoundError, NotImplementedError,
            ValueError) as e:
        # Absent dataset: tfds says "splits is empty" (KeyError); prepared only
        # as tfrecord: NotImplementedError / ValueError. Say what to run.
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise _not_prepared(name, split, data_dir, 'no prepared version found') from e
        formats = [str(getattr(f, 'value', f)) for f in _file_formats(builder.info)]
        if 'array_record' not in formats:
            raise _not_prepared(name, split, data_dir, f'found formats {formats}') from e
        splits = list(builder.info.splits)
        if split.split('[')[0] not in splits:
            raise ValueError(f"tfds dataset '{name}' has no split {split!r}; "
                             f'prepared splits: {splits}') from e
        raise
    label = source.dataset_info.features['label']
    return TfdsSource(source, num_classes=getattr(label, 'num_classes', None))


def tensorflow_available():
    return importlib.util.find_spec('tensorflow') is not None


def prepare(name, data_dir=None, manual_dir=None):
    """Downloads (where tfds can) and writes `name` as array_record; returns the tfds builder.

    ValueError names what is missing: an unknown name, imagenet2012's manually downloaded tars, TensorFlow (tfds
    encodes `Image` features with it; reading the prepared files needs no TF).
    """
    if name not in TFDS_NAMES:
        raise ValueError(f'unknown dataset {name!r}; tfds datasets: {", ".join(TFDS_NAMES)}')
    if name == 'imagenet2012' and not manual_dir:
        raise ValueError('imagenet2012 cannot be downloaded automatically: put ILSVRC2012_img_train.tar and '
                         'ILSVRC2012_img_val.tar (from image-net.org) in a folder and pass --manual_dir.')
    if not tensorflow_available():
        raise ValueError('preparing a tfds image dataset needs TensorFlow to encode images: pip install '
                         'tensorflow-cpu (training does not).')
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
                                     file_format='array_record')
    return builder
