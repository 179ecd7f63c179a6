"""launch/cli.py: the one command-line convention (flag spelling, --config names, usage errors, `python -m launch`)."""

import os
import subprocess
import sys

import pytest
from absl import flags

from launch import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags():
    fv = cli.flag_values()
    config = cli.define_config(fv, 'crate_mae_test')
    flags.DEFINE_bool('dry_run', False, 'x', flag_values=fv)
    flags.DEFINE_string('out', None, 'x', flag_values=fv)
    return fv, config


def test_dashes_and_underscores_are_the_same_flag_and_config_paths_are_untouched():
    assert cli.normalize(
        ['--dry-run', '--no-cache', '-x-y', '--out=a-b', '--config.model.mask_ratio=0.5', 'pos-1']
    ) == ['--dry_run', '--no_cache', '-x_y', '--out=a-b', '--config.model.mask_ratio=0.5', 'pos-1']
    fv, _ = _flags()
    assert cli.parse(fv, ['prog', 'run', '--dry-run', '--out', 'x-y']) == ['prog', 'run']
    assert fv.dry_run and fv.out == 'x-y'


def test_a_bare_registry_name_and_a_relative_file_from_elsewhere_both_name_the_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry = os.path.join(REPO, 'experiments', 'registry.py')
    assert cli.config_spec('crate_mae_tiny') == f'{registry}:crate_mae_tiny'
    assert cli.config_spec('experiments/registry.py:crate_mae_tiny') == f'{registry}:crate_mae_tiny'
    assert cli.normalize(['--config', 'crate_mae_tiny']) == [f'--config={registry}:crate_mae_tiny']
    for spec in ('crate_mae_tiny', 'experiments/registry.py:crate_mae_tiny', f'{registry}:crate_mae_tiny'):
        fv, config = _flags()
        cli.parse(fv, ['prog', f'--config={spec}', '--config.train.steps=7'])
        assert config.value.name == 'crate_mae_tiny' and config.value.train.steps == 7


def test_usage_errors_exit_2_with_the_message(capsys):
    fv, config = _flags()

    def main(argv):
        cli.no_positional(argv)
        return 0

    assert cli.run(main, fv, ['--config=crate_mae_test']) == 0
    assert cli.run(main, fv, ['--config=no_such_experiment']) == cli.EXIT_USAGE
    assert 'Unknown experiment' in capsys.readouterr().err
    assert cli.run(main, fv, ['--config.model.widht=3']) == cli.EXIT_USAGE
    assert 'widht' in capsys.readouterr().err
    assert cli.run(main, fv, ['--no_such_flag']) == cli.EXIT_USAGE
    assert 'no_such_flag' in capsys.readouterr().err
    assert cli.run(main, fv, ['stray']) == cli.EXIT_USAGE
    assert "unexpected arguments ['stray']" in capsys.readouterr().err
    # A second parse starts from the defaults, not from the previous command line.
    assert cli.run(main, fv, ['--dry_run']) == 0 and fv.dry_run
    assert cli.run(main, fv, []) == 0 and not fv.dry_run and config.value.train.steps == 20


def test_python_m_launch_lists_every_command_once():
    out = subprocess.run([sys.executable, '-m', 'launch'], cwd=REPO, capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.startswith('  ')]
    modules = sorted(
        f[:-3]
        for f in os.listdir(os.path.join(REPO, 'launch'))
        if f.endswith('.py') and f not in ('__init__.py', '__main__.py', 'cli.py')
    )
    assert sorted(names) == modules


def test_every_command_parses_with_absl_on_its_own_flags_and_has_help():
    """The convention holds for each launcher: its own FlagValues with --help, a main, no argparse."""
    import importlib

    for name in (
        'aot_compile',
        'benchmark',
        'benchmark_data',
        'export',
        'finetune',
        'inspect',
        'list',
        'prepare_data',
        'probe',
        'slurm',
        'sweep',
        'tpu_pod',
        'train',
    ):
        module = importlib.import_module(f'launch.{name}')
        with open(module.__file__) as f:
            assert 'argparse' not in f.read(), name
        assert isinstance(module.FLAGS, flags.FlagValues) and 'help' in module.FLAGS and callable(module.main), name
