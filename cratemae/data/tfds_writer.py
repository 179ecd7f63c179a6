"""Encoded images -> a prepared tfds dataset (array_record), without TensorFlow.

tfds needs TF to *encode* an `Image` feature from pixels, but bytes that are
already encoded are stored as they are. So a list of (JPEG/PNG bytes, label)
becomes a real tfds dataset (`Image(encoding_format=...)` + `ClassLabel`,
supervised keys (image, label)) that `--config.data.name=tfds:NAME` reads,
like any dataset prepared by tfds. Used by the tests and
`launch.benchmark_data` to build data that looks like ImageNet's records.
"""

import contextlib
import sys

import tensorflow_datasets as tfds


def write_dataset(data_dir, name, splits, num_classes, version='1.0.0', encoding_format='jpeg'):
    """Writes {split: [(encoded bytes, label), ...]} as `name`/`version` under
    data_dir; returns the prepared builder."""
    splits = {k: list(v) for k, v in splits.items()}

    class _Encoded(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                supervised_keys=('image', 'label'),
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Image(encoding_format=encoding_format),
                        'label': tfds.features.ClassLabel(num_classes=num_classes),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            for i, (payload, label) in enumerate(splits[split]):
                yield i, {'image': bytes(payload), 'label': int(label)}

    _Encoded.name = name
    builder = _Encoded(data_dir=str(data_dir), file_format='array_record')
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints its progress; stdout may be a report
        builder.download_and_prepare()
    return builder
