"""Deterministic, checkpointable input pipelines on grain.

Order. Training reads an infinite stream of example positions g = 0, 1, 2, ...
Position g is epoch e = g // N, slot k = g % N, and shows example
perm_e[k], where perm_e is grain's per-epoch index shuffle seeded by
(shuffle_seed + e) (`grain.MapDataset.shuffle`, a Feistel permutation: random
access, no table in memory). The global batch at step s is positions
[s * GB, (s + 1) * GB); host h of P takes the contiguous slice
[s * GB + h * B, s * GB + (h + 1) * B) with B = GB / P, so the global batch is
the concatenation of the host slices, identical for any P. Augmentation is a
`grain.MapDataset.random_map`, whose rng is seeded by (aug_seed, g), and g
determines (epoch, example). So the batch at step s is a pure function of
(seed, s, host): the data position in a checkpoint is the step alone, and
resuming at step s reproduces exactly the batches an uninterrupted run sees.

Eval reads the split in stored order, batch i = positions [i * GB, (i+1) * GB)
split across hosts the same way; positions >= N repeat from the start
(g mod N) and are marked valid=False. num_batches = ceil(N / GB).

`iterate(start)` produces batches `config.data.prefetch` ahead of the
consumer: in process with grain's read-ahead thread (`ReadOptions`), and with
num_workers > 0 in grain worker processes (`IterDataset.mp_prefetch`, each
worker making whole batches) copied out of shared memory by a thread of ours.
"""

import dataclasses
import logging
import math
import queue
import threading
from typing import Optional
from typing import Tuple

import grain
import numpy as np

from cratemae.data import augment
from cratemae.data import config as config_lib
from cratemae.data import decode
from cratemae.data import randaugment
from cratemae.data import registry
from cratemae.data import workers

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the model sees: output image_size/channels and the mean/std used."""

    name: str
    num_examples: int
    num_classes: Optional[int]
    image_size: int
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


class _Transform:
    """(index, payload, label) -> (uint8 HWC image at size, label); picklable
    for workers. A payload is a uint8 array (embedded sources, tfds Tensor
    features) or encoded bytes (folder files, tfds Image features), which
    `decode.decode_crop` decodes straight to the crop. Bytes that do not
    decode are replaced by the next decodable record of the source
    (deterministically) and logged. Normalisation happens once per batch
    (`_Batcher`): vectorised, on a quarter of the bytes."""

    def __init__(
        self,
        source,
        size,
        channels,
        mean,
        std,
        scale,
        flip,
        crop_pct,
        mae_crop=True,
        randaugment_spec=None,
        resize='pil',
    ):
        self.source = source
        self.resize = resize
        self.size, self.channels = size, channels
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.scale, self.flip, self.crop_pct = tuple(scale), flip, crop_pct
        self.mae_crop, self.randaugment_spec = mae_crop, randaugment_spec

    def _crop(self, example, box_fn, flip_fn=None):
        """(cropped uint8 image, flipped if flip_fn() says so, label) of example = (index, payload, label);
        a replacement record brings its own label. flip_fn is called once, after box_fn, as the rng draws."""
        index, payload, label = example
        n = len(self.source)
        for k in range(_MAX_FALLBACK):
            try:
                if decode.is_encoded(payload):
                    return decode.decode_crop(
                        payload, box_fn, self.size, self.channels, flip_fn=flip_fn, resize=self.resize
                    ), label
                image = augment.to_channels(payload, self.channels)
                image = augment.resized_crop(image, box_fn(*image.shape[:2]), self.size)
                if flip_fn is not None and flip_fn():
                    image = augment.hflip(image)
                return image, label
            except decode.UndecodableImage as e:
                j = (int(index) + k + 1) % n
                log.warning(
                    'record %d of %s: %s; using record %d instead',
                    (int(index) + k) % n,
                    _describe(self.source, (int(index) + k) % n),
                    e,
                    j,
                )
                payload, label = self.source[j]
        raise decode.UndecodableImage(f'{_MAX_FALLBACK} consecutive records from index {index} failed to decode')

    def train(self, example, rng):
        if self.mae_crop:
            box_fn = lambda h, w: augment.random_resized_crop_box(rng, h, w, self.scale)
        else:
            box_fn = lambda h, w: augment.center_box(h, w, self.crop_pct)
        flip_fn = (lambda: rng.random() < 0.5) if self.mae_crop and self.flip else None
        image, label = self._crop(example, box_fn, flip_fn)
        if self.randaugment_spec is not None:  # after crop and flip, as torchvision's Compose in the reference
            image = randaugment.rand_augment(image, rng, *self.randaugment_spec)
        return image, label

    def eval(self, example):
        return self._crop(example, lambda h, w: augment.center_box(h, w, self.crop_pct))


# Decode failures in a row before giving up (a dataset of junk, not one bad file).
_MAX_FALLBACK = 16


def _describe(source, i):
    """A file path for folder sources, else the record index."""
    paths = getattr(source, 'paths', None)
    return paths[i] if paths is not None else type(source).__name__


class _Indexed:
    """grain source: i -> (i, payload, label), so a failed decode can fall back."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        payload, label = self.source[int(i)]
        return int(i), payload, label


def _derive_seeds(seed):
    """Two independent 32-bit seeds (shuffle, augment) from the user seed;
    hashing keeps (seed, epoch + 1) from equalling (seed + 1, epoch) in
    grain's seed + epoch per-epoch shuffle seed."""
    state = np.random.SeedSequence([int(seed), 0x0C7A7E]).generate_state(2)
    return int(state[0]), int(state[1])


class _Batcher:
    """Index math + grain dataset; pickled into grain worker processes."""

    def __init__(
        self, source, transform, seed, global_batch, process_index, process_count, train, augment_train, uint8=False
    ):
        self.source, self.transform = source, transform
        self.seed, self.train, self.augment_train = seed, train, augment_train
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.num_examples = len(source)
        self.uint8 = uint8
        self._ds = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_ds'] = None  # rebuilt lazily in the worker
        return state

    @property
    def dataset(self):
        """grain.MapDataset: global position g -> (uint8 image, label)."""
        if self._ds is None:
            ds = grain.MapDataset.source(_Indexed(self.source))
            if self.train:
                shuffle_seed, aug_seed = _derive_seeds(self.seed)
                ds = ds.shuffle(seed=shuffle_seed)
                if self.augment_train:
                    ds = ds.random_map(self.transform.train, seed=aug_seed)
                else:
                    ds = ds.map(self.transform.eval)
            else:
                ds = ds.map(self.transform.eval)
            self._ds = ds
        return self._ds

    def positions(self, step):
        start = int(step) * self.global_batch + self.offset
        return np.arange(start, start + self.local_batch, dtype=np.int64)

    def __call__(self, step):
        """The batch at `step` for this host."""
        g = self.positions(step)
        index = g if self.train else g % self.num_examples
        examples = [self.dataset[int(i)] for i in index]
        images = np.stack([e[0] for e in examples])
        t = self.transform
        batch = {
            'image': images if self.uint8 else augment.normalize(images, t.mean, t.std),
            'label': np.asarray([e[1] for e in examples], np.int32),
        }
        if not self.train:
            batch['valid'] = g < self.num_examples
        return batch


class Pipeline:
    """Input for one split on one host; see the module docstring for order. `dataset`: cfg's dataset already
    resolved (`registry.resolve`), e.g. shared by a train and an eval pipeline; None resolves it here."""

    def __init__(
        self,
        cfg,
        split,
        global_batch,
        seed,
        process_index=0,
        process_count=1,
        train=True,
        uint8=False,
        dataset=None,
    ):
        config_lib.validate_data_config(cfg)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f'global_batch={global_batch} must be a positive multiple of process_count={process_count}'
            )
        dataset = registry.resolve(cfg, dataset)
        source, split = dataset.open(split)
        mean, std, crop_pct = dataset.mean, dataset.std, dataset.eval_crop_pct
        rand_aug = cfg.get('randaugment')
        rand_aug = None if rand_aug is None else tuple(int(v) for v in rand_aug)
        transform = _Transform(
            source,
            cfg.image_size,
            cfg.channels,
            mean,
            std,
            cfg.crop_scale,
            cfg.hflip,
            crop_pct,
            mae_crop=cfg.augment == 'mae',
            randaugment_spec=rand_aug,
            resize=cfg.get('resize', 'pil'),
        )
        self.dataset = dataset
        self.info = DataInfo(
            name=dataset.name,
            num_examples=len(source),
            num_classes=dataset.num_classes,
            image_size=dataset.image_size,
            channels=dataset.channels,
            mean=mean,
            std=std,
        )
        self.split, self.train = split, train
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.prefetch = cfg.prefetch
        batch_bytes = self.local_batch * cfg.image_size**2 * cfg.channels * (1 if uint8 else 4)
        self.num_workers = workers.resolve(
            cfg.num_workers, decodes=dataset.kind != 'embedded', batch_bytes=batch_bytes, buffer=max(1, cfg.prefetch)
        )
        self._batcher = _Batcher(
            source,
            transform,
            seed,
            global_batch,
            process_index,
            process_count,
            train,
            augment_train=cfg.augment == 'mae' or rand_aug is not None,
            uint8=uint8,
        )
        log.info(
            'data %s[%s]: %d examples, %s, host %d/%d gets %d of %d per step',
            dataset.name,
            split,
            len(source),
            f'augment={cfg.augment}, randaugment={rand_aug}' if train else f'eval crop_pct={crop_pct}',
            process_index,
            process_count,
            self.local_batch,
            global_batch,
        )

    @property
    def steps_per_epoch(self):
        """N // GB (at least 1). Epochs need not align with steps: a batch
        may straddle an epoch boundary."""
        return max(1, self.info.num_examples // self.global_batch)

    @property
    def num_batches(self):
        """ceil(N / GB): eval batches covering the split once."""
        return math.ceil(self.info.num_examples / self.global_batch)

    def batch(self, step):
        """{'image': float32 (B, H, W, C) normalised (uint8, not normalised, if
        the pipeline was made with uint8=True: `device.normalize` does it on the
        devices), 'label': int32 (B,)} at `step`;
        eval batches also carry 'valid' (bool (B,)). B = GB / process_count."""
        if not self.train and not 0 <= step < self.num_batches:
            raise IndexError(f'eval batch {step} out of range [0, {self.num_batches})')
        return self._batcher(step)

    def example(self, position):
        """(uint8 HWC image, label) at global stream position `position`:
        decoded and augmented as in batch(), before normalisation."""
        return self._batcher.dataset[int(position)]

    def iterate(self, start_step=0):
        """Iterator of (step, batch) from start_step (train: forever; eval: to
        num_batches), made `prefetch` batches ahead of the consumer. Call
        .close() (or use `with`) to stop the producers early.

        In process, grain's own read-ahead thread makes the batches
        (`ReadOptions`). With num_workers > 0, grain worker processes make them
        (`mp_prefetch`) and one thread of ours copies each out of shared
        memory: grain's `ThreadPrefetchIterDataset` in that place stopped
        scaling (16-core host, 2026-11-29: 373 images/s at 4 workers, 95 at
        15, against 683 and 2,163 with this thread; docs/data.md)."""
        stop = self.num_batches if not self.train else start_step + 2**40  # "forever"
        if self.num_workers > 0:
            return Prefetcher(
                _grain_worker_iter(self._batcher, start_step, stop, self.num_workers, max(1, self.prefetch)),
                self.prefetch,
            )
        ds = grain.MapDataset.range(start_step, max(start_step, stop)).map(_StepBatch(self._batcher))
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=1 if self.prefetch else 0, prefetch_buffer_size=self.prefetch)
        )
        return _Batches(iter(ds))


class _StepBatch:
    """step -> (step, batch); a class (not a lambda) so it pickles."""

    def __init__(self, batcher):
        self.batcher = batcher

    def __call__(self, step):
        return int(step), self.batcher(step)


class _Batches:
    """grain's iterator of (step, batch), closable, usable with `with`."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        self._it.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _grain_worker_iter(batcher, start, stop, num_workers, buffer):
    """Batches made by grain worker processes, in step order."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        # grain's workers read an absl flag; unparsed flags raise otherwise.
        flags.FLAGS.mark_as_parsed()
    stop = start + 2**40 if stop is None else stop  # "forever" for training
    ds = grain.MapDataset.range(start, stop).map(_StepBatch(batcher))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer))
    it = iter(ds)
    # Workers hand back arrays in shared memory; copying them into ordinary
    # arrays (in the prefetch thread) frees each segment at once instead of
    # whenever the consumer drops the batch, even at interpreter exit.
    try:
        for step, batch in it:
            yield step, {k: np.array(v) for k, v in batch.items()}
    finally:
        it.close()


_END = object()


class _Raised:
    def __init__(self, error):
        self.error = error


class Prefetcher:
    """Runs an iterator in a daemon thread, `size` items ahead (0: inline)."""

    def __init__(self, iterator, size):
        self._it = iterator
        self._size = size
        self._stop = threading.Event()
        self._thread = None
        if size > 0:
            self._queue = queue.Queue(maxsize=size)
            self._thread = threading.Thread(target=self._run, daemon=True, name='cratemae-data-prefetch')
            self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for item in self._it:
                if not self._put(item):
                    return
        except BaseException as e:  # pylint: disable=broad-except
            self._put(_Raised(e))  # re-raised in the consumer
            return
        self._put(_END)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._it)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            raise StopIteration
        if isinstance(item, _Raised):
            self._queue.put(item)  # the producer is gone: keep raising
            raise item.error
        return item

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():  # still inside the iterator: leave it
                return
        close = getattr(self._it, 'close', None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_pipeline(
    cfg, split, global_batch, seed, process_index=0, process_count=1, train=True, uint8=False, dataset=None
):
    """The pipeline the train/eval loops read; see `Pipeline`. uint8=True
    hands uint8 batches over, to be normalised on the devices (`device.py`);
    `dataset` hands on cfg's dataset resolved once (`registry.resolve`)."""
    return Pipeline(
        cfg,
        split,
        global_batch,
        seed,
        process_index=process_index,
        process_count=process_count,
        train=train,
        uint8=uint8,
        dataset=dataset,
    )
