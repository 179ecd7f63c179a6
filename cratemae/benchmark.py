"""Train-step speed: the training loop's own jitted program, timed on synthetic data.

``run_point(config, ...)`` builds the program the training engine runs for the config's task, pretraining or
fine-tuning (``cratemae.train.tasks.build_program``: the optimizer, the mesh and parameter shardings of the config,
the state donated), draws standard-normal images (and, for fine-tuning, class-0 labels) on the devices (no input pipeline), times lowering and compiling apart (``jitted.lower(...).compile()``), runs ``warmup``
untimed steps, then times each of ``steps`` steps to ``block_until_ready``. It returns one record: images/s, ms per
step, compile time, peak memory (allocator statistics where the backend keeps them, else XLA's plan from
``cratemae.aot.memory_analysis``), analytic and XLA FLOPs, MFU, and, because CPU wall time on a shared machine
depends on the neighbours, the load average, the cores other processes kept busy and this process's CPU-seconds per
step. The fields are described in docs/performance.md; ``python -m launch.benchmark`` is the command.
"""

import copy
import datetime
import gc
import itertools
import os
import platform
import statistics
import time
import traceback

import flax
import jax
import jax.numpy as jnp
import jaxlib
import optax

from cratemae import aot
from cratemae import distributed
from cratemae import flops
from cratemae import metrics as metrics_lib
from cratemae import sharding
from cratemae.train import engine
from cratemae.train import tasks

# The options recorded with every point, besides the overrides that were asked for.
MODEL_OPTIONS = (
    'attention',
    'attention_pad',
    'remat',
    'scan_unroll',
    'fused_ista',
    'dtype',
    'param_dtype',
    'encoder_sees_mask_tokens',
    'mask_ratio',
)


def build(config, mesh, donate=True):
    """(state, jitted train step, batch sharding) from ``tasks.build_program``: the engine's own program, with the
    state initialised as the engine initialises it (config.train.global_batch is the batch)."""
    program = tasks.build_program(config, mesh)
    state = program.init()
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = program.train_step
    if not donate:  # the same step function and shardings without donation, to measure what donation buys
        train_step = jax.jit(
            train_step.__wrapped__,
            in_shardings=(program.state_shardings, {k: batch_sharding for k in program.task.train_keys}),
            out_shardings=(program.state_shardings, sharding.replicated(mesh)),
        )
    return state, train_step, batch_sharding


def synthetic_batch(config, batch, batch_sharding, seed=0):
    """Uniform uint8 NHWC images (the batches travel as uint8; the step normalises them), drawn directly on the
    devices that hold them; class-0 labels for a fine-tuning config."""
    shape = (batch, config.model.image_size, config.model.image_size, config.model.channels)
    draw = jax.jit(
        lambda key: jax.random.randint(key, shape, 0, 256, jnp.int32).astype(jnp.uint8), out_shardings=batch_sharding
    )
    out = {'image': draw(jax.random.key(seed))}
    if tasks.task_name(config) == 'finetune':
        out['label'] = jax.device_put(jnp.zeros((batch,), jnp.int32), batch_sharding)
    return out


def peak_memory(compiled, device):
    """(peak bytes, where the figure comes from, XLA's plan): allocator statistics where the backend keeps them (GPU,
    TPU), else XLA's plan argument + output + temp - alias."""
    try:
        analysis = aot.memory_analysis(compiled)
        analysis['planned_peak'] = analysis['argument'] + analysis['output'] + analysis['temp'] - analysis['alias']
    except Exception as e:  # noqa: BLE001 - some backends have no memory analysis; the figure is then n/a
        analysis = {'unavailable': f'{type(e).__name__}: {e}'[:200]}
    stats = device.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        return int(stats['peak_bytes_in_use']), 'memory_stats.peak_bytes_in_use', analysis
    if 'planned_peak' in analysis:
        return analysis['planned_peak'], 'memory_analysis (argument + output + temp - alias)', analysis
    return None, 'n/a', analysis


def _xla_flops(compiled):
    try:
        return aot.xla_flops(compiled)
    except Exception:  # noqa: BLE001 - a backend without cost analysis: the figure is n/a
        return None


def run_point(config, steps, warmup, donate=True, compiler_options=None, profile_dir=None, profile_steps=3, peak=None):
    """Compiles and times the train step of ``config`` at its train.global_batch; returns the record."""
    distributed.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    batch = config.train.global_batch
    config = copy.deepcopy(config)
    engine.settle_config(config, mesh, jax.process_count())
    state, train_step, batch_sharding = build(config, mesh, donate)
    data = synthetic_batch(config, batch, batch_sharding)

    t0 = time.perf_counter()
    lowered = train_step.lower(state, data)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options or None)
    t2 = time.perf_counter()

    metrics = None
    for _ in range(warmup):
        state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    times = []
    load_before, busy0, cpu0 = os.getloadavg(), metrics_lib.busy_cpu_seconds(), time.process_time()
    wall0 = time.perf_counter()
    for _ in range(steps):
        s = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - s)
    wall = time.perf_counter() - wall0
    busy1, cpu1 = metrics_lib.busy_cpu_seconds(), time.process_time()
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(profile_steps):
                state, metrics = compiled(state, data)
            jax.block_until_ready((state, metrics))

    device = jax.devices()[0]
    peak_bytes, source, analysis = peak_memory(compiled, device)
    median = statistics.median(times)
    fwd, step_flops = flops.forward_flops(config.model, batch), flops.train_flops(config.model, batch)
    peak_device = peak or flops.peak_flops(device.device_kind)
    mfu = flops.mfu(step_flops * batch, median, device.device_kind, jax.device_count(), peak=peak_device)
    other_cores = None if busy0 is None else max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / wall)
    xla_flops = _xla_flops(compiled)
    record = {
        'images_per_s': batch / median,
        'ms_per_step': {'median': 1e3 * median, 'min': 1e3 * min(times), 'max': 1e3 * max(times)},
        'lower_s': t1 - t0,
        'compile_s': t2 - t1,
        'first_step_compile_s': t2 - t0,
        'peak_memory_bytes': peak_bytes,
        'peak_memory_gib': None if peak_bytes is None else peak_bytes / 2**30,
        'peak_memory_source': source,
        'memory_analysis_bytes': analysis,
        'forward_gflops_per_image': fwd / 1e9,
        'train_gflops_per_image': step_flops / 1e9,
        'achieved_tflops_per_device': step_flops * batch / median / jax.device_count() / 1e12,
        'xla_tflops_per_device_step': None if xla_flops is None else xla_flops / 1e12,
        'mfu': mfu,
        'peak_flops_per_device': peak_device,
        'loss': float(metrics['loss']),
        # Wall time on a shared CPU depends on the neighbours; CPU-seconds of this process (all its threads) much less.
        'process_cpu_s_per_step': (cpu1 - cpu0) / steps,
        'images_per_process_cpu_s': batch * steps / max(cpu1 - cpu0, 1e-9),
        'load_average': [round(x, 2) for x in load_before],
        'other_processes_cores_busy': None if other_cores is None else round(other_cores, 2),
    }
    del state, compiled, lowered, train_step
    return record


def environment():
    """What a record needs to be compared with another: device, versions, XLA flags, date."""
    device = jax.devices()[0]
    return {
        'device_kind': device.device_kind,
        'platform': device.platform,
        'num_devices': jax.device_count(),
        'cpu_count': os.cpu_count(),
        'jax': jax.__version__,
        'jaxlib': jaxlib.__version__,
        'flax': flax.__version__,
        'optax': optax.__version__,
        'python': platform.python_version(),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'compilation_cache': jax.config.jax_compilation_cache_dir,
        'date': datetime.datetime.now().isoformat(timespec='seconds'),
    }


def options(config, donate, compiler_options):
    """The model options and step settings a record was measured with."""
    out = {k: config.model.get(k) for k in MODEL_OPTIONS}
    out.update(donate=donate, accum_steps=config.optim.accum_steps, compiler_options=compiler_options)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sweeps of launch.benchmark: each point is the base command line plus one value per --sweep key.


def point_args(key, value):
    """The command-line arguments that set one sweep key to one value."""
    if key in ('batch', 'donate'):
        return [f'--{key}={value}']
    if key.startswith('xla.'):
        return [f'--compiler_option={key[4:]}={value}']
    return [f'--config.{key if "." in key else "model." + key}={value}']


def sweep_points(specs, mode='product'):
    """[({key: value}, [arguments...]), ...]: the cartesian product of the --sweep specs, or one key at a time."""
    axes = []
    for spec in specs:
        key, eq, values = spec.partition('=')
        if not eq or not key.strip():
            raise ValueError(f'--sweep {spec!r}: expected KEY=V1,V2,...')
        axes.append([(key.strip(), v) for v in values.split(',')])
    combos = itertools.product(*axes) if mode == 'product' else ([kv] for axis in axes for kv in axis)
    return [({k: v for k, v in combo}, [a for k, v in combo for a in point_args(k, v)]) for combo in combos]


def without_sweep(argv):
    """The command line without its --sweep / --sweep_mode arguments: the base every sweep point extends."""
    out, skip = [], False
    for arg in argv:
        if not skip and arg not in ('--sweep', '--sweep_mode') and not arg.startswith(('--sweep=', '--sweep_mode=')):
            out.append(arg)
        skip = arg in ('--sweep', '--sweep_mode') and not skip
    return out


def run_points(points, settings, fixed):
    """Yields the JSON record of each sweep point in turn: ``points`` [(overrides, args)], ``settings`` [(config, donate,
    compiler options)] and ``fixed`` (steps, warmup, profile, profile_steps, peak_flops). A point that cannot run (OOM,
    an unsupported kernel) is a record with its 'error', not the end of the sweep."""
    env = environment()
    for index, ((overrides, _), (config, donate, compiler_options)) in enumerate(zip(points, settings)):
        record = {
            'benchmark': 'train_step',
            'config': config.name,
            'batch': config.train.global_batch,
            'steps': fixed['steps'],
            'warmup': fixed['warmup'],
            'overrides': overrides,
            **env,
            'options': options(config, donate, compiler_options),
        }
        try:
            record.update(
                run_point(
                    config,
                    fixed['steps'],
                    fixed['warmup'],
                    donate,
                    compiler_options,
                    fixed['profile'] if index == 0 else None,
                    fixed['profile_steps'],
                    fixed['peak_flops'],
                )
            )
            if index and record['peak_memory_source'].startswith('memory_stats'):
                record['peak_memory_note'] = 'process peak so far: includes the earlier points of this sweep'
        except Exception as e:  # noqa: BLE001 - a point that cannot run is a result too
            record['error'] = f'{type(e).__name__}: {e}'[:2000]
            record['traceback_tail'] = traceback.format_exc()[-1500:]
        yield record
        jax.clear_caches()
        gc.collect()
