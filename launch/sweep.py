"""Run a family of registered experiments one after another, evaluate each, and tabulate the results.

  python -m launch.sweep --names='mnist_ablate_mask_*' [--steps=600] [--dataset=mnist] [--out=runs/sweeps]

For every registry name matching the pattern (fnmatch), plus the base entry the family overrides, it trains into
<out>/<name> (resumable: a finished entry is not rerun, an interrupted one continues), measures the run
(cratemae.evaluate.ablation: held-out reconstruction, ridge and kNN probes, compression and sparsity of the last
layer) and writes <out>/<pattern>.md, .csv and .png. docs/ablations.md is made of those tables.
"""

import json
import logging
import os

from absl import flags

from cratemae import train
from cratemae.evaluate import ablation
from experiments import sweeps
from launch import cli

FLAGS = cli.flag_values()
_NAMES = flags.DEFINE_string(
    'names', None, "fnmatch pattern of registry names, e.g. 'mnist_ablate_mask_*'.", flag_values=FLAGS
)
_STEPS = flags.DEFINE_integer(
    'steps', None, 'Override train.steps of every entry (short CPU schedules).', flag_values=FLAGS
)
_DATASET = flags.DEFINE_string('dataset', None, 'Override data.name of every entry.', flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', 'runs/sweeps', 'Where the runs and the result tables go.', flag_values=FLAGS)
_NO_BASE = flags.DEFINE_bool(
    'no_base', False, 'Do not add the base entry of the family to the sweep.', flag_values=FLAGS
)


def main(argv):
    cli.no_positional(argv)
    if not _NAMES.value:
        raise cli.UsageError("--names=PATTERN is required, e.g. --names='mnist_ablate_mask_*'.")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    rows = []
    try:
        names = sweeps.sweep_names(_NAMES.value, include_base=not _NO_BASE.value)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    for name in names:
        config = sweeps.sweep_config(name, _STEPS.value, _DATASET.value)
        workdir = os.path.join(_OUT.value, name)
        print(f'== {name} -> {workdir}', flush=True)
        train.train_and_evaluate(config, workdir)
        rows.append(sweeps.row(name, config, workdir))
        print(json.dumps(rows[-1]), flush=True)
    stem = os.path.join(_OUT.value, _NAMES.value.replace('*', 'all').replace('?', '_'))
    ablation.write_tables(rows, stem)
    print(open(stem + '.md').read())
    print(f'Wrote {stem}.md, .csv and .png')


if __name__ == '__main__':
    cli.main(main, FLAGS)
