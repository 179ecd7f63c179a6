"""Export the weights of a training workdir, or convert a reference checkpoint once, for downstream use.

  python -m launch.export --workdir=DIR [--step=N] --format={safetensors,npz,orbax} --out=PATH [--encoder_only]
  python -m launch.export --from=FILE.pth --format=safetensors --out=FILE.safetensors [--config=NAME]
                          [--trust_checkpoint]

safetensors / npz hold the reference PyTorch state dict (Ma-Lab-Berkeley/CRATE crate_ae names and layouts; the
reference loads them with strict=True, or strict=False for --encoder_only); orbax writes the Flax params tree only
(ocp.StandardCheckpointer) into the directory PATH, with PATH.json beside it. Every format records the model config
(and the data config and step), so a reader rebuilds the model without the registry. Without --step the newest step
that restores is exported (damaged newer steps are skipped with a warning).

--from converts a file written by the reference's training (FAIR MAE's save_model, CRATE's scripts; .pth/.pt need
torch, here only) into a format the rest of cratemae reads without torch, recording the architecture (from the
saved --model argument or the shapes; --config names it when neither tells the heads) and the epoch.
"""

import logging
import os

from absl import flags

from cratemae import export
from cratemae.evaluate import checkpoints
from launch import cli

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints/).', flag_values=FLAGS)
_FROM = flags.DEFINE_string(
    'from', None, 'Reference checkpoint file (.pth/.pt/.safetensors/.npz) to convert.', flag_values=FLAGS
)
_STEP = flags.DEFINE_integer('step', None, 'Step to export (default: the newest that restores).', flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum('format', None, list(export.FORMATS), 'Export format.', flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', None, 'Output file (safetensors, npz) or directory (orbax).', flag_values=FLAGS)
_ENCODER_ONLY = flags.DEFINE_bool(
    'encoder_only',
    False,
    'Only the encoder (patch embedding, tokens, blocks, final norm): what downstream tasks read.',
    flag_values=FLAGS,
)
_CONFIG = cli.define_config(FLAGS, help_text='With --from: the architecture, when the file does not show its heads.')
_TRUST = flags.DEFINE_bool(
    'trust_checkpoint',
    False,
    'With --from: unpickle a .pth without the weights_only '
    'restriction (runs code from the file; only for files you trust).',
    flag_values=FLAGS,
)


def _size(out):
    if os.path.isdir(out):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return os.path.getsize(out)


def main(argv):
    cli.no_positional(argv)
    if (_WORKDIR.value is None) == (_FROM.value is None):
        raise cli.UsageError('pass one of --workdir (a training run) and --from (a reference file).')
    missing = [f'--{n}' for n in ('format', 'out') if FLAGS[n].value is None]
    if missing:
        raise cli.UsageError(f'{", ".join(missing)} required.')
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    try:
        if _FROM.value:
            model_config = _CONFIG.value.model if _CONFIG.value else None
            out = export.convert(_FROM.value, _FORMAT.value, _OUT.value, model_config=model_config, trust=_TRUST.value)
            print(f'Converted {_FROM.value} to {_FORMAT.value}: {out} ({_size(out):,} bytes)')
            return 0
        if not checkpoints.is_workdir(_WORKDIR.value):
            raise cli.UsageError(f'{_WORKDIR.value} is not a training workdir (it has no checkpoints/ folder).')
        ckpt = checkpoints.load(_WORKDIR.value, step=_STEP.value, encoder_only=_ENCODER_ONLY.value)
        out = export.export_checkpoint(ckpt, _FORMAT.value, _OUT.value, encoder_only=_ENCODER_ONLY.value)
    except checkpoints.CheckpointError as e:
        raise cli.UsageError(str(e)) from None
    except (ValueError, ImportError) as e:  # e.g. a ViT model has no reference state-dict layout
        hint = ' (--format=orbax works for every architecture)' if _FORMAT.value != 'orbax' and _WORKDIR.value else ''
        raise cli.UsageError(f'{e}{hint}') from None
    what = 'encoder' if _ENCODER_ONLY.value else 'model'
    print(
        f'Exported the {what} of {_WORKDIR.value} at step {ckpt.step} as {_FORMAT.value}: {out} ({_size(out):,} bytes)'
    )


if __name__ == '__main__':
    cli.main(main, FLAGS)
