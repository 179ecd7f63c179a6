"""Export the weights of a training workdir for downstream use.

    python -m launch.export --workdir DIR [--step N] --format {safetensors,npz,orbax} --out PATH [--encoder-only]

safetensors / npz hold the reference PyTorch state dict (Ma-Lab-Berkeley/CRATE crate_ae names and layouts; the
reference loads them with strict=True, or strict=False for --encoder-only); orbax writes the Flax params tree only
(ocp.StandardCheckpointer) into the directory PATH, with PATH.json beside it. Every format records the model config
(and the data config and step), so a reader rebuilds the model without the registry. Without --step the newest step
that restores is exported (damaged newer steps are skipped with a warning).
"""

import argparse
import logging
import os
import sys

from cratemae.evaluate import checkpoints


def _parser():
    p = argparse.ArgumentParser(prog='python -m launch.export', description=__doc__.split('\n\n')[0])
    p.add_argument('--workdir', required=True, help='training workdir (config.json + checkpoints/)')
    p.add_argument('--step', type=int, default=None, help='step to export (default: the newest that restores)')
    p.add_argument('--format', required=True, choices=checkpoints.FORMATS)
    p.add_argument('--out', required=True, help='output file (safetensors, npz) or directory (orbax)')
    p.add_argument('--encoder-only', '--encoder_only', dest='encoder_only', action='store_true',
                   help='only the encoder (patch embedding, tokens, blocks, final norm): what downstream tasks read')
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not checkpoints.is_workdir(args.workdir):
        raise SystemExit(f'error: {args.workdir} is not a training workdir (it has no checkpoints/ folder).')
    try:
        ckpt = checkpoints.load(args.workdir, step=args.step, encoder_only=args.encoder_only)
        out = checkpoints.export_checkpoint(ckpt, args.format, args.out, encoder_only=args.encoder_only)
    except checkpoints.CheckpointError as e:
        raise SystemExit(f'error: {e}') from None
    except ValueError as e:  # e.g. a ViT model has no reference state-dict layout
        hint = ' (--format orbax works for every architecture)' if args.format != 'orbax' else ''
        raise SystemExit(f'error: {e}{hint}') from None
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) if os.path.isdir(out) \
        else os.path.getsize(out)
    what = 'encoder' if args.encoder_only else 'model'
    print(f'Exported the {what} of {args.workdir} at step {ckpt.step} as {args.format}: {out} ({size:,} bytes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
