"""Input-pipeline throughput, one JSON line per mode (cratemae/data/throughput.py).

    python -m launch.benchmark_data [--images 256] [--batch 64] [--steps 12]
                                    [--workers 0,1,2] [--size 224] [--modes folder,tfds_jpeg] [--uint8]

Writes ImageNet-like JPEGs (500x375, ~110 KiB, photographic detail) as an image folder and as a tfds JPEG dataset,
then prints, per mode, images per CPU-second in process, images/s per worker count, and the input cores each
accelerator (or TPU host) needs at its target rate. See docs/data.md.
"""

import argparse
import json

from cratemae.data import throughput


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m launch.benchmark_data')
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=12)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--workers', default='0,1,2', help='comma list; 0 = in process')
    p.add_argument('--modes', default=','.join(throughput.MODES), help='comma list of folder, tfds_jpeg')
    p.add_argument('--uint8', action='store_true', help='batches as uint8 (normalised on the devices)')
    args = p.parse_args(argv)
    try:
        records = throughput.run(args.images, [m for m in args.modes.split(',') if m], args.size, args.batch,
                                 args.steps, [int(w) for w in args.workers.split(',') if w], uint8=args.uint8)
        for record in records:
            print(json.dumps(record), flush=True)
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
