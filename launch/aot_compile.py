"""Will this experiment fit on that TPU slice? Compile its real train step for the slice here, without a TPU.

  python -m launch.aot_compile --config=crate_mae_base --topology=v5e-256 [--config.KEY=VALUE ...]

--topology takes a gcloud accelerator type (v4-32, v5litepod-256 / v5e-256, v5p-128, v6e-256) or a libtpu topology
(v5e:16x16, v4:2x2x4, v5:4x4x4). The batch is --config.train.global_batch; FSDP is
--config.sharding_rules="(('.*', 'fsdp_largest'),)" --config.mesh.data=1 --config.mesh.fsdp=-1. Prints per-device
memory (arguments, outputs, temporaries, peak) against the chip's HBM, XLA's and the analytic FLOPs, and the compile
time. Exit status: 0 fits, 1 does not fit, 2 bad arguments (unknown topology, a batch that does not split over the
devices, libtpu missing). Needs libtpu (pip install -e '.[tpu]'), not a TPU; see docs/scale_out.md.
"""

import sys

from absl import flags

from launch import cli

FLAGS = cli.flag_values()
_CONFIG = cli.define_config(FLAGS, 'crate_mae_base')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'TPU slice: v4-32, v5e-256, v5p-128, v6e-256, or v5e:16x16 ...', flag_values=FLAGS
)
EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 1
_FSDP_HINT = '--config.sharding_rules="((\'.*\', \'fsdp_largest\'),)" --config.mesh.data=1 --config.mesh.fsdp=-1'


def main(argv):
    cli.no_positional(argv)
    from cratemae import aot  # pylint: disable=import-outside-toplevel  (after flag parsing: imports jax)

    if not _TOPOLOGY.value:
        raise cli.UsageError(f'--topology is required. Valid: {aot.valid_names()}.')
    config = _CONFIG.value
    try:
        tpu_slice = aot.resolve_slice(_TOPOLOGY.value)
        report = aot.compile_report(config, tpu_slice, aot.topology_devices(tpu_slice))
    except (ValueError, RuntimeError) as e:  # unknown topology, batch not dividing, libtpu missing: no compile ran
        raise cli.UsageError(str(e)) from None
    print(aot.format_report(report, config.name), flush=True)
    if not report.fits:
        print(
            f'{config.name} does not fit on {tpu_slice.name} at global batch {report.global_batch}: try FSDP '
            f'({_FSDP_HINT}), a smaller --config.train.global_batch (or optim.accum_steps), '
            '--config.model.remat=full, or a bigger slice.',
            file=sys.stderr,
        )
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS


if __name__ == '__main__':
    cli.main(main, FLAGS)
