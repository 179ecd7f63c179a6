"""Input-pipeline throughput (``python -m launch.benchmark_data``): decoded + MAE-augmented images per second.

``imagenet_like_jpegs`` makes JPEGs that look like ImageNet's: 500x375 or 375x500, quality 95, ~110 KiB on average.
Each is a crop of one of scikit-image's bundled photos with the fine detail of a bundled texture (grass, gravel,
brick: their high-pass, not random noise) added, so the files carry real photographic detail rather than the smooth
upscaled crops that flatter a decoder. No download. ``write_data`` stores the same bytes as an image folder and as a
tfds array_record dataset (``Image(encoding_format='jpeg')``), and re-encoded copies of the folder
(``reencode.py``, one per (short side, quality) asked for); ``measure`` reads one of them (or a dataset the user
names), as a pod host does, through the real pipeline (decode with JPEG DCT-domain downscaling where the crop
allows, RandomResizedCrop bicubic, flip, batch; uint8 batches unless asked for float32 ones, as training reads them):

  * images_per_cpu_second: ``pipe.batch(step)`` in this process, images per CPU-second of this process (= per core;
    robust to neighbour load); decode_augment_per_cpu_second: the same per example (``pipe.example``), without
    stacking a batch;
  * bytes_per_image: the stored bytes per image (files, or array_record shards);
  * images_per_s: {workers: images per wall second}; 0 = in process, W = ``pipe.iterate()`` with W grain worker
    processes, as training reads it; scaling: {W: images_per_s / (W x images_per_cpu_second)};
  * cores_needed: input cores per accelerator (or TPU host) at the rates in TARGETS;
  * the load average and the cores other processes used meanwhile: a neighbour job slows every wall-clock figure.
"""

import datetime
import io
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
from cratemae.data import reencode
from cratemae.data import tfds_writer
from cratemae.data import workers

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
_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina')
_TEXTURES = ('grass', 'gravel', 'brick')


def imagenet_like_jpegs(count, seed=0, detail=3.0, quality=95, with_texture=False):
    """[(JPEG bytes, label)]: label = source photo index; with_texture: [(JPEG bytes, label, texture index)], the
    texture whose high-pass detail was added (a label that only the fine detail carries)."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(embedded.skimage_photo(n)) for n in _PHOTOS]
    textures = []
    for n in _TEXTURES:
        t = Image.fromarray(embedded.skimage_photo(n)).convert('L')
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
        base = np.asarray(photo.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch)), np.float32)
        tex = textures[i % len(textures)]  # the texture label of with_texture
        y, x = rng.integers(0, 1000 - size[1]), rng.integers(0, 1000 - size[0])
        pixels = base + detail * tex[y : y + size[1], x : x + size[0], None]
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=quality)
        out.append((buf.getvalue(), k, i % len(textures)) if with_texture else (buf.getvalue(), k))
    return out


def _config(mode, root, size, num_workers, resize='pil'):
    cfg = data.default_data_config()
    cfg.update(image_size=size, channels=3, augment='mae', hflip=True, num_workers=num_workers, prefetch=4)
    cfg.resize = resize
    if mode == 'tfds_jpeg':
        cfg.update(name='tfds:bench_jpegs', data_dir=os.path.join(root, 'tfds'))
    else:  # 'folder', or a re-encoded copy 'folder_s<short side>_q<quality>'
        cfg.update(name='image_folder', folder=os.path.join(root, mode))
    return cfg


def form_name(short_side, quality):
    """The mode (and folder) name of the generated set re-encoded at (short side, quality)."""
    return f'folder_s{short_side}_q{quality}'


def parse_forms(specs):
    """['320:90', ...] -> [(320, 90), ...]: re-encoded forms to measure."""
    forms = []
    for spec in specs or ():
        try:
            short, quality = (int(v) for v in str(spec).split(':'))
        except ValueError:
            raise ValueError(f'--reencode={spec!r}: write SHORT_SIDE:QUALITY, e.g. 320:90') from None
        reencode.Bound(short, None, quality).check()
        forms.append((short, quality))
    return forms


def write_data(root, jpegs, forms=(), workers='auto'):
    """The same bytes as an image folder (one class per photo) and a tfds dataset, plus the folder re-encoded at
    each (short side, quality) of `forms`."""
    for i, (payload, label) in enumerate(jpegs):
        folder = os.path.join(root, 'folder', f'class_{label}')
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
            f.write(payload)
    tfds_writer.write_dataset(os.path.join(root, 'tfds'), 'bench_jpegs', {'train': jpegs}, num_classes=len(_PHOTOS))
    for short, quality in forms:
        out = os.path.join(root, form_name(short, quality))
        reencode.reencode(
            out, reencode.Bound(short, None, quality), folder=os.path.join(root, 'folder'), workers=workers
        )


def bytes_per_image(cfg):
    """Stored bytes per image of cfg's training split: the files of an image folder, the shards of a tfds dataset."""
    dataset = data.resolve(cfg)
    if dataset.kind == 'folder':
        source, _ = dataset.open(cfg.split_train)
        return sum(os.path.getsize(p) for p in source.paths) / len(source)
    prepared = dataset.handle
    split = cfg.split_train.split('[')[0]
    info = prepared.info.splits[split]
    shards = [os.path.join(prepared.data_dir, f) for f in os.listdir(prepared.data_dir) if f'-{split}.' in f]
    return sum(os.path.getsize(p) for p in shards) / max(1, info.num_examples)


def bench_inline(cfg, batch, steps, uint8=True):
    """pipe.batch(s) in this process after 1 warm-up: (images per wall second,
    images per CPU-second of this process, cores other processes used)."""
    pipe = data.make_pipeline(cfg, cfg.split_train, batch, seed=0, uint8=uint8)
    pipe.batch(0)
    b0, t0, c0 = metrics.busy_cpu_seconds(), time.perf_counter(), time.process_time()
    for s in range(1, steps + 1):
        pipe.batch(s)
    wall, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, metrics.busy_cpu_seconds()
    foreign = None if b0 is None else max(0.0, (b1 - b0 - cpu) / wall)
    return steps * batch / wall, steps * batch / cpu, foreign


def bench_examples(cfg, count):
    """Decoded + augmented uint8 examples per CPU-second, one at a time (no batch stacked)."""
    pipe = data.make_pipeline(cfg, cfg.split_train, 1, seed=0)
    pipe.example(0)
    c0 = time.process_time()
    for g in range(1, count + 1):
        pipe.example(g)
    return count / (time.process_time() - c0)


def bench_workers(cfg, batch, steps, uint8=True):
    """images/s of pipe.iterate() with grain workers, after 2 warm-up batches."""
    pipe = data.make_pipeline(cfg, cfg.split_train, batch, seed=0, uint8=uint8)
    with pipe.iterate(0) as it:
        for _ in range(2):
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        wall = time.perf_counter() - t0
    return steps * batch / wall


def measure_config(cfg_for, mode, size, batch, steps, worker_counts, uint8=True):
    """The record of one dataset; cfg_for(W) is its data config with W workers."""
    load_before = os.getloadavg()
    rates, per_cpu, per_example, foreign = {}, None, None, None
    for w in worker_counts:
        cfg = cfg_for(w)
        if w == 0:
            rates[0], per_cpu, foreign = bench_inline(cfg, batch, steps, uint8)
            per_example = bench_examples(cfg, batch * steps)
        else:
            rates[w] = bench_workers(cfg, batch, steps, uint8)
    per_cpu = None if per_cpu is None else round(per_cpu, 1)  # the figure printed is the one used
    return {
        'mode': mode,
        'bytes_per_image': round(bytes_per_image(cfg_for(0))),
        'size': size,
        'batch': batch,
        'steps': steps,
        'uint8_batches': uint8,
        'workers': list(worker_counts),
        'images_per_cpu_second': per_cpu,
        'decode_augment_per_cpu_second': None if per_example is None else round(per_example, 1),
        'images_per_s': {str(w): round(r, 1) for w, r in rates.items()},
        'scaling': ({str(w): round(r / (w * per_cpu), 3) for w, r in rates.items() if w} if per_cpu else {}),
        'cores_needed': ({k: math.ceil(v / per_cpu) for k, v in TARGETS.items()} if per_cpu else {}),
        'targets_images_per_s': {k: round(v) for k, v in TARGETS.items()},
        'other_processes_cores': None if foreign is None else round(foreign, 2),
        'load_before': [round(x, 2) for x in load_before],
        'load_after': [round(x, 2) for x in os.getloadavg()],
    }


def measure(mode, root, size, batch, steps, worker_counts, uint8=True, resize='pil'):
    """The record of one mode of the generated set under root ('folder', 'tfds_jpeg' or a re-encoded form)."""
    cfg_for = lambda w: _config(mode, root, size, w, resize)  # noqa: E731
    return {**measure_config(cfg_for, mode, size, batch, steps, worker_counts, uint8), 'resize': resize}


MODES = ('folder', 'tfds_jpeg')


def _common(extra):
    return {
        'date': datetime.date.today().isoformat(),
        'machine': platform.processor() or platform.machine(),
        'cores': workers.available_cores(),
        **extra,
    }


def run(
    images,
    modes=MODES,
    size=224,
    batch=64,
    steps=12,
    worker_counts=(0, 1, 2),
    root=None,
    uint8=True,
    forms=(),
    dataset=None,
    resize='pil',
):
    """Yields one record per mode. With `dataset` (a data config: a named tfds dataset or an image folder) it
    measures that, as mode 'dataset'; otherwise it writes `images` ImageNet-like JPEGs under root (a temporary
    folder if None) and measures each of `modes` and each re-encoded form (short side, quality) of `forms`.
    uint8=False measures float32 batches normalised on the host instead of the uint8 ones training reads; resize is
    data.resize ('pil' or 'torch')."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f'unknown modes {unknown}; choose from {", ".join(MODES)}')
    if dataset is not None:

        def cfg_for(w):
            cfg = data.data_config_from(dataset.to_dict() if hasattr(dataset, 'to_dict') else dataset)
            cfg.update(image_size=size, augment='mae', num_workers=w, prefetch=4)
            cfg.resize = resize
            return cfg

        data.validate_data_config(cfg_for(0))
        yield {
            **measure_config(cfg_for, 'dataset', size, batch, steps, worker_counts, uint8),
            **_common({'name': dataset['name']}),
        }
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = root or tmp
        t0 = time.perf_counter()
        jpegs = imagenet_like_jpegs(images)
        write_data(root, jpegs, forms)
        common = _common(
            {
                'images': len(jpegs),
                'mean_kib': round(sum(len(b) for b, _ in jpegs) / len(jpegs) / 1024, 1),
                'write_s': round(time.perf_counter() - t0, 1),
            }
        )
        for mode in list(modes) + [form_name(*f) for f in forms]:
            yield {**measure(mode, root, size, batch, steps, worker_counts, uint8, resize), **common}
