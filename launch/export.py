"""Export the weights of a training workdir, or convert a reference checkpoint once, for downstream use.

    python -m launch.export --workdir DIR [--step N] --format {safetensors,npz,orbax} --out PATH [--encoder-only]
    python -m launch.export --from FILE.pth --format safetensors --out FILE.safetensors [--config NAME]
                            [--trust_checkpoint]

safetensors / npz hold the reference PyTorch state dict (Ma-Lab-Berkeley/CRATE crate_ae names and layouts; the
reference loads them with strict=True, or strict=False for --encoder-only); orbax writes the Flax params tree only
(ocp.StandardCheckpointer) into the directory PATH, with PATH.json beside it. Every format records the model config
(and the data config and step), so a reader rebuilds the model without the registry. Without --step the newest step
that restores is exported (damaged newer steps are skipped with a warning).

--from converts a file written by the reference's training (FAIR MAE's save_model, CRATE's scripts; .pth/.pt need
torch, here only) into a format the rest of cratemae reads without torch, recording the architecture (from the
saved --model argument or the shapes; --config names it when neither tells the heads) and the epoch.
"""

import argparse
import logging
import os
import sys

from cratemae import export
from cratemae.evaluate import checkpoints


def _parser():
    p = argparse.ArgumentParser(prog='python -m launch.export', description=__doc__.split('\n\n')[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--workdir', help='training workdir (config.json + checkpoints/)')
    src.add_argument('--from', dest='source', help='reference checkpoint file (.pth/.pt/.safetensors/.npz)')
    p.add_argument('--step', type=int, default=None, help='step to export (default: the newest that restores)')
    p.add_argument('--format', required=True, choices=export.FORMATS)
    p.add_argument('--out', required=True, help='output file (safetensors, npz) or directory (orbax)')
    p.add_argument('--encoder-only', '--encoder_only', dest='encoder_only', action='store_true',
                   help='only the encoder (patch embedding, tokens, blocks, final norm): what downstream tasks read')
    p.add_argument('--config', default=None, help='with --from: the registry entry of the architecture '
                   '(NAME or experiments/registry.py:NAME), when the file does not show its number of heads')
    p.add_argument('--trust_checkpoint', '--trust-checkpoint', action='store_true',
                   help='with --from: unpickle a .pth without the weights_only restriction (runs code from the '
                        'file; only for files you trust)')
    return p


def _convert(args):
    model_config = None
    if args.config:
        import experiments  # pylint: disable=import-outside-toplevel
        model_config = experiments.get_config(args.config.rpartition(':')[2]).model
    out = export.convert(args.source, args.format, args.out, model_config=model_config, trust=args.trust_checkpoint)
    print(f'Converted {args.source} to {args.format}: {out} ({_size(out):,} bytes)')


def _size(out):
    if os.path.isdir(out):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return os.path.getsize(out)


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger('cratemae').setLevel(logging.INFO)
    try:
        if args.source:
            return _convert(args) or 0
        if not checkpoints.is_workdir(args.workdir):
            raise SystemExit(f'error: {args.workdir} is not a training workdir (it has no checkpoints/ folder).')
        ckpt = checkpoints.load(args.workdir, step=args.step, encoder_only=args.encoder_only)
        out = export.export_checkpoint(ckpt, args.format, args.out, encoder_only=args.encoder_only)
    except checkpoints.CheckpointError as e:
        raise SystemExit(f'error: {e}') from None
    except (ValueError, ImportError) as e:  # e.g. a ViT model has no reference state-dict layout
        hint = ' (--format orbax works for every architecture)' if args.format != 'orbax' and args.workdir else ''
        raise SystemExit(f'error: {e}{hint}') from None
    what = 'encoder' if args.encoder_only else 'model'
    print(f'Exported the {what} of {args.workdir} at step {ckpt.step} as {args.format}: {out} ({_size(out):,} bytes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
