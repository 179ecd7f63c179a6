"""tensorflow-datasets read by random access (array_record), no TF, no download.

Any prepared tfds image dataset can be read: the registered names
(imagenet2012, cifar10, ...) and `tfds:NAME[:VERSION]` for every other one.
Image features are read as their stored bytes (`tfds.decode.SkipDecoding`),
so cratemae decodes them itself (`decode.py`: JPEG DCT-domain downscaling,
the same colour rules as image folders); Tensor features come as arrays.

The image and label keys come from the dataset's supervised keys, else its
first `Image` feature (or one called 'image') and first `ClassLabel` feature; `config.data.image_key` /
`label_key` override them. No label feature: label -1, num_classes None.

Training never downloads: a dataset that is not prepared in array_record
format is an immediate `DatasetNotPreparedError` naming the command that
prepares it (`python -m launch.prepare_data NAME --data_dir D`). tfds itself
would retry a download for ~205 s offline before failing.
"""

import importlib.util
import os

from cratemae.data import splits as split_lib

TFDS_NAMES = ('imagenet2012', 'cifar10', 'cifar100', 'oxford_flowers102', 'oxford_iiit_pet')
PREFIX = 'tfds:'
EVAL_SPLITS = ('validation', 'test')  # what split_eval='auto' looks for, in order


class DatasetNotPreparedError(FileNotFoundError):
    """A tfds dataset is absent (or not in array_record format) in data_dir."""


def default_data_dir():
    """tfds' own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def tfds_name(name):
    """'tfds:NAME[:VERSION]' -> 'NAME[:VERSION]' (tfds' own spelling); registered names as is."""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name


def check_name(name):
    """None if `name` is a well-formed 'tfds:NAME[:VERSION]', else the problem."""
    parts = tfds_name(name).split(':')
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        return (
            f'data.name={name!r}: write a tfds dataset as tfds:NAME or '
            'tfds:NAME:VERSION, e.g. tfds:food101 or tfds:food101:2.0.0'
        )
    return None


def prepare_command(name, data_dir=None):
    cmd = f'python -m launch.prepare_data {name} --data_dir {data_dir or default_data_dir()}'
    if tfds_name(name).split(':')[0] == 'imagenet2012':
        cmd += ' --manual_dir DIR_WITH_ILSVRC2012_img_{train,val}.tar'
    return cmd


def _not_prepared(name, data_dir, why):
    return DatasetNotPreparedError(
        f"tfds dataset '{tfds_name(name)}' is not prepared in array_record format "
        f'under {data_dir or default_data_dir()} ({why}). Training never downloads; '
        f'prepare it once with:\n    {prepare_command(name, data_dir)}'
    )


class TfdsSource:
    """ds[i] -> (payload, int label): encoded bytes for Image features (decoded
    by the pipeline), uint8 arrays for Tensor features. Reads one record at a
    time; the ArrayRecord source pickles, so worker processes can open it."""

    def __init__(self, source, num_classes, image_key='image', label_key='label'):
        self.source = source
        self.num_classes = num_classes
        self.image_key = image_key
        self.label_key = label_key

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[int(i)]
        label = -1 if self.label_key is None else int(record[self.label_key])
        return record[self.image_key], label


def _file_formats(info):
    """Formats a prepared dataset is stored in (tfds >= 4.9.5 lists several)."""
    available = getattr(info, 'available_file_formats', None)
    formats = list(available()) if callable(available) else []
    return [str(getattr(f, 'value', f)) for f in formats or [info.file_format]]


def builder(name, data_dir=None):
    """The prepared array_record builder for `name`, or a clear error."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    try:
        b = tfds.builder(tfds_name(name), data_dir=data_dir, file_format='array_record')
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f'data.name={name!r}: tfds has no dataset {tfds_name(name)!r} (and none is '
            f'prepared under {data_dir or default_data_dir()}); see '
            'https://www.tensorflow.org/datasets/catalog for names'
        ) from e
    if not b.is_prepared():
        raise _not_prepared(name, data_dir, 'no prepared version found')
    formats = _file_formats(b.info)
    if 'array_record' not in formats:
        raise _not_prepared(name, data_dir, f'found formats {formats}')
    return b


def resolve_keys(name, info, image_key=None, label_key=None):
    """(image_key, label_key or None) from overrides, supervised keys, features."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    features = info.features
    supervised = info.supervised_keys
    if not (
        isinstance(supervised, (tuple, list)) and len(supervised) == 2 and all(isinstance(k, str) for k in supervised)
    ):
        supervised = (None, None)
    if image_key is None:
        image_key = supervised[0] or next(
            (k for k, f in features.items() if isinstance(f, tfds.features.Image)),
            'image' if 'image' in features else None,
        )
    if label_key is None:
        label_key = supervised[1] or next(
            (k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None
        )
    listing = ', '.join(f'{k} ({type(f).__name__})' for k, f in features.items())
    if image_key is None or image_key not in features:
        raise ValueError(
            f"tfds dataset '{tfds_name(name)}' has no image feature {image_key!r}; its "
            f'features: {listing}. Choose with --config.data.image_key'
        )
    if label_key is not None and label_key not in features:
        raise ValueError(
            f"tfds dataset '{tfds_name(name)}' has no label feature {label_key!r}; its "
            f'features: {listing}. Choose with --config.data.label_key'
        )
    return image_key, label_key


class PreparedDataset:
    """A prepared tfds dataset, opened once: its builder (`builder`), info, resolved version, directory, image/label
    keys (`resolve_keys`) and class count. `split`, `open` and `identity` use them and never reopen the builder."""

    def __init__(self, name, data_dir=None, image_key=None, label_key=None):
        self.name = name
        self.builder = builder(name, data_dir)
        self.info = self.builder.info
        self.version = str(self.info.version)
        self.data_dir = str(self.builder.data_dir)
        self.image_key, self.label_key = resolve_keys(name, self.info, image_key, label_key)
        label = self.info.features[self.label_key] if self.label_key is not None else None
        self.num_classes = getattr(label, 'num_classes', None)
        self.class_names = list(getattr(label, 'names', None) or []) or None

    def split(self, split):
        """`split` checked against the prepared splits ('auto': validation, else test)."""
        return split_lib.choose(f"tfds dataset '{tfds_name(self.name)}'", self.info.splits, split, EVAL_SPLITS)

    def open(self, split):
        """(TfdsSource, resolved split) for `split`, never downloading."""
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        split = self.split(split)
        image = self.info.features[self.image_key]
        decoders = {self.image_key: tfds.decode.SkipDecoding()} if isinstance(image, tfds.features.Image) else None
        source = self.builder.as_data_source(split=split, decoders=decoders)
        return TfdsSource(source, self.num_classes, self.image_key, self.label_key), split

    def identity(self, split):
        """What the examples of `split` are (the feature cache's key): name, resolved version, directory, keys."""
        return {
            'kind': 'tfds',
            'name': tfds_name(self.name).split(':')[0],
            'version': self.version,
            'data_dir': self.data_dir,
            'image_key': self.image_key,
            'label_key': self.label_key,
            'split': self.split(split),
        }


def tensorflow_available():
    return importlib.util.find_spec('tensorflow') is not None


def prepare(name, data_dir=None, manual_dir=None):
    """Downloads (where tfds can) and writes `name` (a registered name or tfds:NAME[:VERSION]) as array_record;
    returns the tfds builder.

    ValueError names what is missing: an unknown name, imagenet2012's manually downloaded tars, TensorFlow (tfds
    encodes `Image` features with it; reading the prepared files needs no TF).
    """
    generic = name.startswith(PREFIX)
    if generic and (problem := check_name(name)) is not None:
        raise ValueError(problem)
    if name not in TFDS_NAMES and not generic:
        raise ValueError(f'unknown dataset {name!r}; tfds datasets: {", ".join(TFDS_NAMES)}, or tfds:NAME[:VERSION]')
    if tfds_name(name).split(':')[0] == 'imagenet2012' and not manual_dir:
        raise ValueError(
            'imagenet2012 cannot be downloaded automatically: put ILSVRC2012_img_train.tar and '
            'ILSVRC2012_img_val.tar (from image-net.org) in a folder and pass --manual_dir.'
        )
    if not tensorflow_available():
        raise ValueError(
            'preparing a tfds image dataset needs TensorFlow to encode images: pip install '
            'tensorflow-cpu (training does not).'
        )
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    builder = tfds.builder(tfds_name(name), data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir), file_format='array_record'
        )
    return builder
