"""The default job measured whole: wall time of the README's command, its held-out losses, and what its features learned.

  python tools/default_run_report.py [--config=crate_mae_mnist] [--seeds=0,1] [--out=FILE] [--keep=DIR]
      [--no_baselines] [--probe_steps=600,900] [-- --config.KEY=VALUE ...]

For each seed, runs ``python -m launch.train --config=NAME --workdir=TMP --config.seed=S [overrides]`` in a subprocess
exactly as a user does (same start-up, compile, evaluations, pictures and checkpoints), timing its wall clock and
its children's CPU. Then probes the run's frozen mean patch token, the same token of a random encoder of the same
architecture, and the normalised pixels, with the linear (launch.probe's default recipe), ridge and kNN probes on the
config's train/eval splits. Prints one JSON line per seed (and appends it to ``--out``): wall and CPU seconds, the
held-out loss at every evaluation, whether it fell at each, the probes, the CPU model and the load average.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tools import machine  # noqa: E402


def train(config, seed, overrides, workdir):
    command = [
        sys.executable,
        '-m',
        'launch.train',
        f'--config={config}',
        f'--workdir={workdir}',
        f'--config.seed={seed}',
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PYTHONPATH')}
    env['PYTHONPATH'] = _ROOT
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f'{" ".join(command)} failed:\n{run.stderr[-3000:]}')
    return {
        'command': ' '.join(command[1:]),
        'wall_s': round(wall, 1),
        'user_s': round(after.ru_utime - before.ru_utime, 1),
        'sys_s': round(after.ru_stime - before.ru_stime, 1),
    }


def held_out_losses(workdir):
    losses = {}
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        for line in f:
            record = json.loads(line)
            if 'eval/reconstruction_loss' in record:
                losses[int(record['step'])] = round(float(record['eval/reconstruction_loss']), 4)
    return [losses[s] for s in sorted(losses)], sorted(losses)


def probes(workdir, seed, baselines=True, step=None, data_updates=None):
    """Probe scores of the run's mean patch token and, with `baselines` (True: both, or a tuple of names), of a
    'random' encoder's and of the 'pixels'; `data_updates` (e.g. {'folder': ...}) changes the probed data."""
    from cratemae import data
    from cratemae.evaluate import checkpoints
    from cratemae.evaluate import features
    from cratemae.evaluate import probe

    pretrained = checkpoints.load(workdir, step=step)
    random = checkpoints.random_init(pretrained.model_config, seed=seed)
    random.data_config = pretrained.data_config
    data_cfg, dataset, _ = features.probe_data_config(pretrained)
    if data_updates:
        data_cfg.update(data_updates)
        dataset = data.resolve(data_cfg)  # other data: resolved anew

    def probe_all(ckpt, feature):
        train_f, test_f = (
            features.split_features(ckpt, data_cfg, split, feature, dataset=dataset, use_cache=False)
            for split in (data_cfg.split_train, data_cfg.split_eval)
        )
        return {k: round(v['top1'], 4) for k, v in probe.run_probes(train_f, test_f).items()}

    scores = {'step': pretrained.step, 'pretrained': probe_all(pretrained, 'mean')}
    chosen = ('random', 'pixels') if baselines is True else baselines or ()
    if 'random' in chosen:
        scores['random'] = probe_all(random, 'mean')
    if 'pixels' in chosen:
        scores['pixels'] = probe_all(pretrained, 'pixels')
    return scores


def emit(record, out=None):
    """Prints `record` as one JSON line and appends it to the file `out`, if given."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, 'a', encoding='utf-8') as f:
            f.write(line + '\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='crate_mae_mnist')
    parser.add_argument('--seeds', default='0,1')
    parser.add_argument('--out', default=None)
    parser.add_argument('--keep', default=None, help='Keep the workdirs under this folder.')
    parser.add_argument('--no_baselines', action='store_true', help='Probe only the pretrained encoder.')
    parser.add_argument('--probe_steps', default='', help='Also probe these saved steps (e.g. 600,900).')
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != '--']
    for seed in (int(s) for s in args.seeds.split(',')):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = os.path.join(args.keep, f'{args.config}_seed{seed}') if args.keep else os.path.join(tmp, 'run')
            load_before = os.getloadavg()
            record = {'tool': 'default_run_report', 'date': datetime.datetime.now().isoformat(timespec='seconds')}
            record.update(config=args.config, seed=seed, overrides=overrides, cpu=machine.cpu_model(with_isa=True))
            record.update(train(args.config, seed, overrides, workdir))
            record['load_average_before_after'] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
            losses, steps = held_out_losses(workdir)
            record.update(eval_steps=steps, eval_loss=losses)
            record['eval_loss_falls_at_every_eval'] = all(b < a for a, b in zip(losses, losses[1:]))
            record['probes'] = probes(workdir, seed, baselines=not args.no_baselines)
            record['probes_earlier'] = [
                probes(workdir, seed, baselines=False, step=int(s)) for s in args.probe_steps.split(',') if s
            ]
            record['outputs'] = sorted(os.listdir(workdir))
        emit(record, args.out)


if __name__ == '__main__':
    main()
