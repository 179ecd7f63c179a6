"""Input-pipeline throughput: decoded + MAE-augmented 224 px images per second.

  python -m launch.benchmark_data [--images=256] [--batch=64] [--steps=12] [--workers=0,2] [--size=224]

Writes --images JPEGs into a temporary folder and reads them through the real `image_folder` pipeline, inline (one
core) and with grain workers (cratemae/data/throughput.py). Prints the cores needed to feed a target rate (default
4,600 img/s, the CRATE-MAE-Base goal on one H200) and the load average, because a neighbour job on a shared machine
halves every figure.
"""

import math
import os
import tempfile
import time

from absl import flags

from cratemae.data import throughput
from launch import cli

FLAGS = cli.flag_values()
flags.DEFINE_integer('images', 256, 'JPEGs to write.', flag_values=FLAGS)
flags.DEFINE_integer('batch', 64, 'Batch size.', flag_values=FLAGS)
flags.DEFINE_integer('steps', 12, 'Timed batches.', flag_values=FLAGS)
flags.DEFINE_integer('size', 224, 'Crop size.', flag_values=FLAGS)
flags.DEFINE_list('workers', ['0', '2'], 'Worker processes per measurement; 0 = inline.', flag_values=FLAGS)
flags.DEFINE_float('target', 4600.0, 'Images/s to feed.', flag_values=FLAGS)


def _load():
    return ', '.join(f'{x:.2f}' for x in os.getloadavg())


def main(argv):
    cli.no_positional(argv)
    f, cores, per_core = FLAGS, os.cpu_count(), None
    print(f'machine: {cores} cores, load average before: {_load()}')
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        throughput.make_jpegs(folder, f.images)
        kib = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / f.images / 1024
        print(f'wrote {f.images} JPEGs ({kib:.0f} KiB each) in {time.perf_counter() - t0:.1f} s')
        for workers in map(int, f.workers):
            if workers == 0:
                rate, per_core, foreign = throughput.bench_inline(folder, f.size, f.batch, f.steps)
                print(f'inline, 1 process: {rate:.0f} img/s wall, {per_core:.0f} img per CPU-second (= per core); '
                      f'other processes used {foreign:.2f} of {cores} cores meanwhile')
            else:
                rate = throughput.bench_workers(folder, f.size, f.batch, f.steps, workers)
                used = min(workers, cores)
                per_core = per_core or rate / used
                print(f'{workers} worker processes: {rate:.0f} img/s = {rate / used:.0f} img/s per core over {used} '
                      'core(s)')
    print(f'load average after: {_load()}')
    if per_core:
        print(f'cores to feed {f.target:.0f} img/s at {per_core:.0f} img/s/core: {math.ceil(f.target / per_core)}')


if __name__ == '__main__':
    cli.main(main, FLAGS)
