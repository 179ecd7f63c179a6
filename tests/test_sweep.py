"""launch.sweep: which entries a pattern runs, the overrides it applies, the tables it writes, one real run."""

import csv
import json

import pytest

from cratemae.evaluate import ablation
from experiments import sweeps
from launch import cli
from launch import sweep


def test_a_family_pattern_runs_its_base_first():
    names = sweeps.sweep_names('mnist_ablate_mask_*')
    assert names[0] == 'crate_mae_mnist_rawpix'
    assert set(names[1:]) == {'mnist_ablate_mask_25', 'mnist_ablate_mask_50', 'mnist_ablate_mask_90'}
    assert 'crate_mae_mnist_rawpix' not in sweeps.sweep_names('mnist_ablate_mask_*', include_base=False)


def test_unknown_pattern_says_how_to_list_names(capsys):
    assert cli.run(sweep.main, sweep.FLAGS, ['--names=no_such_family_*']) == cli.EXIT_USAGE
    assert 'launch.list' in capsys.readouterr().err


def test_sweep_config_shortens_the_schedule():
    config = sweeps.sweep_config('mnist_ablate_lambda_5', steps=7, dataset='skimage_crops')
    assert (config.train.steps, config.train.eval_every, config.checkpoint.every) == (7, 7, 7)
    assert config.data.name == 'skimage_crops' and config.model.ista_lambda == 5.0


@pytest.mark.slow  # trains, extracts features of 5,000 digits, probes
def test_end_to_end_on_one_entry_writes_the_tables(tmp_path):
    name = 'mnist_ablate_lambda_5'
    config = sweeps.sweep_config(name, steps=3)
    config.train.global_batch = 32
    from cratemae import train

    train.train_and_evaluate(config, str(tmp_path / name))
    row = sweeps.row(name, config, str(tmp_path / name))
    assert row['changes'] == 'ista_lambda=5.0' and row['steps'] == 3
    assert 0.0 <= row['ridge'] <= 1.0 and 0.0 <= row['knn'] <= 1.0
    assert 0.0 <= row['sparsity'] <= 1.0 and row['compression'] > 0
    # The reconstruction column is the last eval row of metrics.jsonl, as that file holds it.
    with open(tmp_path / name / 'metrics.jsonl') as f:
        evals = [r['eval/reconstruction_loss'] for r in map(json.loads, f) if 'eval/reconstruction_loss' in r]
    assert row['reconstruction'] == pytest.approx(evals[-1]) and row['reconstruction'] > 0
    ablation.write_tables([row], str(tmp_path / 'table'))
    with open(tmp_path / 'table.csv') as f:
        assert next(csv.DictReader(f))['name'] == name
    assert (tmp_path / 'table.md').read_text().count('\n') == 3 and (tmp_path / 'table.png').stat().st_size > 0


def test_vit_entries_get_no_whitebox_measures_instead_of_an_error():
    import math

    import jax
    import jax.numpy as jnp

    import experiments
    from cratemae import models

    model = models.build(experiments.get_config('mnist_ablate_vit_mae').model)
    images = jnp.zeros((2, 28, 28, 1))
    params = jax.jit(lambda x: model.init({'params': jax.random.key(0), 'masking': jax.random.key(1)}, x))(images)
    compression, sparsity = ablation.last_layer_measures(model, params['params'], {'image': images, 'valid': None})
    assert math.isnan(compression) and math.isnan(sparsity)
