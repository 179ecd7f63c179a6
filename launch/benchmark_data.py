"""Input-pipeline throughput, one JSON line per mode (cratemae/data/throughput.py).

  python -m launch.benchmark_data [--images=256] [--batch=64] [--steps=12] [--workers=0,1,2] [--size=224]
                                  [--modes=folder,tfds_jpeg] [--uint8]

Writes ImageNet-like JPEGs (500x375, ~110 KiB, photographic detail) as an image folder and as a tfds JPEG dataset,
then prints, per mode, images per CPU-second in process, images/s per worker count, and the input cores each
accelerator (or TPU host) needs at its target rate. See docs/data.md.
"""

import json

from absl import flags

from cratemae.data import throughput
from launch import cli

FLAGS = cli.flag_values()
flags.DEFINE_integer('images', 256, 'JPEGs to write.', flag_values=FLAGS)
flags.DEFINE_integer('batch', 64, 'Batch size.', flag_values=FLAGS)
flags.DEFINE_integer('steps', 12, 'Timed batches.', flag_values=FLAGS)
flags.DEFINE_integer('size', 224, 'Crop size.', flag_values=FLAGS)
flags.DEFINE_list('workers', ['0', '1', '2'], 'Worker processes per measurement; 0 = in process.', flag_values=FLAGS)
flags.DEFINE_list('modes', list(throughput.MODES), 'folder and/or tfds_jpeg.', flag_values=FLAGS)
flags.DEFINE_bool('uint8', False, 'Batches handed over as uint8 (normalised on the devices).', flag_values=FLAGS)


def main(argv):
    cli.no_positional(argv)
    f = FLAGS
    try:
        records = throughput.run(
            f.images, f.modes, f.size, f.batch, f.steps, [int(w) for w in f.workers], uint8=f.uint8
        )
        for record in records:
            print(json.dumps(record), flush=True)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


if __name__ == '__main__':
    cli.main(main, FLAGS)
