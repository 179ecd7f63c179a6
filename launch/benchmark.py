"""Train-step speed of a registered experiment: images/s, ms/step, compile time, peak memory, FLOPs and MFU.

  python -m launch.benchmark --config=experiments/registry.py:NAME [--batch B] [--steps N] [--warmup W]
      [--config.KEY=VALUE ...] [--sweep KEY=V1,V2 ...] [--sweep_mode product|each] [--nodonate]
      [--compiler_option NAME=VALUE ...] [--profile DIR] [--output FILE] [--peak_flops F]

Times the framework's real jitted train step: ``cratemae.train.tasks.build_program``, the program the engine runs
for the config's task, pretraining or fine-tuning (the task's train step with the optimizer of ``cratemae.train.optimizer``, the mesh and parameter shardings of
``cratemae.sharding``, the state donated), on synthetic images drawn on the devices (no input pipeline). Lowering and
compiling are timed apart (``jitted.lower(...).compile()``); then ``--warmup`` steps run untimed and each of
``--steps`` steps is timed to ``block_until_ready``. Prints one JSON line per point (fields: docs/performance.md).

Sweeps: ``--sweep model.attention=einsum,dot_product_attention --sweep batch=64,128`` runs the cartesian product
(``--sweep_mode each`` varies one key at a time from the base). Keys are config paths (a bare model key such as
``remat`` means ``model.remat``), ``batch``, ``donate`` or ``xla.NAME`` (an XLA compiler option for this point).
One process keeps one allocator, so on a GPU ``peak_bytes_in_use`` after the first point is the peak so far, not
the point's own; ``memory_analysis`` is per point, and ``launch/gpu_sweep.py`` runs each point in its own process.
XLA_FLAGS act on the whole process: set them in the environment (they are recorded in the JSON).

CPU timings on a shared machine are only as good as its idle cores: each record carries the load average, the
cores other processes kept busy during the timed steps (from /proc/stat) and this process's CPU-seconds per step,
which depend much less on the neighbours than wall time. Set JAX_PLATFORMS=cpu where libtpu is installed but no TPU.
"""

import copy
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback

import flax
import jax
import jax.numpy as jnp
import jaxlib
import optax
from absl import flags
from ml_collections import config_flags

from cratemae import distributed
from cratemae import flops
from cratemae import metrics as metrics_lib
from cratemae import sharding
from cratemae import train
from cratemae.train import tasks

_REGISTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'registry.py')
# The options recorded with every point, besides the overrides that were asked for.
_MODEL_OPTIONS = (
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


def _define_flags(fv, argv):
    config_flags.DEFINE_config_file(
        'config', f'{_REGISTRY}:crate_mae_mnist', 'experiments/registry.py:NAME.', flag_values=fv, lock_config=True,
        sys_argv=argv,  # the --config.KEY overrides are defined from the argv being parsed, not sys.argv
    )
    flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s train.global_batch).', flag_values=fv)
    flags.DEFINE_integer('steps', 20, 'Timed steps per point.', flag_values=fv)
    flags.DEFINE_integer('warmup', 3, 'Untimed steps after compiling.', flag_values=fv)
    flags.DEFINE_multi_string('sweep', [], 'KEY=V1,V2,...; repeatable.', flag_values=fv)
    flags.DEFINE_enum('sweep_mode', 'product', ['product', 'each'], 'Cartesian product or one key at a time.',
                      flag_values=fv)
    flags.DEFINE_bool('donate', True, 'Donate the train state to the step (as the training loop does).',
                      flag_values=fv)
    flags.DEFINE_multi_string('compiler_option', [], 'NAME=VALUE XLA option for compile(); repeatable.',
                              flag_values=fv)
    flags.DEFINE_string('profile', None, 'Write a jax.profiler trace of a few steps (of the first point) here.',
                        flag_values=fv)
    flags.DEFINE_integer('profile_steps', 3, 'Steps in the profile.', flag_values=fv)
    flags.DEFINE_string('output', None, 'Also append the JSON lines to this file.', flag_values=fv)
    flags.DEFINE_float('peak_flops', None, 'Peak FLOP/s per device for MFU (default: cratemae.flops table).',
                       flag_values=fv)


# ----------------------------------------------------------------------------------------------------------------
# Points: a base config plus overrides.


def parse_value(text, like=None):
    """'true'/'false' -> bool, int, float, 'none' -> None, else the string; the type of ``like`` (if given) wins."""
    low = text.strip().lower()
    if isinstance(like, bool) or (like is None and low in ('true', 'false')):
        if low not in ('true', 'false', '1', '0'):
            raise ValueError(f'{text!r} is not a boolean (true/false).')
        return low in ('true', '1')
    if isinstance(like, str):  # e.g. remat='none' stays a string
        return text
    if low == 'none':
        return None
    for kind in (int, float):
        if like is None or isinstance(like, (int, float)):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def resolve_key(config, key):
    """'remat' -> 'model.remat' when the top level has no such key; 'batch', 'donate', 'xla.*' stay."""
    if key in ('batch', 'donate') or key.startswith('xla.'):
        return key
    head = key.split('.')[0]
    if head not in config and head in config.model:
        return f'model.{key}'
    return key


def _get(config, path):
    node = config
    for part in path.split('.'):
        if part not in node:
            raise KeyError(f'{path!r} is not a config key (top level: {", ".join(sorted(config.keys()))}).')
        node = node[part]
    return node


def _set(config, path, value):
    *parents, last = path.split('.')
    node = config
    for part in parents:
        node = node[part]
    if last not in node:
        raise KeyError(f'{path!r} is not a config key.')
    node[last] = value


def parse_sweep(config, specs):
    """['KEY=V1,V2', ...] -> [(resolved key, [values...]), ...], values typed like the config's current value."""
    axes = []
    for spec in specs:
        if '=' not in spec:
            raise ValueError(f'--sweep {spec!r}: expected KEY=V1,V2,...')
        key, values = spec.split('=', 1)
        key = resolve_key(config, key.strip())
        like = True if key == 'donate' else 0 if key == 'batch' else None
        if not key.startswith('xla.') and key not in ('batch', 'donate'):
            like = _get(config, key)
        axes.append((key, [parse_value(v, like) for v in values.split(',')]))
    return axes


def sweep_points(axes, mode='product'):
    """Dicts of overrides: the cartesian product of the axes, or (mode 'each') one axis varied at a time."""
    if not axes:
        return [{}]
    if mode == 'product':
        keys = [k for k, _ in axes]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]
    return [{key: value} for key, values in axes for value in values]


def apply_overrides(config, overrides):
    """A copy of ``config`` with the config-path overrides applied (re-validated by the caller)."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if key in ('batch', 'donate') or key.startswith('xla.'):
            continue
        _set(config, key, value)
    return config


# ----------------------------------------------------------------------------------------------------------------
# The step, built as the engine (cratemae/train/engine.py) builds it.


def build(config, mesh, donate=True):
    """(state, jitted train step, batch sharding) from ``cratemae.train.tasks.build_program``: the engine's own
    program, with the state initialised as the engine initialises it (config.train.global_batch is the batch)."""
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
    """Standard-normal NHWC images (normalised pixels), drawn directly on the devices that hold them; class 0 labels
    for a fine-tuning config."""
    shape = (batch, config.model.image_size, config.model.image_size, config.model.channels)
    draw = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32), out_shardings=batch_sharding)
    out = {'image': draw(jax.random.key(seed))}
    if tasks.task_name(config) == 'finetune':
        out['label'] = jax.device_put(jnp.zeros((batch,), jnp.int32), batch_sharding)
    return out


def _memory(compiled, device):
    """Peak device memory: allocator statistics where the backend keeps them (GPU, TPU), else XLA's plan."""
    try:
        m = compiled.memory_analysis()
        keys = ('argument', 'output', 'alias', 'temp', 'generated_code')
        analysis = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in keys}
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
    """XLA's own FLOP count of the compiled step (remat recomputation and padding included), or None."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost['flops']) if cost and 'flops' in cost else None
    except Exception:  # noqa: BLE001
        return None


def run_point(config, batch, steps, warmup, donate=True, compiler_options=None, profile_dir=None,
              profile_steps=3, peak=None):
    """Compiles and times one point; returns its record (see module doc)."""
    distributed.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    batch_devices = mesh.shape['data'] * mesh.shape['fsdp']
    config = copy.deepcopy(config)
    config.train.global_batch = batch
    train.validate_config(config, batch_devices, jax.process_count())
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
    peak_bytes, source, analysis = _memory(compiled, device)
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


def _environment():
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


def _options(config, donate, compiler_options):
    out = {k: config.model.get(k) for k in _MODEL_OPTIONS}
    out.update(donate=donate, accum_steps=config.optim.accum_steps, compiler_options=compiler_options)
    return out


def _emit(record, output):
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if output:
        with open(output, 'a') as f:
            f.write(line + '\n')


def main(argv=None):
    """Runs the benchmark for argv (sys.argv when None); returns 0 if every point ran, else 1."""
    argv = list(argv) if argv is not None else sys.argv
    fv = flags.FlagValues()
    _define_flags(fv, argv)
    fv(argv)
    base = fv['config'].value
    if fv['steps'].value < 1 or fv['warmup'].value < 0:
        raise flags.ValidationError('--steps must be >= 1 and --warmup >= 0.')
    compiler_base = {}
    for spec in fv['compiler_option'].value:
        name, _, value = spec.partition('=')
        compiler_base[name] = parse_value(value)
    points = sweep_points(parse_sweep(base, fv['sweep'].value), fv['sweep_mode'].value)
    env = _environment()
    failures = 0
    for index, overrides in enumerate(points):
        batch = int(overrides.get('batch', fv['batch'].value or base.train.global_batch))
        donate = bool(overrides.get('donate', fv['donate'].value))
        compiler_options = dict(compiler_base, **{k[4:]: v for k, v in overrides.items() if k.startswith('xla.')})
        record = {'benchmark': 'train_step', 'config': base.name, 'batch': batch, 'steps': fv['steps'].value,
                  'warmup': fv['warmup'].value, 'overrides': overrides, **env}
        try:
            config = apply_overrides(base, overrides)
            record['options'] = _options(config, donate, compiler_options)
            record.update(run_point(
                config, batch, fv['steps'].value, fv['warmup'].value, donate, compiler_options,
                fv['profile'].value if index == 0 else None, fv['profile_steps'].value, fv['peak_flops'].value))
            if index and record['peak_memory_source'].startswith('memory_stats'):
                record['peak_memory_note'] = 'process peak so far: includes the earlier points of this sweep'
        except Exception as e:  # noqa: BLE001 - a point that cannot run (OOM, unsupported kernel) is a result too
            failures += 1
            record['error'] = f'{type(e).__name__}: {e}'[:2000]
            record['traceback_tail'] = traceback.format_exc()[-1500:]
        _emit(record, fv['output'].value)
        jax.clear_caches()
        gc.collect()
    return 1 if failures else 0


if __name__ == '__main__':
    raise SystemExit(main())
