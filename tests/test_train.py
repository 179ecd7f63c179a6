"""The training engine: sharded step, accumulation, exact resume after SIGKILL, preemption, NaN, bad configs."""

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import experiments
from cratemae import data
from cratemae import models
from cratemae import sharding
from cratemae import train
from cratemae.data import augment
from cratemae.train import engine
from cratemae.train import optimizer
from cratemae.train import pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(**train_overrides):
    config = experiments.get_config('crate_mae_test')
    config.train.update(train_overrides)
    return config


def _run_steps(config, mesh, batches):
    """Runs the loop's own jitted train step on `mesh` over `batches`; returns the final state on the host."""
    program = engine.build_program(config, mesh, pretrain.Pretrain(config))
    state = program.init()
    losses = []
    for images in batches:
        state, metrics = program.train_step(state, {'image': jax.device_put(images, sharding.batch_sharding(mesh))})
        losses.append(float(metrics['loss']))
    return jax.device_get(state), losses


def _batches(config, n, seed=0):
    """uint8 image batches, as the pipeline hands them to the engine (the step normalises them on the devices)."""
    rng = np.random.default_rng(seed)
    shape = (config.train.global_batch, config.model.image_size, config.model.image_size, config.model.channels)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


def test_train_step_on_uint8_equals_the_step_on_the_host_normalised_batch():
    """The engine's step normalises uint8 images on the devices; the same step without that, fed the float32 batch
    normalised on the host (the old path), gives the same loss and update within float32 rounding."""
    config = _config()
    mesh = _mesh(jax.devices())
    task = pretrain.Pretrain(config)
    program = engine.build_program(config, mesh, task)
    mean, std = data.normalization(config.data)
    assert not np.allclose(mean, 0) and not np.allclose(std, 1)  # a normalisation that changes the pixels
    images = _batches(config, 1)[0]
    host = augment.normalize(images, np.float32(mean), np.float32(std))
    schedule = optimizer.learning_rate_schedule(
        config.optim, config.train.global_batch, optimizer.schedule_length(config)
    )
    old_step = jax.jit(task.train_step(program.tx, schedule))
    batch_sharding = sharding.batch_sharding(mesh)
    old_state, old_metrics = jax.device_get(old_step(program.init(), {'image': jax.device_put(host, batch_sharding)}))
    u8 = jax.device_put(images, batch_sharding)
    assert u8.dtype == np.uint8
    new_state, new_metrics = jax.device_get(program.train_step(program.init(), {'image': u8}))
    np.testing.assert_allclose(new_metrics['loss'], old_metrics['loss'], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.params, old_state.params
    )
    # and the normalisation is not a no-op: the raw pixels as floats give another loss
    _, raw_metrics = jax.device_get(
        old_step(program.init(), {'image': jax.device_put(images.astype(np.float32), batch_sharding)})
    )
    assert abs(float(raw_metrics['loss']) - float(old_metrics['loss'])) > 1e-3


def _mesh(devices, **axes):
    return sharding.make_mesh(dict({'data': -1, 'fsdp': 1, 'model': 1}, **axes), devices=devices)


def test_sharded_step_equals_single_device_step():
    config = _config()
    batches = _batches(config, 3)
    single, single_losses = _run_steps(config, _mesh(jax.devices()[:1]), batches)
    multi, multi_losses = _run_steps(config, _mesh(jax.devices()), batches)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), multi.params, single.params)


def test_fsdp_rules_shard_parameters_and_match_replicated():
    config = _config()
    with config.unlocked():
        config.sharding_rules = (('.*', 'fsdp_largest'),)
    batches = _batches(config, 2)
    replicated, _ = _run_steps(_config(), _mesh(jax.devices()), batches)
    fsdp, _ = _run_steps(config, _mesh(jax.devices(), data=1, fsdp=8), batches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fsdp.params, replicated.params)


def test_gradient_accumulation_equals_full_batch():
    config = _config()
    batches = _batches(config, 2)
    full, full_losses = _run_steps(config, _mesh(jax.devices()), batches)
    config.optim.accum_steps = 2
    accumulated, accumulated_losses = _run_steps(config, _mesh(jax.devices()), batches)
    np.testing.assert_allclose(accumulated_losses, full_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), accumulated.params, full.params)


def test_nonfinite_loss_skips_update_and_records_step():
    config = _config()
    batches = [b.astype(np.float32) for b in _batches(config, 3)]  # uint8 cannot hold the NaN
    batches[1][0, 0, 0, 0] = np.nan
    state, losses = _run_steps(config, _mesh(jax.devices()), batches)
    clean, _ = _run_steps(config, _mesh(jax.devices()), batches[:1])
    assert np.isnan(losses[1]) and int(state.nonfinite_step) == 1
    jax.tree.map(np.testing.assert_array_equal, state.params, clean.params)  # frozen at the last good state


def test_learning_rate_schedule_and_weight_decay_mask():
    config = _config()
    config.optim.update(base_lr=1e-3, warmup_steps=10, min_lr=0.0)
    schedule = optimizer.learning_rate_schedule(config.optim, global_batch=512, total_steps=110)
    peak = 1e-3 * 512 / 256
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), peak * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), peak * 0.5, rtol=1e-5)  # half-way down the half-cosine
    np.testing.assert_allclose(float(schedule(110)), 0.0, atol=1e-9)
    mask = optimizer.decay_mask({'w': np.zeros((3, 3)), 'b': np.zeros(3), 'cls': np.zeros((1, 1, 3))})
    assert mask == {'w': True, 'b': False, 'cls': True}


# --------------------------------------------------------------------------------------------------------------
# The real entry point, in subprocesses.


def _launch(workdir, *flags, timeout=240, kill_at_step=None):
    """launch.train in a subprocess; with kill_at_step, through tests/faults.py, which SIGKILLs it after that step."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='/tmp/cratemae_jax_cache', PYTHONUNBUFFERED='1')
    launcher = ['-m'] if kill_at_step is None else ['tests/faults.py', f'--kill_at_step={kill_at_step}']
    cmd = [
        sys.executable,
        *launcher,
        'launch.train',
        '--config=experiments/registry.py:crate_mae_test',
        f'--workdir={workdir}',
        *flags,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _final_params(workdir, step):
    manager = ocp.CheckpointManager(pathlib.Path(workdir) / 'checkpoints')
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state['params']


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """The uninterrupted 20-step run that the interrupted ones must reproduce bit for bit."""
    workdir = tmp_path_factory.mktemp('straight')
    result = _launch(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow  # the real command in subprocesses
def test_resume_after_sigkill_is_bit_exact(tmp_path, straight_run):
    killed = _launch(tmp_path / 'killed', kill_at_step=13)
    assert killed.returncode == -signal.SIGKILL
    resumed = _launch(tmp_path / 'killed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resumed from step 10' in resumed.stderr
    jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / 'killed', 20), _final_params(straight_run, 20))


@pytest.mark.slow  # the real command in subprocesses
def test_schedule_steps_stops_a_run_early_on_its_original_schedule(tmp_path, straight_run):
    # Steps 0-9 of the 20-step run, stopped at 10: the same state as the straight run's step-10 checkpoint.
    stopped = _launch(tmp_path / 'stopped', '--config.train.steps=10', '--config.optim.schedule_steps=20')
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    jax.tree.map(
        np.testing.assert_array_equal, _final_params(tmp_path / 'stopped', 10), _final_params(straight_run, 10)
    )
    # Without it, train.steps=10 is a 10-step schedule: its cosine reaches zero at step 10, so the weights differ.
    short = _launch(tmp_path / 'short', '--config.train.steps=10')
    assert short.returncode == 0, short.stderr[-3000:]
    differs = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), _final_params(tmp_path / 'short', 10), _final_params(straight_run, 10)
    )
    assert any(jax.tree.leaves(differs))
    config = _config()
    config.optim.schedule_steps = 0
    with pytest.raises(ValueError, match='optim.schedule_steps=0 must be at least 1'):
        engine.validate_config(config, 1, 1)


@pytest.mark.slow  # the real command in subprocesses
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='/tmp/cratemae_jax_cache')
    proc = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'launch.train',
            '--config=experiments/registry.py:crate_mae_test',
            f'--workdir={tmp_path}',
            '--config.train.steps=100000',
            '--config.checkpoint.every=100000',
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = tmp_path / 'metrics.jsonl'
        deadline = time.time() + 180
        while not (metrics.exists() and metrics.read_text().count('\n') >= 2) and time.time() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
    assert steps and 0 < max(steps) < 100000, steps
    assert 'Preemption' in stderr


@pytest.mark.slow  # the real command in subprocesses
def test_unknown_override_key_names_the_closest_key(tmp_path):
    result = _launch(tmp_path, '--config.model.widht=64', timeout=120)
    assert result.returncode != 0
    assert 'widht' in result.stderr and 'width' in result.stderr


# --------------------------------------------------------------------------------------------------------------
# Bad input fails before compiling, with the numbers.


def test_batch_that_does_not_divide_over_devices_is_rejected(tmp_path):
    config = _config(global_batch=12)
    with pytest.raises(ValueError, match='multiple of 8'):
        train.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir_is_reported(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a directory')
    with pytest.raises((OSError, ValueError), match='file'):
        train.train_and_evaluate(_config(), str(blocker / 'run'))


def test_resuming_a_workdir_of_another_config_names_the_keys(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps(_config().to_dict(), default=list))
    config = _config()
    config.model.ista_lambda = 5.0
    with pytest.raises(ValueError, match=r'model\.ista_lambda'):
        train.train_and_evaluate(config, str(tmp_path))


def test_unknown_experiment_lists_valid_names():
    with pytest.raises(ValueError, match='crate_mae_base'):
        experiments.get_config('crate_mae_hyuge')


@pytest.mark.parametrize(
    'key,value,message',
    [
        ('heads', 5, 'not divisible by heads'),
        ('width', 30, 'divisible by 4'),
        ('image_size', 30, 'not divisible by patch_size'),
        ('mask_ratio', 1.0, 'mask_ratio'),
        ('mask_ratio', 0.99, 'keeps'),
    ],
)
def test_invalid_model_values_are_rejected_at_config_time(key, value, message):
    config = _config()
    config.model[key] = value
    with pytest.raises(ValueError, match=message):
        models.validate_model_config(config.model)


@pytest.mark.slow  # the real command in subprocesses
def test_damaged_newest_checkpoint_falls_back_and_training_recovers(tmp_path, straight_run):
    damaged = tmp_path / 'damaged'
    first = _launch(damaged)
    assert first.returncode == 0, first.stderr[-3000:]
    for data_file in (damaged / 'checkpoints' / '20' / 'state' / 'd').iterdir():
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    rerun = _launch(damaged, '--config.train.steps=20')
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'step 20' in rerun.stderr and 'failed to restore' in rerun.stderr
    assert 'Resumed from step 10' in rerun.stderr
    assert list((damaged / 'checkpoints_damaged').iterdir())  # kept for inspection, out of the way
    jax.tree.map(np.testing.assert_array_equal, _final_params(damaged, 20), _final_params(straight_run, 20))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = engine.sharding.host_local_to_global
    calls = {'train': 0}

    def poisoned(batch, mesh):
        if set(batch) == {'image'}:  # a train batch (eval batches also carry 'valid')
            calls['train'] += 1
            if calls['train'] == 13:  # the batch of step index 12
                batch = {'image': np.full(batch['image'].shape, np.nan, np.float32)}  # uint8 holds no NaN
        return real(batch, mesh)

    monkeypatch.setattr(engine.sharding, 'host_local_to_global', poisoned)
    with pytest.raises(train.NonFiniteLossError, match='at step 12'):
        train.train_and_evaluate(_config(), str(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps == [10]
    params = _final_params(tmp_path, 10)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_eval_batch_that_does_not_divide_over_devices_is_rejected(tmp_path):
    config = _config(eval_batch=12)
    with pytest.raises(ValueError, match='eval_batch=12 must split evenly over the 8 devices'):
        train.train_and_evaluate(config, str(tmp_path))


def test_every_registered_default_batch_divides_over_eight_devices():
    for name in experiments.names():
        config = experiments.get_config(name)
        train.validate_config(config, 8, 1)


def test_relative_workdir_trains_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(steps=10)
    train.train_and_evaluate(config, 'runs/relative')
    workdir = tmp_path / 'runs' / 'relative'
    assert (workdir / 'checkpoints' / '10').is_dir()
    # The evaluation also logs the white-box measures per layer, the MSSA and ISTA effects apart, and draws the
    # reconstructions and the two layer-wise figures (arrays written as PNGs, no file read back).
    evals = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines() if 'eval/' in line]
    assert {
        'whitebox/sparsity_zeros/layer_01',
        'whitebox/compression_input/layer_00',
        'whitebox/mssa_effect/layer_01',
        'whitebox/ista_effect/layer_00',
        'whitebox/compression_mid/layer_01',
    } <= set(evals[-1])
    assert {p.name for p in (workdir / 'images').iterdir()} >= {
        'reconstructions_00000010.png',
        'whitebox_layerwise_00000010.png',
        'whitebox_mssa_ista_00000010.png',
    }


def test_no_batch_is_copied_to_the_devices_past_the_last_step(tmp_path, monkeypatch):
    copied = []
    real = engine.device.sharding.host_local_to_global

    def host_local_to_global(batch, mesh):
        copied.append(batch['image'].shape)
        return real(batch, mesh)

    monkeypatch.setattr(engine.device.sharding, 'host_local_to_global', host_local_to_global)
    config = _config(steps=4)
    config.train.update(eval_every=100, eval_batch=8)  # the final evaluation copies its own batches of 8
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    train_copies = [s for s in copied if s[0] == config.train.global_batch]
    assert len(train_copies) == 4  # steps 0..3, not a fifth batch prefetched past the end


def test_unset_performance_options_are_chosen_for_the_platform_and_saved(tmp_path):
    config = _config(steps=1)
    assert config.model.fused_ista is None  # the registry leaves it to the platform
    train.train_and_evaluate(config, str(tmp_path / 'run'))
    saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert saved['model']['fused_ista'] is models.PLATFORM_DEFAULTS['cpu']['fused_ista']
    chosen = experiments.get_config('crate_mae_test').model
    assert models.apply_platform_defaults(chosen, 'tpu') == {'fused_ista': False}  # the reference path elsewhere
    explicit = experiments.get_config('crate_mae_test').model
    with pytest.raises(TypeError, match='fused_ista'):  # typed even while unset: a bad value fails at config time
        explicit.fused_ista = 'yes'
    explicit.fused_ista = False
    assert models.apply_platform_defaults(explicit, 'cpu') == {} and explicit.fused_ista is False


def test_random_params_are_a_runs_own_step_zero():
    config = _config()
    config.seed = 3
    program = engine.build_program(config, _mesh(jax.devices()[:1]), pretrain.Pretrain(config))
    step0 = jax.device_get(program.init().params)
    jax.tree.map(np.testing.assert_array_equal, models.random_params(config.model, seed=3), step0)
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), models.random_params(config.model, seed=4), step0)
    assert differs['encoder']['layers']['mssa']['qkv']['kernel'] and differs['patch_embed']['kernel']


def test_reconstruction_grid_of_a_uint8_eval_batch_shows_its_pixels():
    """The host batch is uint8 now: the grid's 'original' column must still be the image's own pixels (a grid drawn
    from the raw uint8 values as if normalised would be saturated), and the white-box figures get normalised images."""
    config = _config()
    mesh = _mesh(jax.devices())
    task = pretrain.Pretrain(config)
    program = engine.build_program(config, mesh, task)
    pipe = data.make_pipeline(
        config.data, split=config.data.split_eval, global_batch=config.train.eval_batch, seed=0, train=False, uint8=True
    )
    local = pipe.batch(0)
    assert local['image'].dtype == np.uint8
    batch = sharding.host_local_to_global({k: local[k] for k in task.eval_keys}, mesh)
    params = program.init().params
    out = program.eval_step(params, batch, jax.random.key(0))

    class Writer:
        def __init__(self):
            self.images = {}

        def write_images(self, step, images, png):
            self.images.update(images)

    writer = Writer()
    task.pictures(1, params, local, batch, out, pipe.info, writer, None)
    grid, pad, size = writer.images['reconstructions'], 2, config.model.image_size
    n = min(config.eval.images, local['image'].shape[0])
    assert grid.shape[0] == n * (size + pad) + pad
    for row in range(n):
        top = pad + row * (size + pad)
        original = grid[top : top + size, pad : pad + size].astype(int)
        np.testing.assert_allclose(original, local['image'][row].astype(int), atol=1)


# The engine's profile window (train.profile_start / profile_steps).


@pytest.mark.parametrize(
    'start,count,message',
    [(-1, 3, 'inside the run'), (19, 2, r'steps 19\.\.20'), (2, 0, 'at least one step')],
)
def test_profile_window_outside_the_run_is_rejected_at_config_time(start, count, message):
    config = _config(profile_start=start, profile_steps=count)
    with pytest.raises(ValueError, match=message):
        train.validate_config(config, 8, 1)


@pytest.mark.slow  # a 4-step run with a trace (~10 s)
def test_profile_window_leaves_a_trace_of_the_chosen_steps_in_the_workdir(tmp_path):
    config = _config(steps=4, profile_start=1, profile_steps=2)
    config.eval.whitebox = False  # its measures compile for seconds and have nothing to do with the trace
    train.train_and_evaluate(config, str(tmp_path))
    (run,) = (tmp_path / 'profile' / 'plugins' / 'profile').iterdir()
    assert list(run.glob('*.xplane.pb')), 'no TensorBoard trace'
    with gzip.open(run / 'perfetto_trace.json.gz') as f:
        events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    steps = sorted(int(e['args']['step_num']) for e in events if e.get('name') == 'train' and 'args' in e)
    assert steps == [1, 2]
