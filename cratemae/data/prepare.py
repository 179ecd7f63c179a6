"""What ``python -m launch.prepare_data`` does: prepare a tfds dataset once, or write a re-encoded copy for speed.

Training never downloads; this is the one step that does (except imagenet2012, whose archives the user downloads and
passes as ``manual_dir``). A re-encoded copy (``reencode_to``) is an image folder of JPEGs bounded in size, labels
and splits kept, written in parallel and resumable, never touching its source (``cratemae/data/reencode.py``).
"""

from cratemae.data import reencode
from cratemae.data import registry
from cratemae.data import tfds_source


def run(
    name, *, data_dir=None, manual_dir=None, reencode_to=None, folder=None, bound=None, splits=None, workers='auto'
):
    """The lines to print for ``launch.prepare_data NAME``; a ValueError names what to change."""
    if reencode_to:
        if name == 'image_folder':
            if not folder:
                raise ValueError('image_folder needs --folder=DIR to re-encode')
            source = {'folder': folder}
        else:
            source = {'tfds_name': name, 'data_dir': data_dir, 'splits': splits}
        record = reencode.reencode(reencode_to, bound or reencode.Bound(), workers=workers, **source)
        return [record, f'train with: --config.data.name=image_folder --config.data.folder={reencode_to}']
    if name in registry.DATASETS and name not in tfds_source.TFDS_NAMES:
        return [f"'{name}' needs no preparation (it is embedded or read from a folder)."]
    builder = tfds_source.prepare(name, data_dir, manual_dir)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    return [
        f'{name}: {splits} in {builder.data_dir}',
        f'train with: --config.data.name={name}' + (f' --config.data.data_dir={data_dir}' if data_dir else ''),
    ]
