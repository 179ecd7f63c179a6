"""Orbax checkpoints: async save, auto-resume past a corrupt step, preemption, config checks.

Layout under the workdir (local path or gs://, handled through etils.epath):
  <workdir>/config.json                      resolved config of the first run (see check_compatible)
  <workdir>/checkpoints/<step>/state/...     the train-state pytree (ocp StandardSave, OCDBT)
  <workdir>/checkpoints/<step>/meta/...      JSON metadata: data position, rng info, config hash...

Resume rule: restore_latest() tries the newest step, then older ones. A step that fails to
restore (truncated data file, bad manifest, truncated _METADATA: orbax raises ValueError,
JSONDecodeError or FileNotFoundError, depending on which file is damaged) is skipped with a warning
naming the step and the error. If steps exist but none restores we raise: silently restarting
from scratch would overwrite a long run's history with step 0.

Preemption: install_preemption_handler() turns SIGTERM into a flag; reached_preemption(step)
is True once the flag is set or orbax/JAX's preemption sync point says so (multi-host TPU).
The loop then calls save(step, ..., force=True), wait_until_finished() and exits.
"""

import datetime
import fnmatch
import hashlib
import json
import logging
import os
import signal
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CKPT_DIR = 'checkpoints'
# Keys that may change between a run and its resumption without changing what is trained.
DEFAULT_IGNORE = (
    'train.steps',
    'train.log_every',
    'train.eval_every',
    'train.eval_batches',
    'train.eval_batch',
    'train.eval_mask_ratio',
    'train.profile_start',
    'train.profile_steps',
    'eval.*',
    # How the same maths is computed (kernels, recomputation, unrolling), not what is trained:
    'model.attention',
    'model.attention_pad',
    'model.remat',
    'model.scan_unroll',
    'model.fused_ista',
    'checkpoint.*',
    'data.data_dir',
    'data.num_workers',
    'data.prefetch',
)


def jsonable(x):
    """json.dumps default: numpy/jax scalars and arrays -> Python values; tuples and sets -> lists; else str."""
    if isinstance(x, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def _to_json_value(tree):
    return json.loads(json.dumps(tree, default=jsonable))


class UnreadableCheckpointsError(RuntimeError):
    """Checkpoints exist but none of them restores."""


def restore_newest(steps, restore, directory):
    """(step, restore(step)) for the newest of ``steps`` that restores; None if there are no steps.

    A step whose ``restore`` raises (truncated data file, bad manifest, truncated _METADATA: orbax and tensorstore
    raise many types) is skipped with a warning naming the step and the error, and the next older one is tried. If
    none restores, UnreadableCheckpointsError lists every error: silently restarting from scratch would overwrite a
    long run's history with step 0. The one rule for the engine's resume and for loading weights downstream.
    """
    steps = sorted(steps)
    errors = []
    for step in reversed(steps):
        try:
            restored = restore(step)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            msg = f'{type(e).__name__}: {first_line(e)}'
            log.warning(
                'Checkpoint step %d in %s failed to restore (%s); trying the next older step.', step, directory, msg
            )
            errors.append(f'  step {step}: {msg}')
            continue
        if errors:
            log.warning('Restored step %d after skipping %d unreadable newer step(s).', step, len(errors))
        return step, restored
    if errors:
        raise UnreadableCheckpointsError(
            f'Checkpoints exist in {directory} (steps {steps}) but none could be restored; refusing to restart from '
            'scratch. Errors:\n' + '\n'.join(errors) + '\nMove or delete the damaged step directories (or the whole '
            'checkpoints directory) to proceed.'
        )
    return None


def saved_steps(workdir) -> list[int]:
    """The finished checkpoint steps of a training workdir, ascending; local or gs:// (through etils.epath).

    A save in progress is a '<step>.orbax-checkpoint-tmp-*' folder and is not listed; no checkpoints: [].
    """
    directory = epath.Path(os.fspath(workdir)) / CKPT_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class Checkpointer:
    """Thin wrapper around ocp.CheckpointManager (v0 API, Composite(state=..., meta=...)).

    Args:
      workdir: run directory; checkpoints go to <workdir>/checkpoints.
      every: save_interval_steps; save() at other steps is a no-op unless force=True.
      max_to_keep: newest checkpoints kept on disk (None = all).
      async_save: save in a background thread (save() returns after the device->host copy).
    """

    def __init__(self, workdir, *, every=1, max_to_keep=3, async_save=True):
        self.directory = _absolute(workdir) / CKPT_DIR  # Orbax refuses relative paths
        self.every = int(every)
        self._preempted = False
        self._previous_handlers = {}
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=self.every,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    @classmethod
    def from_config(cls, workdir, ckpt_config):
        """From config.checkpoint: every, max_to_keep, async_save."""
        c = dict(ckpt_config)
        return cls(
            workdir, every=c.get('every', 1), max_to_keep=c.get('max_to_keep', 3), async_save=c.get('async_save', True)
        )

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state, meta: dict | None = None, force: bool = False) -> bool:
        """Save `state` (any pytree of arrays) and JSON `meta` at `step`; True if a save started.

        A step that is already saved is skipped (returns False). Without force, only multiples
        of `every` are saved (orbax's own policy would also save the first step it sees; the
        schedule should depend on the step alone).
        """
        if not force and step % self.every:
            return False
        if int(step) in self._mngr.all_steps():  # cached; e.g. preemption right after a save
            return False
        meta = _to_json_value(dict(meta or {}, step=int(step)))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._mngr.save(int(step), args=args, force=True)

    def wait_until_finished(self):
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.wait_until_finished()
        self._mngr.close()

    # -- restoring ------------------------------------------------------------------------------

    def all_steps(self):
        return sorted(self._mngr.all_steps())

    def latest_step(self):
        return self._mngr.latest_step()

    def restore(self, step: int, abstract_state):
        """(state, meta) at `step`. `abstract_state` (ShapeDtypeStructs with shardings, or
        arrays) gives structure, dtypes and placement: optax namedtuples come back intact."""
        abstract_state = jax.tree.map(_as_abstract, abstract_state)
        r = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return r.state, r.meta

    def restore_latest(self, abstract_state):
        """(step, state, meta) of the newest step that restores, or None if there is none.

        Raises UnreadableCheckpointsError (a RuntimeError) if checkpoints exist but none of them can be restored;
        unreadable steps newer than the one restored are moved aside (see _quarantine).
        """
        self._mngr.wait_until_finished()
        self._mngr.reload()  # another process (or a previous run) may have written steps
        steps = self.all_steps()
        found = restore_newest(steps, lambda step: self.restore(step, abstract_state), self.directory)
        if found is None:
            return None
        step, (state, meta) = found
        if step != steps[-1]:
            self._quarantine([s for s in steps if s > step])
        return step, state, meta

    def _quarantine(self, steps):
        """Moves unreadable steps to <workdir>/checkpoints_damaged/ (kept for inspection), so the resumed run
        can save those step numbers again instead of tripping over the damaged directories."""
        if jax.process_index() == 0:
            target = self.directory.parent / f'{CKPT_DIR}_damaged'
            target.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
            for step in steps:
                destination = target / f'{step}-{stamp}'
                (self.directory / str(step)).rename(destination)
                log.warning('Moved the unreadable checkpoint step %d to %s.', step, destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices('cratemae_checkpoint_quarantine')
        self._mngr.reload()

    # -- preemption -----------------------------------------------------------------------------

    def install_preemption_handler(self, signals=(signal.SIGTERM,)):
        """Turn `signals` into a flag that reached_preemption() reports.

        A handler installed outside Python (signal.getsignal() is None, e.g. JAX's own
        preemption notifier on multi-host TPU) is left alone; orbax's reached_preemption covers
        that case. Call uninstall_preemption_handler() (or close the process) to undo.
        """
        for sig in signals:
            previous = signal.getsignal(sig)
            if previous is None:
                log.info('Signal %s has a non-Python handler; not replacing it.', sig)
                continue
            self._previous_handlers[sig] = previous
            signal.signal(sig, self._on_signal)

    def uninstall_preemption_handler(self):
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame):
        del frame
        # No I/O here: the loop saves at the next step boundary, outside the signal handler.
        self._preempted = True
        log.warning('Received signal %d: will checkpoint and exit at the next step.', signum)

    def reached_preemption(self, step: int) -> bool:
        """True when the job should save now and exit.

        With several processes, the local flag is OR-ed over all processes (a tiny collective),
        so every host must call this at the same steps; all then save the same step together.
        """
        flag = self._preempted
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        if flag:
            return True
        try:
            return bool(self._mngr.reached_preemption(int(step)))
        except Exception:  # noqa: BLE001 - no preemption service (CPU, 1 process)
            return False


def _absolute(path) -> epath.Path:
    """A local path made absolute; a URL (gs://...) as it is."""
    path = os.fspath(path)
    return epath.Path(path if '://' in path else os.path.abspath(path))


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def first_line(e, limit=800) -> str:
    """The first line of an exception's message, at most `limit` characters (for one-line error reports)."""
    text = str(e).strip().splitlines()
    text = text[0] if text else ''
    return text[:limit] + ('...' if len(text) > limit else '')


# -- workdir and config checks ------------------------------------------------------------------


def ensure_writable(workdir):
    """Create `workdir` and write/delete a probe file; fail early with a clear message."""
    path = epath.Path(workdir)
    probe = path / f'.write_test_{uuid.uuid4().hex}'
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text(datetime.datetime.now().isoformat())
        probe.unlink()
    except Exception as e:  # PermissionError, OSError, GCS errors: all mean "not writable"
        raise PermissionError(
            f'Workdir {workdir} is not writable ({type(e).__name__}: {e}). Pass a --workdir you '
            'can write to (a local directory or a gs:// bucket with write access).'
        ) from e
    return path


def flatten_config(config, prefix='') -> dict:
    """{'model': {'width': 768}} -> {'model.width': 768}; accepts ConfigDicts; JSON values."""
    if hasattr(config, 'to_dict'):
        config = config.to_dict()
    out = {}
    for k, v in config.items():
        key = f'{prefix}{k}'
        if hasattr(v, 'to_dict'):
            v = v.to_dict()
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + '.'))
        else:
            out[key] = _to_json_value(v)
    return out


def _config_dict(config):
    return _to_json_value(config.to_dict() if hasattr(config, 'to_dict') else dict(config))


def config_hash(config) -> str:
    """Short sha256 of the canonical JSON of `config` (for checkpoint metadata)."""
    text = json.dumps(_config_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_config(workdir, config):
    """Write the resolved config as <workdir>/config.json (process 0 only), through a temporary file and a rename
    so another process checking compatibility never reads half a file."""
    if jax.process_index() == 0:
        path = epath.Path(workdir) / CONFIG_FILE
        tmp = path.parent / f'.{CONFIG_FILE}.{uuid.uuid4().hex}.tmp'
        tmp.write_text(json.dumps(_config_dict(config), indent=2, sort_keys=True))
        tmp.replace(path)


def _show(value, missing):
    return '<absent>' if value is missing else json.dumps(value)


def _effective_schedule(flat: dict) -> dict:
    """optim.schedule_steps as trained (None means train.steps): a longer train.steps on resume may not silently
    stretch the learning-rate schedule of the steps already taken, so the effective length is compared."""
    if 'train.steps' in flat and flat.get('optim.schedule_steps') is None:
        flat = dict(flat, **{'optim.schedule_steps': flat['train.steps']})
    return flat


def check_compatible(workdir, config, ignore=DEFAULT_IGNORE, allow_change=False):
    """Compare `config` with <workdir>/config.json; return the list of differing keys.

    Keys matching an `ignore` pattern (fnmatch on the dotted key, e.g. 'checkpoint.*') are
    skipped. Any other difference raises ValueError naming each key with its old and new value,
    unless allow_change=True (then it is only logged). No config.json: nothing to compare.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return []
    old = _effective_schedule(flatten_config(json.loads(path.read_text())))
    new = _effective_schedule(flatten_config(config))
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        if any(fnmatch.fnmatchcase(key, pat) for pat in ignore):
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            diffs.append(f'{key}: {_show(a, missing)} -> {_show(b, missing)}')
    if diffs and not allow_change:
        hint = ''
        if old.get('optim.schedule_steps') != new.get('optim.schedule_steps'):
            hint = (
                f"\nTo train to train.steps={new.get('train.steps')} on the run's schedule, keep its length: "
                f"--config.optim.schedule_steps={old.get('optim.schedule_steps')}."
            )
        raise ValueError(
            f'The config differs from the one saved in {path} by the run being resumed:\n  '
            + '\n  '.join(diffs)
            + '\nUse a new --workdir, or pass --allow_config_change to resume '
            'with the new values anyway.' + hint
        )
    for d in diffs:
        log.warning('Config changed on resume (allowed): %s', d)
    return diffs
