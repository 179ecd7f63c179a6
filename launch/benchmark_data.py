"""Input-pipeline throughput, one JSON line per dataset form (cratemae/data/throughput.py).

  python -m launch.benchmark_data [--images=256] [--batch=64] [--steps=12] [--workers=0,1,2] [--size=224]
                                  [--modes=folder,tfds_jpeg] [--reencode=320:90,256:90] [--nouint8] [--resize=torch]
  python -m launch.benchmark_data --dataset=tfds:NAME [--data_dir=D] ...      # a prepared dataset of yours
  python -m launch.benchmark_data --dataset=image_folder --folder=DIR ...     # or an image folder

Without --dataset it writes ImageNet-like JPEGs (500x375, ~110 KiB) as an image folder and a tfds JPEG dataset, plus
the folder re-encoded at each SHORT_SIDE:QUALITY of --reencode. Each line: the mode, stored bytes per image, worker
counts, images per CPU-second (uint8 batches, as training reads them), images/s per worker count, and the input cores
each accelerator needs at its target rate. See docs/data.md.
"""

import json

from absl import flags

from cratemae import data
from cratemae.data import throughput
from launch import cli

FLAGS = cli.flag_values()
flags.DEFINE_integer('images', 256, 'JPEGs to write.', flag_values=FLAGS)
flags.DEFINE_integer('batch', 64, 'Batch size.', flag_values=FLAGS)
flags.DEFINE_integer('steps', 12, 'Timed batches.', flag_values=FLAGS)
flags.DEFINE_integer('size', 224, 'Crop size.', flag_values=FLAGS)
flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker processes per measurement; 0 = in process.', flag_values=FLAGS)
flags.DEFINE_list('modes', list(throughput.MODES), 'folder and/or tfds_jpeg.', flag_values=FLAGS)
flags.DEFINE_list('reencode', [], 'Re-encoded forms to measure too, SHORT_SIDE:QUALITY each.', flag_values=FLAGS)
flags.DEFINE_bool('uint8', True, 'uint8 batches (as training reads them); --nouint8: float32.', flag_values=FLAGS)
flags.DEFINE_string(
    'dataset', None, 'Measure this dataset (a data.name) instead of generated JPEGs.', flag_values=FLAGS
)
flags.DEFINE_string('data_dir', None, 'tfds data dir of --dataset.', flag_values=FLAGS)
flags.DEFINE_string('folder', None, 'The folder of --dataset=image_folder.', flag_values=FLAGS)
flags.DEFINE_string('split', 'train', 'The split of --dataset to read.', flag_values=FLAGS)
flags.DEFINE_enum('resize', 'pil', ['pil', 'torch'], 'data.resize: the bicubic resize used.', flag_values=FLAGS)


def main(argv):
    cli.no_positional(argv)
    f = FLAGS
    dataset = None
    if f.dataset:
        dataset = data.default_data_config()
        dataset.update(name=f.dataset, data_dir=f.data_dir, folder=f.folder, split_train=f.split, channels=3)
    try:
        records = throughput.run(
            f.images,
            f.modes,
            f.size,
            f.batch,
            f.steps,
            [int(w) for w in f.workers],
            uint8=f.uint8,
            forms=throughput.parse_forms(f.reencode),
            dataset=dataset,
            resize=f.resize,
        )
        for record in records:
            print(json.dumps(record), flush=True)
    except (ValueError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from None


if __name__ == '__main__':
    cli.main(main, FLAGS)
