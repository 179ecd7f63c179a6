"""Re-encoded forms against the originals, old code against new, alternating in one run: JSON lines.

  JAX_PLATFORMS=cpu python tools/reencode_sweep.py --images 512 --forms 224:90,256:90,320:75,320:90,320:95,384:90 \
      --old /path/to/a/checkout/of/the/old/code --rounds 3 [--prepare_images 10000]

1. Writes `--images` ImageNet-like JPEGs (`throughput.imagenet_like_jpegs`: 500x375, ~110 KiB) as an image folder
   and re-encodes that folder once per SHORT_SIDE:QUALITY of `--forms` (`reencode.reencode`, as `python -m
   launch.prepare_data --reencode_to` does): one `prepare` record per form with the stored bytes per image and the
   CPU-seconds per image (this process and its worker processes together).
2. `--rounds` times, for every form (the originals first) and every code (`--old`, then this checkout with
   data.resize='pil' and with 'torch'): a fresh
   Python process (PYTHONPATH = that code) reads the form as an image folder through `data.make_pipeline(...,
   uint8=True)` at 224 px with MAE augmentation, and times 3 passes of `--steps` batches of `--batch` after one
   warm-up: one `speed` record with images per CPU-second of that process in its fastest pass (all three listed). The codes alternate within
   every form, so a slow spell of the shared machine hits both alike.
3. With `--prepare_images N`: N more such JPEGs re-encoded at the default bound and quality with
   `--prepare_workers` processes: one `prepare_big` record (wall and CPU-seconds, stored sizes).

Every record carries the load average before and after, the CPU model and the date.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cratemae.data import reencode  # noqa: E402
from cratemae.data import throughput  # noqa: E402
from tools import machine  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SPEED = r"""
import json, sys, time
from cratemae import data
folder, size, batch, steps, resize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cfg = data.default_data_config()
cfg.update(name='image_folder', folder=folder, image_size=size, channels=3, augment='mae', hflip=True,
           num_workers=0, prefetch=0)
if resize != 'default':
    cfg.resize = resize
pipe = data.make_pipeline(cfg, 'train', batch, seed=0, uint8=True)
pipe.batch(0)
passes = []
for p in range(3):  # the fastest pass is the least disturbed by neighbours
    c0 = time.process_time()
    for s in range(1 + p * steps, 1 + (p + 1) * steps):
        pipe.batch(s)
    passes.append(steps * batch / (time.process_time() - c0))
print(json.dumps({'images_per_cpu_second': max(passes), 'passes': [round(x, 1) for x in passes]}))
"""


def _cpu_seconds():
    """CPU-seconds of this process and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stamp(record):
    return {
        **record,
        'date': datetime.date.today().isoformat(),
        'cpu': machine.cpu_model(),
        'load_after': [round(x, 2) for x in os.getloadavg()],
    }


def _write_folder(root, jpegs):
    for i, (payload, label) in enumerate(jpegs):
        d = os.path.join(root, f'class_{label}')
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f'{i:05d}.jpg'), 'wb') as f:
            f.write(payload)


def _prepare(src, out, bound, workers):
    load = [round(x, 2) for x in os.getloadavg()]
    c0, t0 = _cpu_seconds(), time.perf_counter()
    record = reencode.reencode(out, bound, folder=src, workers=workers)
    cpu, wall = _cpu_seconds() - c0, time.perf_counter() - t0
    n = record['images']
    return {
        'short_side': bound.short_side,
        'quality': bound.quality,
        'images': n,
        'bytes_per_image': round(record['stored_bytes'] / n),
        'workers': record['this_run']['workers'],
        'wall_s': round(wall, 2),
        'cpu_s': round(cpu, 2),
        'cpu_ms_per_image': round(cpu / n * 1e3, 3),
        'load_before': load,
    }


def _speed(code, folder, size, batch, steps, resize):
    load = [round(x, 2) for x in os.getloadavg()]
    env = dict(os.environ, PYTHONPATH=code, JAX_PLATFORMS='cpu')
    out = subprocess.run(
        [sys.executable, '-c', _SPEED, folder, str(size), str(batch), str(steps), resize],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=code,
    ).stdout
    return {**json.loads(out.strip().splitlines()[-1]), 'load_before': load}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--images', type=int, default=512)
    parser.add_argument('--forms', default='224:90,256:90,320:75,320:90,320:95,384:90')
    parser.add_argument('--old', default=None, help='a checkout of the code to compare with (none: new only)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--prepare_images', type=int, default=0)
    parser.add_argument('--prepare_workers', default='auto')
    parser.add_argument('--out', default=None, help='append the records to this JSONL file too')
    parser.add_argument('--root', default=None, help='keep the data here (a rerun reuses complete copies)')
    args = parser.parse_args()
    forms = throughput.parse_forms(args.forms.split(',')) if args.forms else []

    def emit(record):
        line = json.dumps(_stamp(record))
        print(line, flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                f.write(line + '\n')

    codes = [('old', os.path.abspath(args.old), 'default')] if args.old else []
    codes += [('new', HERE, 'pil'), ('new_torch_resize', HERE, 'torch')]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        src = os.path.join(root, 'original')
        jpegs = throughput.imagenet_like_jpegs(args.images)
        if not os.path.isdir(src):
            _write_folder(src, jpegs)
        folders = {'original': src}
        emit(
            {
                'kind': 'prepare',
                'form': 'original',
                'images': len(jpegs),
                'bytes_per_image': round(sum(len(b) for b, _ in jpegs) / len(jpegs)),
            }
        )
        for short, quality in forms:
            name = throughput.form_name(short, quality)
            folders[name] = os.path.join(root, name)
            bound = reencode.Bound(short, None, quality)
            emit({'kind': 'prepare', 'form': name, **_prepare(src, folders[name], bound, args.prepare_workers)})
        for r in range(args.rounds):
            for name, folder in folders.items():
                for code_name, code, resize in codes:
                    rec = _speed(code, folder, args.size, args.batch, args.steps, resize)
                    emit({'kind': 'speed', 'round': r, 'form': name, 'code': code_name, **rec})
        if args.prepare_images:
            big = os.path.join(root, 'big')
            t0, c0 = time.perf_counter(), time.process_time()
            _write_folder(big, throughput.imagenet_like_jpegs(args.prepare_images, seed=1))
            generate = {'wall_s': round(time.perf_counter() - t0, 1), 'cpu_s': round(time.process_time() - c0, 1)}
            record = _prepare(big, os.path.join(root, 'big_out'), reencode.Bound(), args.prepare_workers)
            source_bytes = (
                sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(big) for n in names)
                / args.prepare_images
            )
            emit({'kind': 'prepare_big', 'source_bytes_per_image': round(source_bytes), 'generate': generate, **record})


if __name__ == '__main__':
    main()
