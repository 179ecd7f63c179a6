"""launch.benchmark prints one valid JSON line per point with the figures docs/performance.md quotes; the GPU sweep's
plan is well formed. Runs in-process on the suite's 8 fake CPU devices."""

import json
import math
import os
import pathlib

import pytest

from cratemae import benchmark as benchmark_lib
from launch import benchmark
from launch import cli
from tools import gpu_sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f'--config={REPO}/experiments/registry.py:crate_mae_test'


def _records(capsys):
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    return [json.loads(line) for line in lines]


@pytest.mark.slow  # compiles and times the step, writes a profile
def test_benchmark_prints_the_figures_as_json(capsys, tmp_path):
    code = cli.run(
        benchmark.main,
        benchmark.FLAGS,
        [CONFIG, '--steps=2', '--warmup=1', f'--profile={tmp_path / "trace"}', '--profile_steps=1'],
    )
    (record,) = _records(capsys)
    assert code == 0, record.get('error')
    assert record['config'] == 'crate_mae_test' and record['batch'] == 16 and record['steps'] == 2
    assert record['images_per_s'] > 0 and math.isfinite(record['loss'])
    ms = record['ms_per_step']
    assert 0 < ms['min'] <= ms['median'] <= ms['max']
    assert record['images_per_s'] == pytest.approx(16 / ms['median'] * 1e3)
    assert record['lower_s'] > 0 and record['compile_s'] > 0
    assert record['first_step_compile_s'] == pytest.approx(record['lower_s'] + record['compile_s'])
    # The FLOP figures agree with each other and with the timing (test_flops checks the count itself against XLA):
    # a train step is three forward passes less the patch embedding's image gradient, 2 x 16 patches x (7 x 7 x 1)
    # pixels x width 32, and the achieved rate is FLOPs x images/s over the 8 devices.
    fwd, train = record['forward_gflops_per_image'] * 1e9, record['train_gflops_per_image'] * 1e9
    assert 3 * fwd - train == pytest.approx(2 * 16 * 49 * 32)
    assert record['achieved_tflops_per_device'] == pytest.approx(
        record['train_gflops_per_image'] * 1e9 * record['images_per_s'] / 8 / 1e12
    )
    # A CPU has no peak in the table (MFU n/a) and no allocator statistics (XLA's memory plan instead).
    assert record['device_kind'] == 'cpu' and record['num_devices'] == 8 and record['mfu'] is None
    assert record['peak_memory_bytes'] > 0 and record['peak_memory_source'].startswith('memory_analysis')
    for key in ('jax', 'jaxlib', 'flax', 'optax', 'date', 'load_average', 'xla_flags'):
        assert key in record
    assert record['options']['attention'] == 'einsum' and record['options']['donate'] is True
    assert any(tmp_path.joinpath('trace').rglob('*')), 'no profiler trace written'


def test_a_point_that_cannot_run_is_a_record_with_its_error(capsys):
    """cuDNN attention on a CPU: the point reports the error and the exit code says a point failed."""
    code = cli.run(
        benchmark.main,
        benchmark.FLAGS,
        [CONFIG, '--steps=1', '--warmup=0', '--config.model.attention=cudnn', '--config.model.dtype=bfloat16'],
    )
    (record,) = _records(capsys)
    assert code == 1 and record['error'] and record['options']['attention'] == 'cudnn'


def test_sweep_points_are_command_lines_parsed_by_config_flags(capsys):
    points = benchmark_lib.sweep_points(
        [
            'remat=none,full',
            'batch=16,32',
            'model.fused_ista=true',
            'xla.xla_cpu_enable_fast_math=false',
            'donate=false',
        ]
    )
    assert len(points) == 4
    assert points[3] == (
        {
            'remat': 'full',
            'batch': '32',
            'model.fused_ista': 'true',
            'xla.xla_cpu_enable_fast_math': 'false',
            'donate': 'false',
        },
        [
            '--config.model.remat=full',
            '--batch=32',
            '--config.model.fused_ista=true',
            '--compiler_option=xla_cpu_enable_fast_math=false',
            '--donate=false',
        ],
    )
    each = benchmark_lib.sweep_points(['remat=none,full', 'batch=16,32', 'donate=false'], 'each')
    assert [o for o, _ in each] == [
        {'remat': 'none'},
        {'remat': 'full'},
        {'batch': '16'},
        {'batch': '32'},
        {'donate': 'false'},
    ]
    # A key the config lacks, a value of the wrong type, a spec without '=': refused before anything compiles.
    for sweep, message in (('model.flash=1', 'flash'), ('fused_ista=maybe', 'fused_ista'), ('remat', 'KEY=V1')):
        assert cli.run(benchmark.main, benchmark.FLAGS, [CONFIG, f'--sweep={sweep}']) == cli.EXIT_USAGE
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == ''


def test_gpu_sweep_plan(tmp_path):
    """The dry run writes every planned point; the first stage compares the attention kernels on Base in bf16."""
    assert gpu_sweep.main(['--out', str(tmp_path), '--dry_run']) == 0
    records = [json.loads(line) for line in (tmp_path / 'gpu_sweep.jsonl').read_text().splitlines()]
    names = [r['sweep']['name'] for r in records]
    assert names[:5] == ['smoke', 'einsum', 'cudnn', 'cudnn_pad64', 'xla_dpa']
    assert {'remat_full', 'visible_only', 'small', 'large'} <= set(names)
    cudnn = records[3]['sweep']['command']
    for flag in (
        'crate_mae_base',
        '--batch=256',
        '--config.model.dtype=bfloat16',
        '--config.model.attention=cudnn',
        '--config.model.attention_pad=64',
    ):
        assert flag in cudnn
    assert os.path.exists(tmp_path / 'gpu_sweep_summary.md')
