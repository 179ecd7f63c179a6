"""Tests for cratemae.metrics: JSONL rows, TensorBoard events, images, throughput."""

import json
import logging
import struct
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cratemae import metrics


def _read_events(logdir):
    """(step, tag, simple_value, has_image) for every summary value in the TFRecord files."""
    out = []
    for f in sorted(logdir.glob('events.out.tfevents.*')):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack('<Q', data[i : i + 8])  # length, then its masked crc32c
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4  # payload, then its masked crc32c
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value, v.HasField('image')))
    return out


def test_scalars_jsonl_and_tensorboard(tmp_path):
    w = metrics.MetricWriter(tmp_path, total_steps=10, enabled=True)
    w.write_scalars(1, {'train/loss': jnp.float32(0.5), 'lr': np.float64(1e-3), 'n': 3})
    w.write_scalars(2, {'train/loss': jnp.array(0.25)})
    w.update(2, loss=jnp.float32(0.25))
    w.write_images(2, {'recon': np.random.rand(8, 8, 3), 'gray': np.zeros((8, 8), np.uint8)}, png=True)
    w.close()
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert rows == [{'step': 1, 'train/loss': 0.5, 'lr': 1e-3, 'n': 3.0}, {'step': 2, 'train/loss': 0.25}]
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


def test_read_scalars_keeps_the_last_row_of_a_step_written_twice(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text(
        '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n'
        '{"step": 4, "loss": 0.25, "eval/x": 3}\n{"step": 3, "loss": 0.75}\n'
    )
    assert metrics.read_scalars(tmp_path) == [
        {'step': 2, 'loss': 1.0},
        {'step': 3, 'loss': 0.75},
        {'step': 4, 'loss': 0.25, 'eval/x': 3},
    ]


def test_progress_off_a_terminal_is_one_line_per_write_not_bar_redraws(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger='cratemae.metrics')
    clock = iter([1000.0, 1000.0 + 25 * 0.5])  # 25 steps in 12.5 s after the first line
    monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
    w = metrics.MetricWriter(tmp_path, total_steps=100, enabled=True, progress=True)
    for step in range(1, 51):
        w.update(step, loss=1.0 / step)
        if step % 25 == 0:
            w.write_scalars(step, {'loss': 1.0 / step})
    w.write_scalars(50, {'eval/loss': 0.5})  # an evaluation at a step already shown repeats its ETA
    w.write_scalars(50, {'whitebox/sparsity/layer_00': 0.5})  # per-layer series: in the files, not in the log
    w.close()
    # The ETA counts from the first logged line (which holds start-up and compiling): 50 steps left at 0.5 s each.
    assert [r.getMessage() for r in caplog.records] == [
        'step 25/100: loss=0.04',
        'step 50/100 (ETA 0m25s): loss=0.02',
        'step 50/100 (ETA 0m25s): eval/loss=0.5',
    ]
    assert '\r' not in capsys.readouterr().err


def test_throughput_and_core_hours():
    t0 = time.perf_counter()
    tp = metrics.Throughput(global_batch=64, num_devices=8, start_step=100, core_hours=2.0)
    time.sleep(0.05)
    with tp.exclude():
        time.sleep(0.05)
    s = tp.measure(110)
    total = time.perf_counter() - t0
    busy = s['step_time_s'] * 10
    assert 0.05 <= busy <= total - 0.05  # the excluded 50 ms is not training time
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
