"""launch.inspect on a tiny saved run and on exports: pictures, numbers, and the messages for bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import experiments
from cratemae import checkpoint
from cratemae import diagnostics
from cratemae import export
from cratemae import inspection
from cratemae import models
from cratemae.evaluate import checkpoints
from cratemae.train import optimizer
from cratemae.train import step as step_lib
from launch import cli
from launch import inspect as inspect_cli

_COMMON = ['--images', '2', '--batch', '8', '--mask-ratios', '0.5,0.75']


def _inspect(argv):
    return cli.run(inspect_cli.main, inspect_cli.FLAGS, argv)


def _summary(out):
    with open(os.path.join(out, 'whitebox.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A crate_mae_test workdir with steps 0 and 5 (step 5: perturbed weights), as the training loop saves them."""
    config = experiments.get_config('crate_mae_test')
    workdir = str(tmp_path_factory.mktemp('run'))
    checkpoint.save_config(workdir, config)
    model = models.build(config.model)
    tx = optimizer.make_optimizer(config.optim, config.train.global_batch, config.train.steps)
    state = jax.jit(lambda x: step_lib.create_state(model, tx, x, config.seed))(jnp.zeros((1, 28, 28, 1)))
    ckpt = checkpoint.Checkpointer(workdir, every=1, max_to_keep=None, async_save=False)
    ckpt.save(0, state)
    perturbed = jax.tree.map(lambda p: p * 1.5, state.params)
    ckpt.save(5, state.replace(step=jnp.int32(5), params=perturbed))
    ckpt.close()
    return workdir, config, state.params, perturbed


def test_inspect_workdir_all_steps(run, tmp_path):
    workdir, config, _, perturbed = run
    out = str(tmp_path / 'out')
    argv = ['--checkpoint', workdir, '--out', out, '--all-steps', '--random-init', '--image-ids', '3,1', '--paper']
    assert _inspect(argv + _COMMON) == 0
    summary = _summary(out)
    expected = [
        'layerwise.png',
        'mssa_ista.png',
        'mssa_ista_paper.png',
        'sparsity_inversion.png',
        'attention_layers.png',
        'attention_heads.png',
        'pca.png',
        'pca_reference.png',
        'reconstructions.png',
    ]
    assert summary['files'] == expected
    for name in expected:
        assert 0 < os.path.getsize(os.path.join(out, name)) < 150_000, name
    labels = [r['label'] for r in summary['runs']]
    assert labels[0] == f'random init (seed {config.seed})' and labels[1:] == [
        f'{os.path.basename(workdir)} step {s}' for s in (0, 5)
    ]
    # The random init is the one library function's, with the run's seed.
    init = summary['runs'][0]['measures']
    model = models.build(config.model)
    params = checkpoints.random_init(config.model, config.seed, encoder_only=False).params
    images = inspection.load_images(inspection.Options(workdir, out, batch=8), inspection.load(workdir)[0], [])[0]
    want = diagnostics.whitebox_measures(model, params, images, paper=True)
    for key in ('compression_input', 'mssa_effect', 'ista_effect', 'compression_paper_output', 'sparsity_l0'):
        np.testing.assert_allclose(init[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert len(init['inversion_error']) == 2 and summary['pictures_from'].endswith('step 5')
    # The restored step-5 params are the saved ones.
    loaded = inspection.load(os.path.join(workdir, 'checkpoints', '5'))[0]
    np.testing.assert_allclose(loaded.params['cls_token'], perturbed['cls_token'])
    assert checkpoint.saved_steps(workdir) == [0, 5]


def test_bad_layer_and_head_name_the_valid_range(run, tmp_path, capsys):
    workdir = run[0]
    assert _inspect(['--checkpoint', workdir, '--out', str(tmp_path), '--layers', '0,2']) == 2
    assert 'valid 0..1' in capsys.readouterr().err
    assert _inspect(['--checkpoint', workdir, '--out', str(tmp_path), '--heads', '7']) == 2
    assert '2 heads (valid 0..1)' in capsys.readouterr().err
    assert _inspect(['--checkpoint', workdir, '--out', str(tmp_path), '--step', '3']) == 2
    assert 'saved steps: [0, 5]' in capsys.readouterr().err
    assert _inspect(['--checkpoint', workdir, '--out', str(tmp_path), '--image-ids', '0,999']) == 2
    assert 'valid 0..' in capsys.readouterr().err
    assert _inspect(['--checkpoint', workdir, '--out', str(tmp_path), '--mask_ratios', '0.5,x']) == 2
    assert '--mask_ratios must be comma-separated numbers' in capsys.readouterr().err
    assert _inspect(['--checkpoint', workdir]) == 2
    assert '--checkpoint and --out are required' in capsys.readouterr().err


def test_encoder_only_export_and_a_wrong_size_image(run, tmp_path, capsys):
    _, config, params, _ = run
    path = str(tmp_path / 'encoder.npz')
    state_dict = export.to_reference_state_dict(params, config.model, encoder_only=True)
    export.save_npz(path, state_dict, export.make_metadata(config.model))
    picture = str(tmp_path / 'digit.png')
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)).save(picture)
    out = str(tmp_path / 'out')
    argv = [
        '--checkpoint',
        path,
        '--out',
        out,
        '--image-files',
        picture,
        '--layers',
        '1',
        '--heads',
        '0,mean',
        '--pca',
        'reference',
    ]
    assert _inspect(argv + _COMMON) == 0
    printed = capsys.readouterr().out
    assert (
        'skipped reconstructions.png' in printed
        and '30x40, centre crop 1 of the short side resized to the model input 28x28' in printed
    )
    summary = _summary(out)
    assert 'reconstructions.png' not in summary['files'] and 'inversion_error' not in summary['runs'][0]['measures']
    assert 'pca_reference.png' in summary['files'] and 'pca.png' not in summary['files']
    assert 'mnist' in ' '.join(summary['notes'])  # no training config: the dataset was chosen and said so


def test_multi_word_flags_take_either_spelling():
    parsed = []
    for argv in (
        ['--checkpoint=c', '--out=o', '--random-init', '--mask-ratios=0.5', '--all-steps', '--image-ids=3'],
        ['--checkpoint=c', '--out=o', '--random_init', '--mask_ratios=0.5', '--all_steps', '--image_ids=3'],
    ):
        cli.parse(inspect_cli.FLAGS, ['prog'] + argv)
        parsed.append(inspect_cli.options())
    assert parsed[0] == parsed[1] and parsed[0].random_init and parsed[0].mask_ratios == (0.5,)
    assert parsed[0].image_ids == (3,)


def test_workdir_and_step_of_local_and_remote_paths():
    assert inspection.workdir_and_step('gs://bucket/run/checkpoints/250') == ('gs://bucket/run', 250)
    assert inspection.workdir_and_step('gs://bucket/run/') == ('gs://bucket/run', None)
    assert inspection.workdir_and_step('/a/run/checkpoints/7') == ('/a/run', 7)


def test_split_eval_flag_names_the_split_the_images_come_from():
    for flag in ('--split_eval', '--split-eval', '--split'):
        cli.parse(inspect_cli.FLAGS, ['inspect', '--checkpoint=x', '--out=y', f'{flag}=validation'])
        assert inspect_cli.FLAGS.split_eval == 'validation'
        inspect_cli.FLAGS.unparse_flags()
