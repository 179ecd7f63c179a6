"""How much the training loop costs on top of its step: launch.train on prepared JPEG records vs launch.benchmark.

  JAX_PLATFORMS=cpu python tools/loop_vs_benchmark.py [--config=crate_mae_tiny] [--batch=16] [--steps=30]
      [--log_every=5] [--images=512] [--rounds=2] [--workdir=DIR] [--out=FILE]

Writes ImageNet-like JPEGs (about 500 x 375, photographic detail; ``cratemae.data.throughput``) as a prepared tfds
dataset (array_record, ``tfds:loop_jpegs``), then alternates, ``--rounds`` times:

- ``python -m launch.train --config=NAME`` on that dataset at ``--batch`` for ``--steps`` steps, its images/s read
  from the run's metrics.jsonl (every log interval after the first, which holds the compile);
- ``python -m launch.benchmark --config=NAME --batch=B``: the same jitted step on synthetic device-side images.

Both are the commands a user runs, in separate processes, so each gets the same start-up (the CPU re-execution of
cratemae/platform.py included). Prints one JSON line per round and a summary line with the ratio of the medians
(the target of the input-pipeline issue: at least 0.95).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from cratemae.data import tfds_writer  # noqa: E402
from cratemae.data import throughput  # noqa: E402

_DATASET = 'loop_jpegs'


def write_records(data_dir, images):
    jpegs = throughput.imagenet_like_jpegs(images)
    held_out = max(images // 8, 1)
    tfds_writer.write_dataset(
        data_dir,
        _DATASET,
        {'train': jpegs[:-held_out], 'validation': jpegs[-held_out:]},
        num_classes=1 + max(label for _, label in jpegs),
    )


def run_train(args, data_dir, workdir):
    cmd = [
        sys.executable,
        '-m',
        'launch.train',
        f'--config={args.config}',
        f'--workdir={workdir}',
        f'--config.data.name=tfds:{_DATASET}',
        f'--config.data.data_dir={data_dir}',
        f'--config.train.global_batch={args.batch}',
        f'--config.train.eval_batch={args.batch}',
        f'--config.train.steps={args.steps}',
        f'--config.train.log_every={args.log_every}',
        f'--config.train.eval_every={args.steps}',
        '--config.train.eval_batches=1',
        f'--config.checkpoint.every={args.steps}',
    ]
    subprocess.run(cmd, cwd=_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rates = []
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            record = json.loads(line)
            if 'img_per_s' in record:
                rates.append(record['img_per_s'])
    return rates[1:], cmd


def run_benchmark(args):
    cmd = [
        sys.executable,
        '-m',
        'launch.benchmark',
        f'--config={args.config}',
        f'--batch={args.batch}',
        f'--steps={args.benchmark_steps}',
        '--warmup=1',
    ]
    out = subprocess.run(cmd, cwd=_ROOT, check=True, capture_output=True, text=True).stdout
    record = json.loads([line for line in out.splitlines() if line.startswith('{')][-1])
    return record, cmd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='crate_mae_tiny')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--log_every', type=int, default=5)
    parser.add_argument('--benchmark_steps', type=int, default=10)
    parser.add_argument('--images', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--workdir', default=None, help='default: a temporary directory, removed afterwards')
    parser.add_argument('--out', default=None, help='append the JSON lines to this file')
    args = parser.parse_args()
    if args.steps < 3 * args.log_every:
        parser.error(
            f'--steps={args.steps} must be at least 3 x --log_every={args.log_every}: the first interval '
            'holds the compile and is dropped.'
        )

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        data_dir = os.path.join(root, 'tfds')
        write_records(data_dir, args.images)
        lines, train_all, bench_all = [], [], []
        for r in range(args.rounds):
            rates, train_cmd = run_train(args, data_dir, os.path.join(root, f'train_{r}'))
            bench, bench_cmd = run_benchmark(args)
            train_all += rates
            bench_all.append(bench['images_per_s'])
            lines.append(
                {
                    'round': r,
                    'train_images_per_s': rates,
                    'benchmark_images_per_s': bench['images_per_s'],
                    'benchmark_ms_per_step': bench['ms_per_step'],
                    'load_average': [round(x, 2) for x in os.getloadavg()],
                }
            )
        summary = {
            'tool': 'loop_vs_benchmark',
            'config': args.config,
            'batch': args.batch,
            'train_images_per_s_median': statistics.median(train_all),
            'benchmark_images_per_s_median': statistics.median(bench_all),
            'ratio': statistics.median(train_all) / statistics.median(bench_all),
            'train_command': ' '.join(train_cmd[1:]),
            'benchmark_command': ' '.join(bench_cmd[1:]),
            'images': args.images,
            'device_kind': bench.get('device_kind'),
            'jax': bench.get('jax'),
            'cpu_count': os.cpu_count(),
            'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        }
        lines.append(summary)
        for line in lines:
            print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                for line in lines:
                    f.write(json.dumps(line) + '\n')


if __name__ == '__main__':
    main()
