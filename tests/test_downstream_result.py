"""The result of docs/evaluation.md on the README's default job: its features beat a random encoder and match the pixels.

The default job (`crate_mae_mnist`) is run whole, by the README's command (`python -m launch.train`, in a subprocess
on one CPU device as a user runs it, not on the 8 fake devices of the test session). Its frozen mean patch token,
the same token of a random encoder of the same architecture, and the normalised pixels are each probed with the same
ridge and linear probes on the embedded MNIST digits (4,500 train / 500 held-out).

XLA:CPU's kernels, and so the float rounding of a 1,000-step run, differ between CPU kinds (AMD EPYC with AVX2, AMD
EPYC with AVX-512, Intel Xeon with AMX have all run this suite), so every threshold below compares against a baseline
probed in the same process and keeps a margin wider than the spread measured across those CPUs (the values are in
the comments). The claim that the full run's linear probe beats the pixels is measured over seeds in
docs/evaluation.md; here it is only bounded from below, since its margin is about the size of that spread.
"""

import json
import os
import subprocess
import sys

import pytest

from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.evaluate import probe

pytestmark = pytest.mark.slow  # runs the whole default job: minutes

LINEAR = probe.LinearProbeConfig()  # the launch.probe default: SGD momentum, blr 0.1, 90 epochs, batch 256


@pytest.fixture(scope='module')
def default_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('default_run')
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    command = [sys.executable, '-m', 'launch.train', f'--workdir={workdir}']
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(workdir), run.stderr


@pytest.fixture(scope='module')
def scores(default_run):
    workdir, _ = default_run
    pretrained = checkpoints.load(workdir)
    random = checkpoints.random_init(pretrained.model_config, seed=0)
    random.data_config = pretrained.data_config
    data_cfg, dataset, _ = features.probe_data_config(pretrained)

    def probe_all(ckpt, feature):
        tr, te = (
            features.split_features(ckpt, data_cfg, split, feature, dataset=dataset, use_cache=False)
            for split in (data_cfg.split_train, data_cfg.split_eval)
        )
        return {
            'ridge': probe.ridge_probe(tr.x, tr.y, te.x, te.y, tr.num_classes)['top1'],
            'linear': probe.linear_probe(tr.x, tr.y, te.x, te.y, tr.num_classes, LINEAR)['top1'],
        }

    return {
        'pretrained': probe_all(pretrained, 'mean'),
        'random': probe_all(random, 'mean'),
        'pixels': probe_all(pretrained, 'pixels'),
    }


def _held_out_losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        records = [json.loads(line) for line in f]
    return [r['eval/reconstruction_loss'] for r in records if 'eval/reconstruction_loss' in r]


def test_the_default_job_leaves_what_a_real_run_leaves(default_run):
    workdir, log = default_run
    assert os.listdir(os.path.join(workdir, 'checkpoints')), 'no checkpoint'
    assert os.listdir(os.path.join(workdir, 'tensorboard')), 'no TensorBoard events'
    assert any(name.startswith('recon') for name in os.listdir(os.path.join(workdir, 'images'))), 'no pictures'
    with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        keys = set().union(*(json.loads(line) for line in f))
    assert any(k.startswith('whitebox/') for k in keys), sorted(keys)  # the layer-wise white-box measures
    assert 'ETA' in log  # the progress line off a terminal


def test_held_out_loss_falls_at_every_evaluation(default_run):
    # Measured (AMD EPYC AVX2, 2026-12-07, docs/perf/default_run_seeds_2026-12-07.jsonl): 0.3303 / 0.3054 / 0.2749 /
    # 0.2674 with seed 0 and 0.3257 / 0.2678 / 0.2468 / 0.2420 with seed 1; the smallest drop, 0.0048, is the last.
    # Another CPU's rounding moves a run about as far as another seed does (the old default's 1,500-step loss was
    # 0.2409 on an AMD EPYC and 0.2392 on an Intel Xeon), and no seed has yet made a drop smaller than 0.0048.
    losses = _held_out_losses(default_run[0])
    assert len(losses) >= 3, losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


@pytest.mark.parametrize('method', ['ridge', 'linear'])
def test_pretrained_features_beat_a_random_encoder(scores, method):
    # Measured on an AMD EPYC with AVX2 (2026-12-07, the default job, seeds 0 and 1): pretrained ridge 0.854 / 0.866 and
    # linear 0.884 / 0.896 against a random encoder's ridge 0.672 / 0.682 and linear 0.736 / 0.708: margins of 0.15 to
    # 0.19. The old default's half run (step 750 of 1,500) gave ridge 0.862 / linear 0.894 against 0.672 / 0.736 on an
    # AVX2 EPYC (2026-12-06) and ridge 0.878-0.886 / linear 0.884-0.898 on an Intel Xeon (2026-11-30): the spread
    # across CPUs and seeds is about 0.02-0.03, a fifth of the margin. A random encoder fails this by construction.
    assert scores['pretrained'][method] >= scores['random'][method] + 0.10, scores


def test_pretrained_features_are_not_far_below_the_pixels(scores):
    # The pixels probe at ridge 0.844 / linear 0.880 on every CPU seen (AVX2 EPYC, Intel Xeon). The default job's linear
    # probe beat them by only 0.004 / 0.016 (seeds 0 / 1, AVX2 EPYC, 2026-12-07): inside the 0.02-0.03 spread above, so
    # "beats the pixels" is a claim of docs/evaluation.md over seeds, not of this test. What the test holds is the
    # bound a broken or untrained encoder fails (a random one probes at 0.71-0.74): within 0.03 of the pixels.
    assert scores['pretrained']['linear'] >= scores['pixels']['linear'] - 0.03, scores
