"""Input-pipeline throughput: decoded + MAE-augmented images per second, per mode.

    python -m launch.benchmark_data [--images 256] [--batch 64] [--steps 12]
                                    [--workers 0,1,2] [--size 224] [--modes folder,tfds_jpeg]

Writes --images ImageNet-like JPEGs (below) once, then reads them the two ways
a pod host does, through the real pipeline (decode with JPEG DCT-domain
downscaling where the crop allows, RandomResizedCrop bicubic to --size, flip,
normalise, batch):
  * folder:    an `image_folder` of the JPEG files;
  * tfds_jpeg: the same bytes prepared as a tfds array_record dataset with an
               `Image(encoding_format='jpeg')` feature, read as `tfds:NAME`.
Per mode it prints one JSON line:
  * images_per_cpu_second: `pipe.batch(step)` in this process, images per
    CPU-second of this process (= per core; robust to neighbour load);
    decode_augment_per_cpu_second: the same without normalising and
    batching (`pipe.example`), the cost once batches travel as uint8;
  * images_per_s: {workers: images per wall second}; 0 = in process, W =
    `pipe.iterate()` with W grain worker processes as training reads it;
    scaling: {W: images_per_s / (W x images_per_cpu_second)};
  * cores_needed: input cores per accelerator (or TPU host) at the target
    rates in TARGETS, at images_per_cpu_second;
  * the load average and the cores other processes used meanwhile, because a
    neighbour job on a shared machine slows every wall-clock figure.

The JPEGs: 500x375 or 375x500 (ImageNet's typical size), quality 95, ~110
KiB like ImageNet's average file. Each is a crop of one of scikit-image's
bundled photos with the fine detail of a bundled texture (grass, gravel,
brick: their high-pass, not random noise) added, so the files carry real
photographic detail rather than the smooth upscaled crops that flatter a
decoder. No download.
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageFilter

from cratemae import data
from cratemae import metrics
from cratemae.data import embedded
from cratemae.data import tfds_writer

# Images/s each input pipeline has to feed. GPUs: the CRATE-MAE-Base step target
# on one H200 (docs/performance.md), the same for an H100. TPU hosts (4 chips
# each): that rate scaled by each chip's peak bf16 FLOP/s relative to the H200
# (989 TFLOP/s): v4 275, v5e 197, v5p 459, i.e. the same model FLOP utilisation.
TARGETS = {
    'H100/H200 GPU': 4600.0,
    'TPU v4 host (4 chips)': 4 * 4600.0 * 275 / 989,
    'TPU v5e host (4 chips)': 4 * 4600.0 * 197 / 989,
    'TPU v5p host (4 chips)': 4 * 4600.0 * 459 / 989,
}
_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field',
           'immunohistochemistry', 'retina')
_TEXTURES = ('grass', 'gravel', 'brick')


def imagenet_like_jpegs(count, seed=0, detail=3.0, quality=95):
    """[(JPEG bytes, label)]: label = source photo index."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(embedded._skimage_photo(n)) for n in _PHOTOS]  # pylint: disable=protected-access
    textures = []
    for n in _TEXTURES:
        t = Image.fromarray(embedded._skimage_photo(n)).convert('L')  # pylint: disable=protected-access
        t = t.resize((1000, 1000), Image.BICUBIC)
        hp = np.asarray(t, np.float32) - np.asarray(t.filter(ImageFilter.GaussianBlur(3)), np.float32)
        textures.append(hp)
    out = []
    for i in range(count):
        k = i % len(photos)
        photo = photos[k]
        w, h = photo.size
        size = (500, 375) if i % 3 else (375, 500)
        side = rng.uniform(0.6, 1.0) * min(w, h)
        cw, ch = (side, side * 0.75) if i % 3 else (side * 0.75, side)
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        base = np.asarray(photo.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch)),
                          np.float32)
        tex = textures[i % len(textures)]
        y, x = rng.integers(0, 1000 - size[1]), rng.integers(0, 1000 - size[0])
        pixels = base + detail * tex[y:y + size[1], x:x + size[0], None]
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=quality)
        out.append((buf.getvalue(), k))
    return out


def _config(mode, root, size, workers):
    cfg = data.default_data_config()
    cfg.update(image_size=size, channels=3, augment='mae', hflip=True, num_workers=workers,
               prefetch=4)
    if mode == 'folder':
        cfg.update(name='image_folder', folder=os.path.join(root, 'folder'))
    else:
        cfg.update(name='tfds:bench_jpegs', data_dir=os.path.join(root, 'tfds'))
    return cfg


def write_data(root, jpegs):
    """The same bytes as an image folder (one class per photo) and a tfds dataset."""
    for i, (payload, label) in enumerate(jpegs):
        folder = os.path.join(root, 'folder', f'class_{label}')
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
            f.write(payload)
    tfds_writer.write_dataset(os.path.join(root, 'tfds'), 'bench_jpegs', {'train': jpegs},
                              num_classes=len(_PHOTOS))


def bench_inline(cfg, batch, steps):
    """pipe.batch(s) in this process after 1 warm-up: (images per wall second,
    images per CPU-second of this process, cores other processes used)."""
    pipe = data.make_pipeline(cfg, 'train', batch, seed=0)
    pipe.batch(0)
    b0, t0, c0 = metrics.busy_cpu_seconds(), time.perf_counter(), time.process_time()
    for s in range(1, steps + 1):
        pipe.batch(s)
    wall, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, metrics.busy_cpu_seconds()
    foreign = None if b0 is None else max(0.0, (b1 - b0 - cpu) / wall)
    return steps * batch / wall, steps * batch / cpu, foreign


def bench_examples(cfg, count):
    """Decoded + augmented uint8 examples per CPU-second, without normalising
    or batching: what the pipeline costs once batches travel as uint8."""
    pipe = data.make_pipeline(cfg, 'train', 1, seed=0)
    pipe.example(0)
    c0 = time.process_time()
    for g in range(1, count + 1):
        pipe.example(g)
    return count / (time.process_time() - c0)


def bench_workers(cfg, batch, steps):
    """images/s of pipe.iterate() with grain workers, after 2 warm-up batches."""
    pipe = data.make_pipeline(cfg, 'train', batch, seed=0)
    with pipe.iterate(0) as it:
        for _ in range(2):
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        wall = time.perf_counter() - t0
    return steps * batch / wall


def measure(mode, root, args, worker_counts):
    """The JSON record of one mode."""
    load_before = os.getloadavg()
    rates, per_cpu, per_cpu_u8, foreign = {}, None, None, None
    for w in worker_counts:
        cfg = _config(mode, root, args.size, w)
        if w == 0:
            rates[0], per_cpu, foreign = bench_inline(cfg, args.batch, args.steps)
            per_cpu_u8 = bench_examples(cfg, args.batch * args.steps)
        else:
            rates[w] = bench_workers(cfg, args.batch, args.steps)
    record = {
        'mode': mode, 'size': args.size, 'batch': args.batch, 'steps': args.steps,
        'images_per_cpu_second': None if per_cpu is None else round(per_cpu, 1),
        'decode_augment_per_cpu_second': None if per_cpu_u8 is None else round(per_cpu_u8, 1),
        'images_per_s': {str(w): round(r, 1) for w, r in rates.items()},
        'scaling': ({str(w): round(r / (w * per_cpu), 3) for w, r in rates.items() if w}
                    if per_cpu else {}),
        'cores_needed': ({k: math.ceil(v / per_cpu) for k, v in TARGETS.items()}
                         if per_cpu else {}),
        'targets_images_per_s': {k: round(v) for k, v in TARGETS.items()},
        'other_processes_cores': None if foreign is None else round(foreign, 2),
        'load_before': [round(x, 2) for x in load_before],
        'load_after': [round(x, 2) for x in os.getloadavg()],
    }
    return record


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m launch.benchmark_data')
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=12)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--workers', default='0,1,2', help='comma list; 0 = in process')
    p.add_argument('--modes', default='folder,tfds_jpeg', help='comma list of folder, tfds_jpeg')
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(',') if m]
    unknown = set(modes) - {'folder', 'tfds_jpeg'}
    if unknown:
        raise SystemExit(f'--modes: unknown {sorted(unknown)}; choose from folder, tfds_jpeg')
    worker_counts = [int(w) for w in args.workers.split(',') if w != '']
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        jpegs = imagenet_like_jpegs(args.images)
        write_data(root, jpegs)
        kib = sum(len(b) for b, _ in jpegs) / len(jpegs) / 1024
        common = {'date': datetime.date.today().isoformat(), 'machine': platform.processor() or
                  platform.machine(), 'cores': data.workers.available_cores(),
                  'images': len(jpegs), 'mean_kib': round(kib, 1),
                  'write_s': round(time.perf_counter() - t0, 1)}
        for mode in modes:
            print(json.dumps({**measure(mode, root, args, worker_counts), **common}), flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
