"""How many grain worker processes make batches: `config.data.num_workers`.

'auto' (the default) sizes the count from the cores this process may run on
(its CPU affinity, which a scheduler or `taskset` narrows, not the machine's
core count): all of them but `TRAINER_CORES`, which the training process
keeps for dispatching steps and copying batches to the devices, capped at
`MAX_AUTO`. Sources that only slice arrays already in memory (the embedded
datasets) need no decoding, so 'auto' runs them in process (0 workers).

Any count, 'auto' or explicit, is then checked against the shared memory
(/dev/shm) the workers hand batches through: each worker keeps up to
`buffer` batches there, plus one being written. A count that does not fit is
lowered, with a warning saying why and how much was free, down to 0 (in
process), never a crash.
"""

import logging
import os

log = logging.getLogger(__name__)

TRAINER_CORES = 1
MAX_AUTO = 32
SHM = '/dev/shm'
# Use at most this fraction of the free shared memory (other processes, and
# grain's own bookkeeping, need some too).
SHM_FRACTION = 0.5


def available_cores():
    """Cores this process may run on (its affinity), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def free_shm_bytes(path=SHM):
    """Free bytes in the shared-memory filesystem (None if there is none)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def auto_count(decodes, cores=None):
    """Workers for num_workers='auto'."""
    if not decodes:
        return 0
    cores = available_cores() if cores is None else cores
    return max(0, min(MAX_AUTO, cores - TRAINER_CORES))


def fit_shm(count, batch_bytes, buffer, free=None):
    """The largest count <= `count` whose batches fit the shared-memory budget."""
    if count <= 0:
        return 0
    free = free_shm_bytes() if free is None else free
    if free is None:
        return count
    per_worker = (buffer + 1) * batch_bytes
    fits = int(free * SHM_FRACTION // per_worker) if per_worker else count
    if fits >= count:
        return count
    fits = max(0, fits)
    log.warning(
        'data.num_workers: %d worker(s) would keep up to %.2f GB of batches in %s '
        '(%d batches of %.1f MB each), but only %.2f GB is free; using %d worker(s)%s. '
        'Free space in %s (docker: --shm-size), lower data.prefetch or the batch, or set '
        'data.num_workers yourself.',
        count,
        count * per_worker / 1e9,
        SHM,
        buffer + 1,
        batch_bytes / 1e6,
        free / 1e9,
        fits,
        ' (batches made in this process)' if fits == 0 else '',
        SHM,
    )
    return fits


def resolve(num_workers, decodes, batch_bytes, buffer, cores=None, free=None):
    """The worker count to use for `config.data.num_workers`."""
    count = auto_count(decodes, cores) if num_workers == 'auto' else int(num_workers)
    count = fit_shm(count, batch_bytes, buffer, free)
    if num_workers == 'auto':
        log.info(
            'data.num_workers=auto: %d worker process(es) (%d core(s) available to '
            'this process, %d kept for the trainer)',
            count,
            available_cores() if cores is None else cores,
            TRAINER_CORES,
        )
    return count
