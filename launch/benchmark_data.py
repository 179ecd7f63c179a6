"""Input-pipeline throughput: decoded + MAE-augmented 224 px images per second.

    python -m launch.benchmark_data [--images 256] [--batch 64] [--steps 12]
                                    [--workers 0,2] [--size 224]

Writes --images JPEGs (quality 90, 500x375 or 375x500 like a typical ImageNet
photo) cut from scikit-image's bundled photos into a temporary folder, then
reads them through the real `image_folder` pipeline (PIL decode,
RandomResizedCrop bicubic to 224, flip, normalise to float32, batch):
  * workers=0: `pipe.batch(step)` in this process, one core: images per
    CPU-second of this process = images/s per core (robust to neighbours);
  * workers=W: `pipe.iterate()` with W grain worker processes + the prefetch
    thread, as training reads it; per core = images/s / min(W, cores).
Prints the cores needed to feed a target rate (default 4,600 img/s, the
CRATE-MAE-Base goal on one H200) and the load average, because a neighbour
job on a shared machine halves every figure.
"""

import argparse
import math
import os
import tempfile
import time

import numpy as np
from PIL import Image

from cratemae import data
from cratemae import metrics
from cratemae.data import embedded


def make_jpegs(folder, count, seed=0):
    """`count` JPEGs (4:3 or 3:4, 500 px long side) of random photo crops."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(embedded.skimage_photo(n))
              for n in embedded.SKIMAGE_SOURCES[:7]]
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.uniform(0.5, 1.0) * min(w, h)
        cw, ch = (side, side * 0.75) if i % 3 else (side * 0.75, side)
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        size = (500, 375) if i % 3 else (375, 500)
        img = photo.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch))
        img.save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def _config(folder, size, workers):
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=folder, image_size=size, channels=3,
               augment='mae', hflip=True, num_workers=workers, prefetch=4)
    return cfg


def bench_inline(folder, size, batch, steps):
    """pipe.batch(s) in this process, after 1 warm-up: (images per wall
    second, images per CPU-second of this process, cores' worth of CPU used
    by other processes meanwhile)."""
    pipe = data.make_pipeline(_config(folder, size, 0), 'train', batch, seed=0)
    pipe.batch(0)
    b0, t0, c0 = metrics.busy_cpu_seconds(), time.perf_counter(), time.process_time()
    for s in range(1, steps + 1):
        pipe.batch(s)
    wall, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, metrics.busy_cpu_seconds()
    foreign = None if b0 is None else max(0.0, (b1 - b0 - cpu) / wall)
    return steps * batch / wall, steps * batch / cpu, foreign


def bench_workers(folder, size, batch, steps, workers):
    """images/s of pipe.iterate() with grain workers, after 2 warm-up batches."""
    pipe = data.make_pipeline(_config(folder, size, workers), 'train', batch, seed=0)
    with pipe.iterate(0) as it:
        for _ in range(2):
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        wall = time.perf_counter() - t0
    return steps * batch / wall


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m launch.benchmark_data')
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=12)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--workers', default='0,2', help='comma list; 0 = inline')
    p.add_argument('--target', type=float, default=4600.0)
    args = p.parse_args(argv)
    cores = os.cpu_count()
    print(f'machine: {cores} cores, load average before: '
          f'{", ".join(f"{x:.2f}" for x in os.getloadavg())}')
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        make_jpegs(folder, args.images)
        kb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f'wrote {args.images} JPEGs ({kb / args.images / 1024:.0f} KiB each) '
              f'in {time.perf_counter() - t0:.1f} s')
        per_core = None
        for workers in (int(w) for w in args.workers.split(',')):
            if workers == 0:
                rate, per_cpu, foreign = bench_inline(folder, args.size, args.batch,
                                                      args.steps)
                per_core = per_cpu
                print(f'inline, 1 process: {rate:.0f} img/s wall, {per_cpu:.0f} img per '
                      f'CPU-second (= per core); other processes used '
                      f'{foreign:.2f} of {cores} cores meanwhile')
            else:
                rate = bench_workers(folder, args.size, args.batch, args.steps, workers)
                used = min(workers, cores)
                per_core = per_core or rate / used
                print(f'{workers} worker processes: {rate:.0f} img/s '
                      f'= {rate / used:.0f} img/s per core over {used} core(s)')
    print(f'load average after: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')
    if per_core:
        print(f'cores to feed {args.target:.0f} img/s at {per_core:.0f} img/s/core: '
              f'{math.ceil(args.target / per_core)}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
