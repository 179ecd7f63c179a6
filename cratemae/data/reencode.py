"""Prepare once for speed: a dataset re-encoded at a bounded size, written as an image folder.

Decode time tracks a file's bytes and resize time the crop's pixels, so training from images stored smaller costs
less per image than from the originals (docs/data.md measures how much, per bound and quality). `reencode` reads a
prepared tfds dataset or an image folder and writes every image of the chosen splits, with its label, as a JPEG into
an image folder that `--config.data.name=image_folder --config.data.folder=OUT` reads like any other:

  * size: scaled by s = min(1, short_side / min(H, W), max_side / max(H, W)) with PIL's antialiased bicubic (the
    reference's filter), never enlarged; EXIF orientation and the colour rules of `decode.py` applied first, so the
    stored pixels are what the loader would have seen; grey stays grey (1 plane), everything else becomes RGB;
  * a JPEG already within the bound (and stored upright in L or RGB) is copied byte for byte: no second loss;
  * layout: `OUT/<split>/<class>/<file>.jpg`. A folder's layout is mirrored (split subfolders or none; every class
    folder, even one left empty, so labels keep their numbers); a tfds dataset's classes become folders named
    `<label, zero-padded>_<ClassLabel name>`, whose sorted order is the label order, and its records are
    `<record index>.jpg`;
  * in parallel over `workers` processes, in chunks; every file is written to `<name>.<pid>.partial` and renamed
    into place, so an interrupted run leaves whole files only, and running the same command again writes just the
    missing ones. `OUT/reencode.json` records the source and the settings (a second run with other settings is an
    error) and, once all are written, the counts;
  * the source is only read: an output folder that is, holds or lies inside the source is refused.

Images the source cannot decode are left out, counted and logged, as the folder loader skips them.
"""

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import time
from typing import Optional

import numpy as np
from PIL import Image

from cratemae.data import decode
from cratemae.data import folder as folder_lib
from cratemae.data import tfds_source
from cratemae.data import workers as workers_lib

log = logging.getLogger(__name__)

MARKER = 'reencode.json'
PARTIAL = '.partial'
# The defaults `python -m launch.prepare_data --reencode_to` uses, chosen from the measurements in docs/data.md.
DEFAULT_SHORT_SIDE = 320
DEFAULT_QUALITY = 90
_CHUNK = 64
_GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'F', 'I;16', 'I;16B', 'I;16L', 'I;16N')


@dataclasses.dataclass(frozen=True)
class Bound:
    """The size bound and the JPEG quality of a re-encoded copy."""

    short_side: Optional[int] = DEFAULT_SHORT_SIDE
    max_side: Optional[int] = None
    quality: int = DEFAULT_QUALITY

    def check(self):
        problems = []
        if self.short_side is None and self.max_side is None:
            problems.append('give a size bound: --short_side and/or --max_side')
        for name in ('short_side', 'max_side'):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                problems.append(f'--{name}={v!r} must be a positive number of pixels')
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            problems.append(f'--quality={self.quality!r} must be a JPEG quality in 1..100')
        if problems:
            raise ValueError('; '.join(problems))

    def size(self, width, height):
        """(width, height) within the bound, aspect kept, never enlarged."""
        s = 1.0
        if self.short_side is not None:
            s = min(s, self.short_side / min(width, height))
        if self.max_side is not None:
            s = min(s, self.max_side / max(width, height))
        if s >= 1.0:
            return width, height
        return max(1, round(width * s)), max(1, round(height * s))


def reencode_image(payload, bound):
    """Encoded bytes (or a uint8 array) -> JPEG bytes within `bound`; raises decode.UndecodableImage."""
    if decode.is_encoded(payload):
        im = decode.open_image(payload)
        height, width = decode.displayed_size(im)
        upright = decode._orientation(im) == 1  # pylint: disable=protected-access
        if bound.size(width, height) == (width, height) and im.format == 'JPEG' and upright:
            if im.mode in ('L', 'RGB'):
                return bytes(payload)
        pixels = decode.decode(payload, 1 if im.mode in _GREY_MODES else 3)
    else:
        pixels = np.asarray(payload, np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels[:, :, :3]
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
    target = bound.size(*image.size)
    if target != image.size:
        image = image.resize(target, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, 'JPEG', quality=bound.quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# work lists: (reference to read, output path relative to OUT)


def _folder_jobs(root):
    """([(source path, relative output path)], [relative class folders to create])."""
    splits = folder_lib.split_folders(root)
    jobs, dirs = [], []
    for split in splits or ['']:
        base = os.path.join(root, split)
        files, classes = folder_lib.list_files(base)
        dirs += [os.path.join(split, c) for c in classes or []] or [split]
        for path, _ in files:
            rel = os.path.relpath(path, root)
            stem, ext = os.path.splitext(rel)
            jobs.append((path, stem + '.jpg' if ext.lower() in ('.jpg', '.jpeg') else rel + '.jpg'))
    return jobs, dirs


def _class_folders(names, count):
    width = len(str(max(count - 1, 0)))
    return [
        f'{i:0{width}d}' + (f'_{re.sub(r"[^A-Za-z0-9._-]+", "_", names[i])}' if names else '') for i in range(count)
    ]


def _tfds_jobs(prepared, splits):
    """([((split, index), relative output path)], [folders]) of a `tfds_source.PreparedDataset`, splits named as
    the folder loader reads them."""
    name = prepared.name
    available = list(prepared.info.splits)
    chosen = splits or [s for s in available if s in folder_lib.SPLIT_FOLDERS]
    unreadable = [s for s in chosen if s not in folder_lib.SPLIT_FOLDERS]
    missing = [s for s in chosen if s not in available]
    if missing or unreadable or not chosen:
        raise ValueError(
            f"tfds dataset '{tfds_source.tfds_name(name)}' has splits {available}; an image folder holds "
            f'{", ".join(folder_lib.SPLIT_FOLDERS)}: choose among those with --splits'
            + (f' ({missing} not in the dataset)' if missing else '')
            + (f' ({unreadable} not a split folder name)' if unreadable else '')
        )
    count = prepared.num_classes
    classes = _class_folders(prepared.class_names or [], count) if count else None
    jobs, dirs = [], []
    for split in chosen:
        source, _ = prepared.open(split)
        width = len(str(max(len(source) - 1, 0)))
        dirs += [os.path.join(split, c) for c in classes] if classes else [split]
        labels = _labels(source)
        for i in range(len(source)):
            folder = os.path.join(split, classes[labels[i]]) if classes else split
            jobs.append(((split, i), os.path.join(folder, f'{i:0{width}d}.jpg')))
    return jobs, dirs


def _labels(source):
    """Every record's label, read from the label feature alone (the image bytes are not decoded or kept)."""
    if source.label_key is None:
        return [-1] * len(source)
    return [int(source.source[i][source.label_key]) for i in range(len(source))]


# ----------------------------------------------------------------------------------------------------------------
# workers


class _Reader:
    """ref -> payload, for one source; a tfds dataset is opened once in each worker process (in this one, the
    `prepared` dataset handed in)."""

    def __init__(self, kind, name=None, data_dir=None, prepared=None):
        self.kind, self.name, self.data_dir = kind, name, data_dir
        self._prepared, self._splits = prepared, {}

    def __getstate__(self):
        return dict(self.__dict__, _prepared=None, _splits={})  # the builder stays in the process that opened it

    def __call__(self, ref):
        if self.kind == 'folder':
            with open(ref, 'rb') as f:
                return f.read()
        split, index = ref
        if split not in self._splits:
            if self._prepared is None:
                self._prepared = tfds_source.PreparedDataset(self.name, self.data_dir)
            self._splits[split] = self._prepared.open(split)[0]
        return self._splits[split][index][0]


_WORKER = {}


def _init_worker(reader, out, bound):
    _WORKER.update(reader=reader, out=out, bound=bound)


def _run_chunk(chunk):
    """Writes the chunk's missing outputs: {written, skipped, failed: [(ref, why)], bytes_in, bytes_out}."""
    reader, out, bound = _WORKER['reader'], _WORKER['out'], _WORKER['bound']
    stats = {'written': 0, 'skipped': 0, 'failed': [], 'bytes_in': 0, 'bytes_out': 0}
    for ref, rel in chunk:
        target = os.path.join(out, rel)
        if os.path.exists(target):
            stats['skipped'] += 1
            continue
        try:
            payload = reader(ref)
            encoded = reencode_image(payload, bound)
        except (OSError, decode.UndecodableImage) as e:
            stats['failed'].append((str(ref), str(e)))
            continue
        partial = f'{target}.{os.getpid()}{PARTIAL}'
        with open(partial, 'wb') as f:
            f.write(encoded)
        os.replace(partial, target)
        stats['written'] += 1
        stats['bytes_in'] += len(payload) if decode.is_encoded(payload) else 0
        stats['bytes_out'] += len(encoded)
    return stats


# ----------------------------------------------------------------------------------------------------------------
# the command


def _inside(path, parent):
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _check_out(out, source_dir):
    if _inside(out, source_dir) or _inside(source_dir, out):
        raise ValueError(
            f'the output {out!r} is, holds or lies inside the source {source_dir!r}: the source is only read. '
            'Choose an output folder elsewhere.'
        )


def _open_marker(out, settings):
    """Creates OUT and its marker, or checks an existing one against `settings` (a resumed run)."""
    path = os.path.join(out, MARKER)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        differ = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if differ:
            raise ValueError(
                f'{out} holds a re-encoded copy made with other settings {differ} (before, now): resume with the '
                'same command, or choose another output folder.'
            )
        return previous
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f'{out} exists and is not a re-encoded copy (no {MARKER}): choose an empty or new folder.')
    os.makedirs(out, exist_ok=True)
    record = dict(settings, complete=False)
    _write_json(path, record)
    return record


def _write_json(path, record):
    partial = path + PARTIAL
    with open(partial, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(partial, path)


def _remove_partials(out):
    for root, _, names in os.walk(out):
        for n in names:
            if n.endswith(PARTIAL):
                os.remove(os.path.join(root, n))


def reencode(out, bound, folder=None, tfds_name=None, data_dir=None, splits=None, workers='auto'):
    """Writes the re-encoded copy of an image folder (`folder`) or a prepared tfds dataset (`tfds_name`, read from
    `data_dir`) into the image folder `out`; returns the marker record with the counts. See the module docstring."""
    bound.check()
    if (folder is None) == (tfds_name is None):
        raise ValueError('re-encode either an image folder (--folder) or a tfds dataset, not both or neither')
    if folder is not None:
        if not os.path.isdir(folder):
            raise ValueError(f'--folder={folder!r} is not a directory')
        if splits:
            raise ValueError('--splits chooses tfds splits; an image folder is copied whole (its split folders too)')
        _check_out(out, folder)
        source = {'folder': os.path.realpath(folder)}
        jobs, dirs = _folder_jobs(folder)
        reader = _Reader('folder')
    else:
        prepared = tfds_source.PreparedDataset(tfds_name, data_dir)
        _check_out(out, prepared.data_dir)
        source = {
            'tfds': tfds_source.tfds_name(tfds_name),
            'data_dir': os.path.realpath(os.path.dirname(prepared.data_dir)),
        }
        jobs, dirs = _tfds_jobs(prepared, splits)
        reader = _Reader('tfds', tfds_name, data_dir, prepared)
    if not jobs:
        raise ValueError(f'no images to re-encode in {source}')
    settings = dict(source=source, **dataclasses.asdict(bound))
    _open_marker(out, settings)
    _remove_partials(out)
    for d in dirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    count = workers_lib.available_cores() if workers == 'auto' else int(workers)
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    totals = {'written': 0, 'skipped': 0, 'failed': [], 'bytes_in': 0, 'bytes_out': 0}
    t0, c0 = time.perf_counter(), time.process_time()
    if count <= 1:
        _init_worker(reader, out, bound)
        results = map(_run_chunk, chunks)
        pool = None
    else:
        ctx = multiprocessing.get_context('spawn')  # no fork of a process holding tfds / array_record state
        pool = ctx.Pool(min(count, len(chunks)), initializer=_init_worker, initargs=(reader, out, bound))
        results = pool.imap_unordered(_run_chunk, chunks)
    try:
        for stats in results:
            for k in ('written', 'skipped', 'bytes_in', 'bytes_out'):
                totals[k] += stats[k]
            totals['failed'] += stats['failed']
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for ref, why in totals['failed'][:5]:
        log.warning('re-encode: left out %s (%s)', ref, why)
    if totals['failed']:
        log.warning('re-encode: left out %d undecodable image(s) of %d', len(totals['failed']), len(jobs))
    stored = sum(os.path.getsize(os.path.join(out, rel)) for _, rel in jobs if os.path.exists(os.path.join(out, rel)))
    record = dict(
        settings,
        complete=True,
        images=len(jobs) - len(totals['failed']),
        left_out=len(totals['failed']),
        stored_bytes=stored,
        this_run={
            'written': totals['written'],
            'already_there': totals['skipped'],
            'wall_s': round(time.perf_counter() - t0, 2),
            'main_process_cpu_s': round(time.process_time() - c0, 2),
            'workers': count,
            'bytes_read': totals['bytes_in'],
            'bytes_written': totals['bytes_out'],
        },
    )
    _write_json(os.path.join(out, MARKER), record)
    return record
