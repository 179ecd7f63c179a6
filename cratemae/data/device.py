"""The device side of the input: normalising uint8 batches inside the jitted step, and device prefetch.

Batches can travel as uint8 (`make_pipeline(..., uint8=True)`): a quarter of the bytes of float32 through shared
memory, host memory and the host-to-device copy. `normalize` then runs on the devices, inside the jitted step, with
the float32 constants of `augment.normalize`:

    x_norm = x * (1 / (255 std)) + (-mean / std)        (= (x / 255 - mean) / std)

so the device batch equals the host-normalised one within float32 rounding (XLA may fuse the two operations into
one multiply-add, which rounds once instead of twice).

`prefetch(batches, mesh, size=2)` keeps `size` batches in flight on the devices, each placed with the batch sharding
(`sharding.host_local_to_global`: every host passes its own rows). The copy is asynchronous, so the host-to-device
transfer of the next batches overlaps the running step. `eval_batches` is the same path for evaluation: the eval
pipeline's worker processes decode, and the batches reach the devices ahead of the step that reads them.
"""

import collections
import itertools

import jax.numpy as jnp
import numpy as np

from cratemae import sharding
from cratemae.data import augment


def normalize(images, mean, std):
    """float32 (x / 255 - mean) / std of a uint8 (..., C) array, traceable inside jit. mean and std are rounded to
    float32 first, as the host transform holds them, so both paths use the same constants."""
    scale, bias = augment.normalize_constants(np.float32(mean), np.float32(std))
    return images.astype(jnp.float32) * scale + bias


def prefetch(batches, mesh, size=2):
    """(step, host-local numpy batch) iterator -> (step, global device batch), `size` batches ahead."""
    it = iter(batches)
    queue = collections.deque()

    def put():
        item = next(it, None)
        if item is not None:
            step, batch = item
            queue.append((step, sharding.host_local_to_global(batch, mesh)))

    for _ in range(max(1, size)):
        put()
    while queue:
        item = queue.popleft()
        put()  # the next copy starts before this step runs
        yield item


def eval_batches(pipe, mesh, count=None, size=2):
    """(host-local numpy batch, global device batch) of the first ``count`` batches (default: all) of the eval
    pipeline ``pipe``, made by its workers (``Pipeline.iterate``) and copied ``size`` batches ahead to the devices."""
    count = pipe.num_batches if count is None else min(count, pipe.num_batches)
    hosts = {}

    def host_batches(batches):
        for step, batch in itertools.islice(batches, count):
            hosts[step] = batch
            yield step, batch

    with pipe.iterate() as batches:
        for step, batch in prefetch(host_batches(batches), mesh, size):
            yield hosts.pop(step), batch
