"""Input-pipeline throughput: decoded + MAE-augmented images per second, per core (``python -m launch.benchmark_data``).

``make_jpegs`` writes JPEGs (quality 90, 500x375 or 375x500 like a typical ImageNet photo) cut from scikit-image's
bundled photos; ``bench_inline`` and ``bench_workers`` read them through the real ``image_folder`` pipeline (PIL
decode, RandomResizedCrop bicubic, flip, normalise to float32, batch):

  * inline: ``pipe.batch(step)`` in this process, one core: images per CPU-second of this process = images/s per
    core (robust to neighbours);
  * W workers: ``pipe.iterate()`` with W grain worker processes + the prefetch thread, as training reads it; per
    core = images/s / min(W, cores).
"""

import os
import time

import numpy as np
from PIL import Image

from cratemae import metrics
from cratemae.data import config as data_config
from cratemae.data import embedded
from cratemae.data import pipeline


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
    cfg = data_config.default_data_config()
    cfg.update(name='image_folder', folder=folder, image_size=size, channels=3,
               augment='mae', hflip=True, num_workers=workers, prefetch=4)
    return cfg


def bench_inline(folder, size, batch, steps):
    """pipe.batch(s) in this process, after 1 warm-up: (images per wall
    second, images per CPU-second of this process, cores' worth of CPU used
    by other processes meanwhile)."""
    pipe = pipeline.make_pipeline(_config(folder, size, 0), 'train', batch, seed=0)
    pipe.batch(0)
    b0, t0, c0 = metrics.busy_cpu_seconds(), time.perf_counter(), time.process_time()
    for s in range(1, steps + 1):
        pipe.batch(s)
    wall, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, metrics.busy_cpu_seconds()
    foreign = None if b0 is None else max(0.0, (b1 - b0 - cpu) / wall)
    return steps * batch / wall, steps * batch / cpu, foreign


def bench_workers(folder, size, batch, steps, workers):
    """images/s of pipe.iterate() with grain workers, after 2 warm-up batches."""
    pipe = pipeline.make_pipeline(_config(folder, size, workers), 'train', batch, seed=0)
    with pipe.iterate(0) as it:
        for _ in range(2):
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        wall = time.perf_counter() - t0
    return steps * batch / wall
