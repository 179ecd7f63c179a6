"""The experiment registry: every entry builds, validates, and ablations change exactly what they declare."""

import ast
import os

import pytest

import experiments
from cratemae import checkpoint
from cratemae import models
from experiments import ablations
from experiments import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = list(ablations.entries())


@pytest.mark.parametrize('name', experiments.names())
def test_every_entry_builds_validates_and_is_described(name):
    config = experiments.get_config(name)
    models.validate_model_config(config.model)
    assert config.name == name
    assert experiments.describe(name)
    assert f'--config=experiments/registry.py:{name}' in registry._ENTRIES[name].__doc__ or name == 'crate_mae_mnist'
    for section in ('model', 'data', 'optim', 'train', 'checkpoint'):
        assert section in config


@pytest.mark.parametrize('name', ABLATIONS)
def test_ablation_differs_from_its_base_in_exactly_the_declared_keys(name):
    base_name, declared = registry.declared_overrides(name)
    base = checkpoint.flatten_config(experiments.get_config(base_name))
    entry = checkpoint.flatten_config(experiments.get_config(name))
    changed = {k for k in entry if entry[k] != base.get(k) and k != 'name'}
    assert changed == {f'model.{k}' for k, v in declared.items() if base[f'model.{k}'] != v}
    assert changed, f'{name} changes nothing'


def test_ablation_names_are_unique_and_cover_every_family():
    assert len(ABLATIONS) == len(set(ABLATIONS))
    for family in ('mask', 'lambda', 'eta', 'encoder', 'normpix', 'shape', 'decoder', 'vit'):
        assert any(n.startswith(f'mnist_ablate_{family}_') for n in ABLATIONS)
        assert any(n.startswith(f'ablate_{family}_') for n in ABLATIONS)


def test_same_budget_shapes_keep_the_parameter_count_within_five_percent():
    base = models.count_params(experiments.get_config('crate_mae_base').model)
    for name in ('ablate_shape_deep', 'ablate_shape_wide'):
        assert abs(models.count_params(experiments.get_config(name).model) / base - 1) < 0.05


def test_the_vit_ablation_at_base_is_the_papers_mae_baseline():
    assert models.count_params(experiments.get_config('ablate_vit_mae').model) == 143_790_336


def test_unknown_override_key_suggests_the_closest_one():
    config = experiments.get_config('crate_mae_test')
    with pytest.raises(AttributeError, match='Did you mean "width"'):
        config.model.widht = 3


def test_every_name_is_written_out_in_the_file_list_says_defines_it():
    for name in experiments.names():
        path, line = experiments.where(name).split(':')
        with open(os.path.join(REPO, path)) as f:
            assert name in f.read().splitlines()[int(line) - 1], name


def test_no_module_of_experiments_imports_the_registry_but_its_package():
    """base, ablations and downstream build configs; only registry.py (and __init__) import them: no cycle."""
    for file in ('base.py', 'ablations.py', 'downstream.py'):
        with open(os.path.join(REPO, 'experiments', file)) as f:
            tree = ast.parse(f.read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
        }
        assert not {'registry', 'experiments.registry'} & imported, (file, imported)


def test_list_grep_shows_where_each_match_is_defined(capsys):
    from launch import cli
    from launch import list as list_cli

    assert cli.run(list_cli.main, list_cli.FLAGS, ['--grep=mnist_ablate_mask_(25|90)']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ['name', 'mnist_ablate_mask_25', 'mnist_ablate_mask_90']
    assert lines[1].split()[2].startswith('experiments/ablations.py:')
    assert cli.run(list_cli.main, list_cli.FLAGS, ['--grep=nothing_matches_this']) == cli.EXIT_USAGE
