"""Ahead-of-time compilation for TPU slices: names, early rejections, and the real compile (needs libtpu)."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from cratemae import aot

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason=f"libtpu is not installed (pip install 'jax[tpu]=={jax.__version__}'); TPU AOT compilation needs it.",
)


def test_slice_names_map_to_libtpu_topologies():
    expected = {
        'v4-32': ('v4', 'v4:2x2x4', 'megacore', 16),
        'v5e-256': ('v5e', 'v5e:16x16', None, 256),
        'v5litepod-16': ('v5e', 'v5e:4x4', None, 16),
        'v5p-128': ('v5p', 'v5:4x4x4', 'megacore', 64),
        'v6e-256': ('v6e', 'v6e:16x16', None, 256),
        'v5e:2x2': ('v5e', 'v5e:2x2', None, 4),
        'v5p:2x2x4': ('v5p', 'v5:2x2x4', 'megacore', 16),
    }
    for name, (generation, topology, chip_config, devices) in expected.items():
        s = aot.resolve_slice(name)
        assert (s.generation, s.topology, s.chip_config, s.devices) == (generation, topology, chip_config, devices)
    assert aot.resolve_slice('v5e-256').hbm_bytes == 16 * 2**30
    for bad in ('v9-8', 'v5e-3', 'v4:4x4', 'v5e-256x'):
        with pytest.raises(ValueError, match=r'Unknown TPU topology .*Valid: .*v4-32.*v5e-256'):
            aot.resolve_slice(bad)


def _config(*overrides):
    """crate_mae_test with command-line overrides, parsed as launch.aot_compile parses them."""
    from launch import aot_compile
    from launch import cli

    cli.parse(aot_compile.FLAGS, ['aot_compile', '--config=crate_mae_test', *overrides])
    return aot_compile.FLAGS.config


def test_the_aot_and_benchmark_step_takes_uint8_images_as_the_engine_hands_them():
    """The engine feeds uint8 batches (normalised inside the step); AOT and the benchmark compile that same step."""
    from cratemae import benchmark

    config = _config()
    step, (state, batch), _ = aot.build_train_step(config, jax.devices())
    assert batch['image'].dtype == jax.numpy.uint8
    step.lower(state, batch)  # the jitted train step traces with the uint8 input
    synthetic = benchmark.synthetic_batch(config, config.train.global_batch, batch['image'].sharding)
    assert synthetic['image'].dtype == jax.numpy.uint8 and synthetic['image'].shape == batch['image'].shape
    assert (
        0 <= int(synthetic['image'].min())
        and int(synthetic['image'].max()) <= 255
        and len(set(jax.device_get(synthetic['image']).ravel().tolist())) > 100
    )  # spread over the pixel range


def test_batch_that_does_not_split_over_the_devices_is_rejected_before_tracing():
    config = _config('--config.train.global_batch=12')
    with pytest.raises(ValueError, match='must split evenly over the 8 devices'):
        aot.build_train_step(config, jax.devices())


def test_fsdp_override_shards_every_parameter_over_all_devices():
    config = _config(
        '--config.train.global_batch=32',
        "--config.sharding_rules=(('.*', 'fsdp_largest'),)",
        '--config.mesh.data=1',
        '--config.mesh.fsdp=-1',
    )
    assert (config.mesh.data, config.mesh.fsdp, config.train.global_batch) == (1, -1, 32)
    _, (state, batch), mesh = aot.build_train_step(config, jax.devices())
    assert dict(mesh.shape) == {'data': 1, 'fsdp': 8, 'model': 1}
    assert state.params['encoder']['layers']['mssa']['qkv']['kernel'].sharding.spec == jax.sharding.PartitionSpec(
        None, 'fsdp'
    )
    assert batch['image'].shape == (32, 28, 28, 1)


def _aot(*flags):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    return subprocess.run(
        [sys.executable, '-m', 'launch.aot_compile', *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@needs_libtpu
def test_compiles_the_train_step_for_a_v5e_2x2_slice():
    result = _aot('--config=experiments/registry.py:crate_mae_test', '--topology=v5e:2x2')
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "on v5e:2x2 (v5e:2x2, 4 devices, 16 GiB HBM each), mesh {'data': 4, 'fsdp': 1, 'model': 1}" in out, out
    for words in ('arguments', 'temporaries', 'XLA peak', 'analytic', 'XLA cost analysis', 'compile', 'FITS'):
        assert words in out, out


@needs_libtpu
def test_program_that_exceeds_hbm_exits_nonzero_with_the_compiler_message():
    result = _aot(
        '--config=experiments/registry.py:crate_mae_base', '--topology=v5e:2x2', '--config.train.global_batch=4096'
    )
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert 'DOES NOT FIT' in result.stdout and 'RESOURCE_EXHAUSTED' in result.stdout, result.stdout
    assert 'try FSDP' in result.stderr


# --------------------------------------------------------------------------------------------------------------
# tools.aot_table: which cells to compile next, and the docs table (no compile, no libtpu).


def _row(model, tpu_slice, fsdp, remat='none', error=None, peak=2**30, total=2**30, hbm=16 * 2**30):
    return dict(
        model=model,
        slice=tpu_slice,
        fsdp=fsdp,
        remat=remat,
        error=error,
        peak=peak,
        total=total,
        hbm=hbm,
        mesh={'data': 16, 'fsdp': 1, 'model': 1},
        global_batch=4096,
        lower_s=1.0,
        compile_s=9.4,
    )


REFUSED = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (52.74G) '
    'exceeds available HBM (30.75G).'
)


def test_aot_table_adds_remat_only_where_the_plain_cell_was_refused():
    from tools import aot_table

    assert aot_table.wanted_cells(['m'], ['v4-32'], ['none', 'full'], []) == [
        ('m', 'v4-32', False, 'none'),
        ('m', 'v4-32', True, 'none'),
    ]
    done = [_row('m', 'v4-32', False, error=REFUSED), _row('m', 'v4-32', True)]
    assert aot_table.wanted_cells(['m'], ['v4-32'], ['none', 'full'], done) == [('m', 'v4-32', False, 'full')]
    over_peak = [_row('m', 'v4-32', False, peak=40 * 2**30, hbm=32 * 2**30), _row('m', 'v4-32', True)]
    assert aot_table.wanted_cells(['m'], ['v4-32'], ['none', 'full'], over_peak) == [('m', 'v4-32', False, 'full')]


def test_aot_table_renders_refusals_fits_and_tight_rows():
    from tools import aot_table

    rows = [
        _row('b', 'v4-32', False, remat='full', peak=6 * 2**30, total=10 * 2**30, hbm=32 * 2**30),
        _row('b', 'v4-32', False, error=REFUSED),
        _row('a', 'v5e-256', True, peak=13 * 2**30, total=19 * 2**30),
    ]
    lines = aot_table.render_table(rows, {'a': 11_555_328, 'b': 44_638_464}).splitlines()
    assert lines[2] == '| `a` | 11.6M | v5e-256 | on | 256 | 13.00 | 19.00 | yes (tight) | 10 |'
    assert lines[3] == '| `b` | 44.6M | v4-32 | off | 256 | refused: temporaries 52.74G > 30.75G | — | no | 10 |'
    assert lines[4] == '| `b` + `remat=full` | 44.6M | v4-32 | off | 256 | 6.00 | 10.00 | yes | 10 |'


def test_a_fine_tuning_entry_compiles_the_fine_tuning_program():
    from experiments import base
    from experiments import downstream

    config = downstream.finetune_config(
        base.crate_mae_test(), 'mnist', ('train', 'test'), 4500, epochs=1, batch=16, image_size=28, num_classes=10
    )
    train_step, (state, batch), mesh = aot.build_train_step(config, jax.devices())
    assert set(state.params) == {'backbone', 'head', 'head_norm'} and state.params['head']['kernel'].shape == (32, 10)
    assert batch['label'].shape == (16,) and batch['label'].dtype == 'int32' and dict(mesh.shape)['data'] == 8
    compiled = train_step.lower(state, batch).compile()  # the engine's fine-tuning step, as a pod would run it
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def _whitebox_family_config():
    """The test model with both successor operators (TSSA and CRATE-alpha's sparse coding, docs/model.md §7)."""
    from experiments import base

    config = base.crate_alpha(base.tost(base.crate_mae_test()))
    config.train.global_batch = 16
    return config


@pytest.mark.slow  # one compile of the whole step, as the fine-tuning test; tens of seconds on a loaded machine
def test_the_successor_operators_compile_the_pretraining_step_over_devices():
    train_step, (state, batch), mesh = aot.build_train_step(_whitebox_family_config(), jax.devices())
    layers = state.params['encoder']['layers']
    assert {'tssa', 'sparse_coding'} <= set(layers) and layers['sparse_coding']['dictionary'].shape == (2, 32, 128)
    compiled = train_step.lower(state, batch).compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0 and dict(mesh.shape)['data'] == len(jax.devices())


@needs_libtpu
def test_compiles_the_successor_operators_for_a_v5e_2x2_slice():
    result = _aot(
        '--config=experiments/registry.py:crate_mae_test',
        '--topology=v5e:2x2',
        '--config.model.attention_operator=tssa',
        '--config.model.sparse_block=crate_alpha',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'FITS' in result.stdout, result.stdout
