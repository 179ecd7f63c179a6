"""Train-step speed of a registered experiment: images/s, ms/step, compile time, peak memory, FLOPs and MFU.

  python -m launch.benchmark --config=NAME [--batch B] [--steps N] [--warmup W] [--config.KEY=VALUE ...]
      [--sweep KEY=V1,V2 ...] [--sweep_mode product|each] [--nodonate] [--compiler_option NAME=VALUE ...]
      [--profile DIR] [--out FILE] [--peak_flops F]

Times the training loop's own jitted train step on synthetic images (``cratemae.benchmark.run_point``) and prints one
JSON line per point (fields: docs/performance.md). A sweep point is this command line plus one value per --sweep
key: a config path (``model.remat``; a bare model key such as ``remat`` means ``model.remat``) becomes
``--config.KEY=V``, ``batch`` and ``donate`` set those flags, ``xla.NAME`` adds ``--compiler_option=NAME=V``. Every
point is parsed (and a bad key or value refused) before the first one runs. The default is the cartesian product;
``--sweep_mode each`` varies one key at a time from the base. One process keeps one allocator, so on a GPU
``peak_bytes_in_use`` after the first point is the peak so far (``tools/gpu_sweep.py`` runs each point in its own
process). XLA_FLAGS act on the whole process: set them in the environment (they are recorded in the JSON). Set
JAX_PLATFORMS=cpu where libtpu is installed but no TPU.
"""

if __name__ == '__main__':  # before jax is imported: glibc reads its tunables at start-up (cratemae/platform.py)
    from cratemae import platform as _platform

    _platform.reexec_with_cpu_tunables()

import json

from absl import flags

from cratemae import benchmark
from cratemae.train import finetune
from launch import cli

FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS, 'crate_mae_mnist')
flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s train.global_batch).', flag_values=FLAGS)
flags.DEFINE_integer('steps', 20, 'Timed steps per point.', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('warmup', 3, 'Untimed steps after compiling.', lower_bound=0, flag_values=FLAGS)
flags.DEFINE_multi_string('sweep', [], 'KEY=V1,V2,...; repeatable.', flag_values=FLAGS)
flags.DEFINE_enum(
    'sweep_mode', 'product', ['product', 'each'], 'Cartesian product or one key at a time.', flag_values=FLAGS
)
flags.DEFINE_bool('donate', True, 'Donate the train state to the step (as the training loop does).', flag_values=FLAGS)
flags.DEFINE_multi_string('compiler_option', [], 'NAME=VALUE XLA option for compile(); repeatable.', flag_values=FLAGS)
flags.DEFINE_string(
    'profile', None, 'Write a jax.profiler trace of a few steps (of the first point) here.', flag_values=FLAGS
)
flags.DEFINE_integer('profile_steps', 3, 'Steps in the profile.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.', flag_values=FLAGS)
flags.DEFINE_float(
    'peak_flops', None, 'Peak FLOP/s per device for MFU (default: cratemae.flops table).', flag_values=FLAGS
)


def _settings():
    """The parsed flags of one point."""
    config = _CONFIG.value
    if FLAGS.batch:
        config.train.global_batch = FLAGS.batch
    options = {name: value for name, _, value in (o.partition('=') for o in FLAGS.compiler_option)}
    return config, FLAGS.donate, options


def main(argv):
    cli.no_positional(argv)
    base = benchmark.without_sweep(cli.ARGV)
    try:
        points = benchmark.sweep_points(FLAGS.sweep, FLAGS.sweep_mode) if FLAGS.sweep else [({}, [])]
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    fixed = {n: FLAGS[n].value for n in ('steps', 'warmup', 'profile', 'profile_steps', 'out', 'peak_flops')}
    settings = []
    for _, args in points:  # every point parsed before the first runs: a bad key or value costs no compile
        cli.parse(FLAGS, base + args)
        settings.append(_settings())
        if 'finetune' in settings[-1][0]:  # synthetic batches: the class count must come from the config
            try:
                finetune.config_num_classes(settings[-1][0])
            except ValueError as e:
                raise cli.UsageError(str(e)) from None
    failures = 0
    for record in benchmark.run_points(points, settings, fixed):
        line = json.dumps(record, sort_keys=True)
        print(line, flush=True)
        if fixed['out']:
            with open(fixed['out'], 'a') as f:
                f.write(line + '\n')
        failures += 'error' in record
    return 1 if failures else 0


if __name__ == '__main__':
    cli.main(main, FLAGS)
