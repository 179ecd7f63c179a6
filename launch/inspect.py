"""Look inside a CRATE-MAE: compression and sparsity per encoder layer, MSSA and ISTA apart, attention, PCA, reconstructions.

  python -m launch.inspect --checkpoint=runs/crate_mae_mnist --all_steps --random_init --out=runs/crate_mae_mnist/inspect
  python -m launch.inspect --checkpoint=model.safetensors --dataset=mnist --out=DIR          # an export
  python -m launch.inspect --checkpoint=RUN_A --compare=RUN_B/checkpoints/1000 --out=DIR     # several runs

--checkpoint is a training workdir (the newest step unless --step), one <workdir>/checkpoints/<step> directory, or an
exported state dict (.safetensors/.npz/.pth). Writes to --out: layerwise.png (the reference's layer-wise figure),
mssa_ista.png (what each step does to the coding rate), sparsity_inversion.png, attention_layers.png,
attention_heads.png, pca.png / pca_reference.png, reconstructions.png and whitebox.json. Flags take dashes or
underscores. docs/whitebox.md explains the measures.
"""

import dataclasses

from absl import flags

from cratemae import inspection
from launch import cli

FLAGS = cli.flag_values()
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir, its checkpoints/STEP, or an export.', flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', None, 'Output directory (local or gs://).', flag_values=FLAGS)
_STEP = flags.DEFINE_integer('step', None, 'Step of a workdir (default: the newest).', flag_values=FLAGS)
_ALL_STEPS = flags.DEFINE_bool('all_steps', False, 'Measure every saved step of the workdir.', flag_values=FLAGS)
_COMPARE = flags.DEFINE_list('compare', [], 'More checkpoints to measure beside --checkpoint.', flag_values=FLAGS)
_RANDOM_INIT = flags.DEFINE_bool('random_init', False, "Also the run seed's random init.", flag_values=FLAGS)
_DATASET = flags.DEFINE_string('dataset', None, "Registered dataset (default: the run's).", flag_values=FLAGS)
_SPLIT = flags.DEFINE_string(
    'split_eval',
    None,
    "Split the images come from (default: the run's eval split; auto: validation, val or test).",
    flag_values=FLAGS,
)
flags.DEFINE_alias('split', 'split_eval', flag_values=FLAGS)
_IMAGE_FILES = flags.DEFINE_list('image_files', [], 'Image files to show instead of dataset images.', flag_values=FLAGS)
_LAYERS = flags.DEFINE_string('layers', 'all', "attention_layers.png layers: '0,3' or 'all'.", flag_values=FLAGS)
_HEADS = flags.DEFINE_string('heads', 'mean', "attention_layers.png heads: '0,2', 'all', 'mean'.", flag_values=FLAGS)
_IMAGES = flags.DEFINE_integer('images', 4, 'Images in the pictures (the first of the split).', flag_values=FLAGS)
_IMAGE_IDS = flags.DEFINE_list('image_ids', [], "Indices of the images to show, e.g. '3,17'.", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer('batch', 64, 'Images the measures average over.', flag_values=FLAGS)
_MASK_RATIOS = flags.DEFINE_list(
    'mask_ratios', ['0.5', '0.75', '0.9'], 'reconstructions.png ratios.', flag_values=FLAGS
)
_PCA = flags.DEFINE_enum(
    'pca',
    'both',
    list(inspection.PCA_CHOICES),
    "PCA maps: 'joint' (ours, pca.png), 'reference' (PC2-PC4 per image, pca_reference.png).",
    flag_values=FLAGS,
)
_PAPER = flags.DEFINE_bool(
    'paper',
    False,
    'Also the paper-exact coding rate (orthonormal U_k, no token normalisation), and mssa_ista_paper.png.',
    flag_values=FLAGS,
)


def _numbers(values, kind, what):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise cli.UsageError(f'--{what} must be comma-separated numbers, got {",".join(values)!r}.') from None


def options():
    """The parsed flags as ``inspection.Options`` (one flag per field, of the same name; lists become tuples)."""
    if not _CHECKPOINT.value or not _OUT.value:
        raise cli.UsageError('--checkpoint and --out are required.')
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(inspection.Options) if f.name != 'split'}
    values.update(split=_SPLIT.value, compare=tuple(_COMPARE.value), image_files=tuple(_IMAGE_FILES.value))
    values.update(image_ids=_numbers(_IMAGE_IDS.value, int, 'image_ids'))
    values.update(mask_ratios=_numbers(_MASK_RATIOS.value, float, 'mask_ratios'))
    return inspection.Options(**values)


def main(argv):
    cli.no_positional(argv)
    try:
        summary = inspection.inspect(options())
    except (ValueError, FileNotFoundError) as e:
        raise cli.UsageError(str(e)) from None
    for note in summary['notes']:
        print('note:', note)
    for name, why in summary['skipped'].items():
        print(f'skipped {name}: {why}')
    print(
        f'wrote {", ".join(summary["files"])} and whitebox.json to {_OUT.value} in '
        f'{summary["timings"]["total_s"]:.1f} s'
    )


if __name__ == '__main__':
    cli.main(main, FLAGS)
