"""Metric writers without TensorFlow: JSONL + tensorboardX event files + progress (a tqdm bar on a terminal).

  <workdir>/metrics.jsonl      one JSON object per write_scalars call: {"step": s, "loss": ...}
  <workdir>/tensorboard/       tensorboardX event files (scalars, images)
  <workdir>/images/            optional PNGs from write_images(..., png=True)

Only process 0 writes (enabled=None means jax.process_index() == 0); the others get no-op
writers, so the loop can call them unconditionally. The JSONL file is opened in append mode,
so a resumed run continues the same file (rows past the resume step are not deleted: readers
should keep the last row per step).
"""

import contextlib
import json
import logging
import os
import sys
import time

import jax
import numpy as np
from etils import epath

_LOG = logging.getLogger(__name__)
JSONL_FILE = 'metrics.jsonl'
TB_DIR = 'tensorboard'


def _scalar(v) -> float:
    """jax/numpy 0-d arrays and Python numbers -> float (NaN/inf kept; JSON writes them bare)."""
    return float(np.asarray(jax.device_get(v)).reshape(()))


def _as_image(img) -> np.ndarray:
    """HWC (or HW) uint8, or float in [0, 1] -> HWC uint8."""
    img = np.asarray(jax.device_get(img))
    if img.ndim == 2:
        img = img[..., None]
    if img.dtype != np.uint8:
        img = np.clip(np.round(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return img


def read_scalars(workdir) -> list[dict]:
    """The rows of <workdir>/metrics.jsonl in step order, the last row kept where a resumed run wrote a step twice."""
    rows = {}
    with (epath.Path(workdir) / JSONL_FILE).open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row['step'], {}).update(row)
    return [rows[s] for s in sorted(rows)]


class MetricWriter:
    """Writes scalars/images for process 0 and shows a progress bar with ETA.

    Args:
      workdir: run directory (local or gs://; appends need a filesystem that supports them).
      total_steps: for the progress bar's ETA.
      start_step: where the bar starts (the resumed step).
      enabled: write at all; default jax.process_index() == 0.
      progress: show progress on stderr: a tqdm bar when stderr is a terminal; otherwise (a log file, a pod's
        nohup) one logged line per write_scalars call, so a log holds lines at the log interval, not bar redraws.
    """

    def __init__(self, workdir, total_steps=None, *, start_step=0, enabled=None, progress=True):
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.workdir = epath.Path(workdir)
        self._jsonl = self._tb = self._bar = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.workdir / JSONL_FILE).open('a')
        from tensorboardX import SummaryWriter  # imported lazily: ~0.3 s, unused off process 0

        self._tb = SummaryWriter(logdir=str(self.workdir / TB_DIR), flush_secs=30)
        self._total, self._lines = total_steps, progress and not sys.stderr.isatty()
        self._eta_origin = None  # (time, step) of the first logged line: later rates exclude start-up and compiling
        if progress and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit='step', smoothing=0.1)

    def write_scalars(self, step: int, scalars: dict):
        """Append {'step': step, **scalars} to metrics.jsonl and add TB scalars."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, int(step))
        shown = {k: v for k, v in values.items() if k.count('/') < 2}  # per-layer series stay in the files
        if self._lines and shown:
            of = f'/{self._total}' if self._total else ''
            eta = self._eta(int(step))
            _LOG.info('step %d%s%s: %s', step, of, eta, ', '.join(f'{k}={v:.4g}' for k, v in shown.items()))

    def _eta(self, step):
        """' (ETA 2m05s)' for the logged line: remaining steps at the mean rate since the first logged step.

        Lines written at a step already shown (evaluations) repeat its ETA, so their own time does not skew it."""
        if self._eta_origin is None:
            self._eta_origin, self._eta_shown = (time.perf_counter(), step), (step, '')
        if step == self._eta_shown[0]:
            return self._eta_shown[1]
        (t0, s0), text = self._eta_origin, ''
        if self._total and s0 < step < self._total:
            seconds = round((self._total - step) * (time.perf_counter() - t0) / (step - s0))
            text = f' (ETA {seconds // 60}m{seconds % 60:02d}s)'
        self._eta_shown = (step, text)
        return text

    def write_images(self, step: int, images: dict, png: bool = False):
        """name -> HWC image (uint8, or float in [0,1]); also saved as PNG if png=True."""
        if not self.enabled:
            return
        for name, img in images.items():
            img = _as_image(img)
            self._tb.add_image(name, img, int(step), dataformats='HWC')
            if png:
                from PIL import Image

                out = self.workdir / 'images' / f'{name.replace("/", "_")}_{int(step):08d}.png'
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open('wb') as f:
                    Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(f, 'PNG')

    def update(self, step: int, **postfix):
        """Move the progress bar to `step`; postfix values (e.g. loss=...) are shown beside it."""
        if self._bar is None:
            return
        self._bar.update(int(step) - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: f'{_scalar(v):.4g}' for k, v in postfix.items()}, refresh=False)

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        for obj in (self._bar, self._tb, self._jsonl):
            if obj is not None:
                obj.close()
        self._jsonl = self._tb = self._bar = None
        self.enabled = False


class Throughput:
    """Wall-clock throughput between calls, and device-hours that survive restarts.

      images/s        = (step - last_step) * global_batch / (t - t_last - excluded)
      images/s/device = images/s / num_devices
      core_hours     += (t - t_last) * num_devices / 3600   (all wall time, incl. excluded)

    `core_hours` starts from the value saved in the checkpoint metadata, so it accumulates
    over restarts (Chrono-style). Time inside `with tp.exclude():` (eval, checkpointing)
    is not counted as training time for images/s. Call measure() after a blocking read
    (e.g. float(loss)) so that step times are real and not async-dispatch times.
    """

    def __init__(self, global_batch, num_devices=None, *, start_step=0, core_hours=0.0):
        self.global_batch = int(global_batch)
        self.num_devices = int(num_devices or jax.device_count())
        self.core_hours = float(core_hours)
        self._last_step = int(start_step)
        self._last_time = time.perf_counter()
        self._excluded = 0.0

    @contextlib.contextmanager
    def exclude(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    def measure(self, step: int) -> dict:
        """Stats since the previous measure() (or construction): img/s, img/s/device, step
        time, core_hours (cumulative); only core_hours if no step was taken."""
        now = time.perf_counter()
        wall = now - self._last_time
        self.core_hours += wall * self.num_devices / 3600.0
        steps = int(step) - self._last_step
        busy = max(wall - self._excluded, 1e-9)
        self._last_step, self._last_time, self._excluded = int(step), now, 0.0
        if steps <= 0:
            return {'core_hours': self.core_hours}
        img_s = steps * self.global_batch / busy
        return {
            'img_per_s': img_s,
            'img_per_s_per_device': img_s / self.num_devices,
            'step_time_s': busy / steps,
            'core_hours': self.core_hours,
        }


def busy_cpu_seconds():
    """CPU-seconds all cores of the host have spent busy so far (Linux /proc/stat), or None elsewhere.

    The difference over an interval, minus this process's own CPU time, is what other jobs took: benchmarks report it
    so that a figure measured on a shared machine says how shared it was.
    """
    try:
        with open('/proc/stat') as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')
