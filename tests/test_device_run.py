"""tools/device_run.py, the prepared device script: its records, the top-ops table, and the whole rehearsal on the CPU."""

import argparse
import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tools import device_run
from tools.device_checks import records
from tools.device_checks import top_ops

REPO = pathlib.Path(__file__).resolve().parents[1]


def _trace(folder, events):
    run = folder / 'plugins' / 'profile' / '2026_12_07'
    run.mkdir(parents=True)
    with gzip.open(run / 'host.trace.json.gz', 'wt') as f:
        json.dump({'traceEvents': events}, f)


def test_top_ops_ranks_the_device_lane_by_summed_time(tmp_path):
    meta = [
        {'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
        {'ph': 'M', 'pid': 2, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
    ]
    kernels = [
        {'ph': 'X', 'pid': 2, 'tid': 7, 'ts': 0, 'dur': 30.0, 'name': 'k1', 'args': {'hlo_op': 'fusion.1'}},
        {'ph': 'X', 'pid': 2, 'tid': 7, 'ts': 40, 'dur': 50.0, 'name': 'k2', 'args': {'hlo_op': 'dot.3'}},
        {'ph': 'X', 'pid': 2, 'tid': 7, 'ts': 90, 'dur': 45.0, 'name': 'k1', 'args': {'hlo_op': 'fusion.1'}},
        {'ph': 'X', 'pid': 1, 'tid': 3, 'ts': 0, 'dur': 999.0, 'name': 'python work'},  # host lane: not counted
    ]
    _trace(tmp_path, meta + kernels)
    table = top_ops.top_ops(str(tmp_path))
    assert table['lanes'] == 'device: /device:GPU:0'
    assert [(r['op'], r['ms'], r['count'], r['share']) for r in table['rows']] == [
        ('fusion.1', 0.075, 2, 0.6),
        ('dot.3', 0.05, 1, 0.4),
    ]
    assert table['total_ms'] == 0.125
    assert '| `dot.3` |' in top_ops.markdown(table)


def test_top_ops_without_a_trace_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        top_ops.top_ops(str(tmp_path))


def test_every_record_carries_the_environment_date_and_command(tmp_path):
    rec = records.Recorder(str(tmp_path), 100.0, True, ['tools/device_run.py', '--rehearse'])
    rec.common = {'device_kind': 'NVIDIA H100 80GB HBM3', 'versions': {'jax': '0.11.2'}}
    rec.write('headline', 'best_guess', ok=True, images_per_s=1.0)
    rec.skip('sweep', 'all', 'no time')
    lines = [json.loads(line) for line in (tmp_path / 'device_run.jsonl').read_text().splitlines()]
    for line in lines:
        assert line['device_kind'] == 'NVIDIA H100 80GB HBM3' and line['versions'] == {'jax': '0.11.2'}
        assert line['command'] == 'python tools/device_run.py --rehearse' and line['date'].startswith('20')
    assert lines[1]['skipped'] == 'no time' and lines[1]['ok'] is False
    assert records.last_json('noise\n{"a": 1}\n{"b": 2}\ntrailer') == {'b': 2}


def test_reference_stage_without_a_checkout_says_so_in_the_records(tmp_path):
    args = argparse.Namespace(rehearse=True, out=str(tmp_path), budget_s=60.0, reference_dir=str(tmp_path / 'none'))
    run = device_run.DeviceRun(args, ['tools/device_run.py', '--rehearse'])
    run.reference_stage()
    (line,) = [json.loads(x) for x in (tmp_path / 'device_run.jsonl').read_text().splitlines()]
    assert line['stage'] == 'reference' and 'no reference checkout' in line['skipped']


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        device_run.main(['--rehearse', '--stages', 'env,warp'])


@pytest.mark.slow  # the whole rehearsal: about 12 processes (see docs/performance.md for its measured time)
def test_rehearsal_runs_every_stage_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(REPO))
    env.pop('JAX_PLATFORMS', None)  # the rehearsal sets its own
    result = subprocess.run(
        [sys.executable, 'tools/device_run.py', '--rehearse', '--budget_s', '1200'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / 'device_run.jsonl').read_text().splitlines()]
    checks = {(r['stage'], r['check']): r for r in lines}
    expected = [
        ('env', 'environment'),
        ('env', 'compat_tests'),
        ('correctness', 'step_vs_host'),
        ('correctness', 'launch_train'),
        ('correctness', 'sigkill_resume'),
        ('correctness', 'bf16_vs_f32'),
        ('headline', 'einsum'),
        ('sweep', 'smoke'),
        ('sweep', 'profile_fastest'),
    ]
    for key in expected:
        assert key in checks and checks[key]['ok'], (key, checks.get(key))
    assert checks[('env', 'environment')]['import_failures'] == {}
    assert checks[('sweep', 'profile_fastest')]['top_ops']['rows']
    if (REPO / '.reference' / 'CRATE' / 'model' / 'crate_ae').is_dir():
        assert checks[('reference', 'eager')]['ok'] and checks[('reference', 'compile')]['ok']
    else:
        assert 'no reference checkout' in checks[('reference', 'torch')]['skipped']
    assert all(r['device_kind'] == 'cpu' and r['rehearse'] for r in lines)
