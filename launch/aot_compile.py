"""Will this experiment fit on that TPU slice? Compile its real train step for the slice here, without a TPU.

  python -m launch.aot_compile --config=experiments/registry.py:crate_mae_base --topology=v5e-256 \
      [--global_batch=4096] [--fsdp] [--config.KEY=VALUE ...]

--topology takes a gcloud accelerator type (v4-32, v5litepod-256 / v5e-256, v5p-128, v6e-256) or a libtpu topology
(v5e:16x16, v4:2x2x4, v5:4x4x4). Prints per-device memory (arguments, outputs, temporaries, peak) against the chip's
HBM, XLA's and the analytic FLOPs, and the compile time. Exit status: 0 fits, 1 does not fit, 2 bad arguments
(unknown topology, a batch that does not split over the devices, libtpu missing). Needs libtpu
(pip install -e '.[tpu]'), not a TPU; see docs/scale_out.md.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_REGISTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'registry.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', f'{_REGISTRY}:crate_mae_base', 'experiments/registry.py:NAME, optionally followed by --config.KEY=VALUE.',
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice: v4-32, v5e-256, v5p-128, v6e-256, or v5e:16x16 ...')
_GLOBAL_BATCH = flags.DEFINE_integer('global_batch', None, 'Global batch (default: config.train.global_batch).')
_FSDP = flags.DEFINE_bool('fsdp', False, "Shard parameters and optimizer state over all devices "
                          "(sharding_rules=(('.*', 'fsdp_largest'),), mesh data=1 fsdp=-1).")

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    from cratemae import aot  # pylint: disable=import-outside-toplevel  (after flag parsing: imports jax)
    if not _TOPOLOGY.value:
        print(f'--topology is required. Valid: {aot.valid_names()}.', file=sys.stderr)
        return EXIT_USAGE
    config = aot.apply_overrides(_CONFIG.value, _GLOBAL_BATCH.value, _FSDP.value)
    try:
        tpu_slice = aot.resolve_slice(_TOPOLOGY.value)
        devices = aot.topology_devices(tpu_slice)
        report = aot.compile_report(config, tpu_slice, devices)
    except (ValueError, RuntimeError) as e:  # unknown topology, batch not dividing, libtpu missing: no compile ran
        print(f'aot_compile: {e}', file=sys.stderr)
        return EXIT_USAGE
    print(aot.format_report(report, f'{config.name}{" (FSDP)" if _FSDP.value else ""}'), flush=True)
    if not report.fits:
        print(f'{config.name} does not fit on {tpu_slice.name} at global batch {report.global_batch}: try --fsdp, a '
              'smaller --global_batch (or optim.accum_steps), --config.model.remat=full, or a bigger slice.',
              file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS


if __name__ == '__main__':
    app.run(lambda argv: sys.exit(main(argv)))
