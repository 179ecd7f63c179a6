"""Tests for cratemae.metrics: JSONL rows, TensorBoard events, images, throughput."""
import json
import struct
import time

import pytest

import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2

from cratemae import metrics


def _read_events(logdir):
    """(step, tag, simple_value, has_image) for every summary value in the TFRecord files."""
    out = []
    for f in sorted(logdir.glob('events.out.tfevents.*')):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack('<Q', data[i:i + 8])   # length, then its masked crc32c
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4                               # payload, then its masked crc32c
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value, v.HasField('image')))
    return out


def test_scalars_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricWriter(tmp_path, total_steps=10, enabled=True)
    w.write_scalars(1, {'train/loss': jnp.float32(0.5), 'lr': np.float64(1e-3), 'n': 3})
    w.write_scalars(2, {'train/loss': jnp.array(0.25)})
    w.update(2, loss=jnp.float32(0.25))
    w.write_images(2, {'recon': np.random.rand(8, 8, 3), 'gray': np.zeros((8, 8), np.uint8)},
                   png=True)
    w.close()
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert rows == [{'step': 1, 'train/loss': 0.5, 'lr': 1e-3, 'n': 3.0},
                    {'step': 2, 'train/loss': 0.25}]
    events = _read_events(tmp_path / 'tensorboard')
    assert (1, 'train/loss', 0.5, False) in events
    assert (2, 'train/loss', 0.25, False) in events
    assert any(tag == 'recon' and img for _, tag, _, img in events)
    assert (tmp_path / 'images' / 'recon_00000002.png').stat().st_size > 0
    assert (tmp_path / 'images' / 'gray_00000002.png').exists()


def test_resume_appends_and_disabled_writes_nothing(tmp_path):
    for step in (1, 2):
        w = metrics.MetricWriter(tmp_path, enabled=True, progress=False, start_step=step - 1)
        w.write_scalars(step, {'x': step})
        w.close()
    assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 2
    off = metrics.MetricWriter(tmp_path / 'off', enabled=False)
    off.write_scalars(1, {'x': 1})
    off.update(1, loss=1.0)
    off.close()
    assert not (tmp_path / 'off').exists()


def test_throughput_and_core_hours():
    t0 = time.perf_counter()
    tp = metrics.Throughput(global_batch=64, num_devices=8, start_step=100, core_hours=2.0)
    time.sleep(0.05)
    with tp.exclude():
        time.sleep(0.05)
    s = tp.measure(110)
    total = time.perf_counter() - t0
    busy = s['step_time_s'] * 10
    assert 0.05 <= busy <= total - 0.05                # the excluded 50 ms is not training time
    np.testing.assert_allclose(s['img_per_s'], 640 / (s['step_time_s'] * 10))
    np.testing.assert_allclose(s['img_per_s_per_device'], s['img_per_s'] / 8)
    assert 2.0 + 8 * 0.1 / 3600 <= s['core_hours'] <= 2.0 + 8 * total / 3600
    assert set(tp.measure(110)) == {'core_hours'}


def test_busy_cpu_seconds_grows_while_this_process_computes():
    before = metrics.busy_cpu_seconds()
    if before is None:
        pytest.skip('no /proc/stat on this platform')
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert metrics.busy_cpu_seconds() - before >= 0.2


class _Stream:
    """A stderr stand-in that says whether it is a terminal."""

    def __init__(self, tty):
        self.tty, self.text = tty, ''

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_off_a_terminal_is_one_plain_line_per_log_interval(tmp_path):
    stream = _Stream(tty=False)
    w = metrics.MetricWriter(tmp_path, total_steps=12, start_step=2, enabled=True, log_every=5, stream=stream)
    for step in range(3, 13):
        w.update(step, loss=jnp.float32(1.0 / step))
    w.close()
    assert '\r' not in stream.text
    lines = stream.text.splitlines()
    assert [line.split()[:2] for line in lines] == [['step', '5/12'], ['step', '10/12'], ['step', '12/12']]
    assert lines[0].endswith('loss=0.2]') and 'step/s' in lines[0]


def test_progress_on_a_terminal_is_a_tqdm_bar(tmp_path):
    stream = _Stream(tty=True)
    w = metrics.MetricWriter(tmp_path, total_steps=12, enabled=True, log_every=5, stream=stream)
    for step in range(1, 13):
        w.update(step, loss=0.5)
    w.close()
    assert '\r' in stream.text and '12/12' in stream.text  # redrawn in place
