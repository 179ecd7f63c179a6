"""Export, import, features, the probe CLI and fine-tuning, from a tiny training workdir (crate_mae_test, 2 steps)."""

import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import experiments
from cratemae import data
from cratemae import export
from cratemae import models
from cratemae import train
from cratemae.evaluate import checkpoints
from cratemae.evaluate import features
from cratemae.train import engine
from cratemae.train import finetune
from experiments import base
from experiments import downstream
from launch import cli
from launch import probe as probe_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A real training workdir: crate_mae_test trained for 2 steps through the training loop."""
    path = tmp_path_factory.mktemp('pretrain')
    config = experiments.get_config('crate_mae_test')
    config.train.update(steps=2, eval_every=2, log_every=2)
    config.checkpoint.update(every=2, async_save=False)
    train.train_and_evaluate(config, str(path))
    return path


@pytest.fixture(scope='module')
def test_split():
    """The 500 embedded MNIST test digits, as the probe reads them."""
    cfg = data.default_data_config()
    cfg.update(image_size=28, augment='none')
    return cfg


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # the real command in a subprocess
def test_export_cli_round_trip(workdir, tmp_path):
    out = tmp_path / 'encoder.safetensors'
    cmd = [
        sys.executable,
        '-m',
        'launch.export',
        f'--workdir={workdir}',
        '--format=safetensors',
        f'--out={out}',
        '--encoder_only',
    ]
    result = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS='cpu')
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'step 2' in result.stdout
    state_dict, metadata = export.load_state_dict(out)
    assert 'decoder_pred.weight' not in state_dict and 'blocks.1.layers.0.1.fn.weight' in state_dict
    assert export.model_config_from_metadata(metadata).width == 32 and json.loads(metadata['step']) == 2
    reference = checkpoints.load(workdir, encoder_only=False)
    _equal(checkpoints.load(out).params, models.encoder_params(reference.params))
    for fmt, name in (('npz', 'model.npz'), ('orbax', 'params')):  # full models, through the library
        loaded = checkpoints.load(export.export_checkpoint(reference, fmt, tmp_path / name), encoder_only=False)
        _equal(loaded.params, reference.params)
        assert loaded.step == 2 and loaded.data_config.name == 'mnist'


def test_features_identical_from_workdir_export_and_reference_file(workdir, tmp_path, test_split):
    ckpt = checkpoints.load(workdir)
    orbax_dir = export.export_checkpoint(ckpt, 'orbax', tmp_path / 'orbax', encoder_only=True)
    bare = tmp_path / 'reference.safetensors'  # the reference layout without our metadata
    export.save_safetensors(bare, export.to_reference_state_dict(ckpt.params, ckpt.model_config, encoder_only=True))
    sources = [ckpt, checkpoints.load(orbax_dir), checkpoints.load(bare, model_config=ckpt.model_config)]
    feats = [features.split_features(s, test_split, 'test', 'mean', use_cache=False) for s in sources]
    assert feats[0].x.shape == (500, 32) and feats[0].num_classes == 10
    for f in feats[1:]:
        np.testing.assert_array_equal(f.x, feats[0].x)
        np.testing.assert_array_equal(f.y, feats[0].y)


@pytest.mark.parametrize('feature', ['pixels', 'mean'])
def test_features_of_uint8_batches_equal_those_of_host_normalised_batches(workdir, test_split, feature):
    """split_features reads uint8 batches and normalises them on the devices; the features equal those of the
    float32 host-normalised pipeline within float32 rounding (and 'pixels' is the normalised image itself)."""
    ckpt = checkpoints.load(workdir)
    mesh = features.sharding.make_mesh()
    pipes = [
        data.make_pipeline(test_split, split='test', global_batch=64, seed=0, train=False, uint8=u8)
        for u8 in (False, True)
    ]
    (x_host, y_host), (x_dev, y_dev) = (
        features.extract(ckpt.model_config, ckpt.params, p, feature, mesh) for p in pipes
    )
    np.testing.assert_array_equal(y_dev, y_host)
    np.testing.assert_allclose(x_dev, x_host, rtol=1e-5, atol=1e-5)
    if feature == 'pixels':
        u8 = np.concatenate([pipes[1].batch(i)['image'] for i in range(pipes[1].num_batches)])[: len(x_dev)]
        ref = (u8 / 255.0 - np.array(pipes[1].info.mean)) / np.array(pipes[1].info.std)
        np.testing.assert_allclose(x_dev, ref.reshape(len(ref), -1), rtol=1e-6, atol=1e-5)


def test_second_probe_reads_cached_features(workdir, tmp_path, test_split, monkeypatch):
    calls = []
    real = features.extract
    monkeypatch.setattr(features, 'extract', lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    ckpt = checkpoints.load(workdir)
    first = features.split_features(ckpt, test_split, 'test', 'cls', cache_dir=tmp_path)
    second = features.split_features(ckpt, test_split, 'test', 'cls', cache_dir=tmp_path)
    assert calls == ['cls'] and not first.cached and second.cached
    np.testing.assert_array_equal(first.x, second.x)
    features.split_features(ckpt, test_split, 'test', 'mean', cache_dir=tmp_path)  # another feature type: a miss
    features.split_features(checkpoints.random_init(ckpt.model_config), test_split, 'test', 'cls', cache_dir=tmp_path)
    assert calls == ['cls', 'mean', 'cls']


def test_probe_cli_writes_results_and_table(workdir, tmp_path, capsys):
    args = [f'--checkpoint={workdir}', f'--out={tmp_path}', f'--cache_dir={tmp_path / "cache"}', '--methods=ridge,knn']
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args) == 0
    record = json.loads((tmp_path / 'probe_mnist_cls.json').read_text())
    assert record['step'] == 2 and record['num_train'] == 4500 and record['num_test'] == 500
    assert set(record['results']) == {'ridge', 'knn'} and 0.0 <= record['results']['knn']['top1'] <= 1.0
    assert 'ridge' in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# Errors name the problem.


def test_checkpoint_errors(workdir, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match='not found'):
        checkpoints.load(tmp_path / 'nothing.safetensors')
    ckpt = checkpoints.load(workdir)
    good = export.export_checkpoint(ckpt, 'safetensors', tmp_path / 'enc.safetensors', encoder_only=True)
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes(pathlib.Path(good).read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match='truncated or corrupt'):
        checkpoints.load(truncated)
    bare = tmp_path / 'bare.npz'
    export.save_npz(bare, export.load_state_dict(good)[0])
    with pytest.raises(checkpoints.CheckpointError, match='--config=experiments/registry.py:NAME'):
        checkpoints.load(bare)
    with pytest.raises(checkpoints.CheckpointError, match=r'Mismatched shapes.*patch_embed\.proj\.weight'):
        checkpoints.load(bare, model_config=experiments.get_config('crate_mae_mnist').model)
    with pytest.raises(checkpoints.CheckpointError, match=r'model\.width: file enc.safetensors 32, config 128'):
        checkpoints.load(good, model_config=experiments.get_config('crate_mae_mnist').model)
    with pytest.raises(checkpoints.CheckpointError, match=r'no step 7; saved steps: \[2\]'):
        checkpoints.load(workdir, step=7)
    orbax_dir = export.export_checkpoint(ckpt, 'orbax', tmp_path / 'orbax', encoder_only=True)
    os.remove(f'{orbax_dir}.json')  # a bare params directory: the architecture must be named
    with pytest.raises(checkpoints.CheckpointError, match='pass --config'):
        checkpoints.load(orbax_dir)
    with pytest.raises(checkpoints.CheckpointError, match=r'Mismatched shapes.*encoder/layers/ista/dictionary'):
        checkpoints.load(orbax_dir, model_config=experiments.get_config('crate_mae_mnist').model)
    unfinished = tmp_path / 'unfinished'
    (unfinished / 'checkpoints' / '2.orbax-checkpoint-tmp').mkdir(parents=True)
    shutil.copy(workdir / 'config.json', unfinished / 'config.json')
    with pytest.raises(checkpoints.CheckpointError, match='no finished checkpoint'):
        checkpoints.load(unfinished)


def test_probe_refuses_unlabelled_and_unprepared_datasets(workdir, tmp_path, capsys):
    folder = tmp_path / 'flat'
    folder.mkdir()
    from PIL import Image  # pylint: disable=import-outside-toplevel

    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / f'{i}.png')
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(folder), image_size=28, augment='none')
    with pytest.raises(ValueError, match='no labels'):
        features.split_features(checkpoints.load(workdir), cfg, 'train', 'cls', use_cache=False)
    assert (
        cli.run(
            probe_cli.main,
            probe_cli.FLAGS,
            [f'--checkpoint={workdir}', '--dataset=cifar10', f'--data_dir={tmp_path}', f'--cache_dir={tmp_path}'],
        )
        == 2
    )
    assert 'launch.prepare_data cifar10' in capsys.readouterr().err


def test_probe_splits_of_a_train_validation_folder_are_found_and_checked(workdir, tmp_path, capsys):
    """The reported bug: DIR/train/<class>/ + DIR/validation/<class>/ evaluated on the training images."""
    import dataclasses  # pylint: disable=import-outside-toplevel

    from PIL import Image  # pylint: disable=import-outside-toplevel

    for split in ('train', 'validation'):
        for cls in ('a', 'b'):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((28, 28), 30 * i + (100 if cls == 'b' else 0), np.uint8)).save(
                    tmp_path / split / cls / f'{i}.png'
                )
    cfg = data.default_data_config()
    cfg.update(name='image_folder', folder=str(tmp_path), image_size=28, channels=1)
    ckpt = dataclasses.replace(checkpoints.load(workdir), data_config=cfg)
    probe_cfg, dataset, _ = features.probe_data_config(ckpt)
    assert (probe_cfg.split_train, probe_cfg.split_eval) == ('train', 'validation')
    test = features.split_features(ckpt, probe_cfg, probe_cfg.split_eval, 'cls', dataset=dataset, use_cache=False)
    assert len(test.y) == 6 and test.num_classes == 2  # a, b: not train / validation
    with pytest.raises(ValueError, match="no split folder 'test'.*split_eval"):
        features.probe_data_config(ckpt, split_eval='test')
    assert (
        cli.run(
            probe_cli.main, probe_cli.FLAGS, [f'--checkpoint={workdir}', '--split_eval=nope', f'--cache_dir={tmp_path}']
        )
        == 2
    )
    assert "split_eval='nope': mnist has splits" in capsys.readouterr().err


def test_finetune_split_flags_are_checked_before_anything_is_built():
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'launch.finetune',
            '--config=experiments/registry.py:finetune_mnist',
            '--split_eval=nope',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "mnist has no split 'nope'" in proc.stderr and '--config.data.split_eval' in proc.stderr


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning.


def _finetune_config(checkpoint, **model):
    config = downstream.finetune_config(
        base.crate_mae_test(), 'mnist', ('train', 'test'), 4500, epochs=1, batch=16, image_size=28
    )
    config.model.update(model)
    config.data.update(crop_scale=(0.6, 1.0), hflip=False)
    config.optim.base_lr = 1e-3
    config.train.update(steps=4, log_every=2, eval_every=4, eval_batch=64)
    config.checkpoint.update(every=2, async_save=False)
    config.finetune.update(checkpoint=str(checkpoint))
    return config


@pytest.fixture(scope='module')
def finetuned(workdir, tmp_path_factory):
    """The uninterrupted 4-step fine-tuning run (checkpoints at steps 2 and 4) that interrupted ones must match."""
    out = tmp_path_factory.mktemp('finetuned')
    return out, finetune.finetune_and_evaluate(_finetune_config(workdir), str(out))


def _saved_state(workdir, step):
    manager = ocp.CheckpointManager(pathlib.Path(workdir) / 'checkpoints')
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    finally:
        manager.close()


def test_finetune_trains_evaluates_and_resumes(workdir, finetuned):
    out, result = finetuned
    assert 0.0 <= result['eval/top1'] <= 1.0 and np.isfinite(result['loss'])
    saved = json.loads((out / finetune.RESULTS_FILE).read_text())
    assert saved['top1'] == result['eval/top1'] and saved['step'] == 4
    again = finetune.finetune_and_evaluate(_finetune_config(workdir), str(out))  # resumes at the final step
    assert again['eval/top1'] == pytest.approx(result['eval/top1'])


_KILLED_CHILD = """
import pickle, sys
sys.path[:0] = ['.', 'tests']
import faults
from cratemae.train import finetune
faults.kill_at_step(3)
with open(sys.argv[1], 'rb') as f:
    config = pickle.load(f)
finetune.finetune_and_evaluate(config, sys.argv[2])
"""


@pytest.mark.slow  # a fine-tuning process killed in a subprocess
def test_finetune_resumes_bit_exactly_after_sigkill(workdir, finetuned, tmp_path):
    config_file, out = tmp_path / 'config.pkl', tmp_path / 'killed'
    config_file.write_bytes(pickle.dumps(_finetune_config(workdir)))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR='/tmp/cratemae_jax_cache')  # 8 CPU devices, as here
    killed = subprocess.run(
        [sys.executable, '-c', _KILLED_CHILD, str(config_file), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(int(p.name) for p in (out / 'checkpoints').iterdir() if p.name.isdigit()) == [2]
    resumed = finetune.finetune_and_evaluate(_finetune_config(workdir), str(out))
    assert resumed['eval/top1'] == finetuned[1]['eval/top1']
    jax.tree.map(np.testing.assert_array_equal, _saved_state(out, 4), _saved_state(finetuned[0], 4))


def test_finetune_saves_on_sigterm_and_exits(workdir, tmp_path, monkeypatch):
    def terminate(step, _):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the engine's handler turns it into a flag; no exception here

    monkeypatch.setattr(engine, 'STEP_HOOKS', [terminate])
    before = signal.getsignal(signal.SIGTERM)
    result = finetune.finetune_and_evaluate(_finetune_config(workdir), str(tmp_path))
    assert result['step'] == 1 and 'eval/top1' not in result  # stopped after step 1 of 4, before any evaluation
    assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == [1]
    assert signal.getsignal(signal.SIGTERM) == before  # the engine's handler is removed again


def test_finetune_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir, tmp_path, monkeypatch):
    real = engine.sharding.host_local_to_global
    calls = {'train': 0}

    def poisoned(batch, mesh):
        if 'valid' not in batch:  # a train batch
            calls['train'] += 1
            if calls['train'] == 3:  # the batch of step index 2
                batch = dict(batch, image=np.full(batch['image'].shape, np.nan, np.float32))  # uint8 holds no NaN
        return real(batch, mesh)

    monkeypatch.setattr(engine.sharding, 'host_local_to_global', poisoned)
    with pytest.raises(train.NonFiniteLossError, match='at step 2'):
        finetune.finetune_and_evaluate(_finetune_config(workdir), str(tmp_path))
    assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == [2]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(_saved_state(tmp_path, 2)['params']))


def test_finetune_reads_the_device_only_at_log_and_checkpoint_steps(workdir, tmp_path, monkeypatch):
    """The forked fine-tuning loop called save() every step, which read the NaN flag from the device (a blocking
    host sync) inside the throughput's excluded time. The engine reads at log steps and saves at checkpoint steps."""
    counts = {'device_get': 0, 'save': 0}
    real_get, real_save = engine.jax.device_get, engine.checkpoint.Checkpointer.save

    def device_get(x):
        counts['device_get'] += sys._getframe(1).f_globals['__name__'] == engine.__name__  # the engine's own reads
        return real_get(x)

    def save(self, *args, **kwargs):
        counts['save'] += 1
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(engine.jax, 'device_get', device_get)
    monkeypatch.setattr(engine.checkpoint.Checkpointer, 'save', save)
    config = _finetune_config(workdir)
    config.train.update(steps=6, log_every=3, eval_every=6)
    config.checkpoint.update(every=6)
    finetune.finetune_and_evaluate(config, str(tmp_path))
    assert counts == {'device_get': 2, 'save': 1}  # log steps 3 and 6; the checkpoint at step 6


def test_finetune_rejects_another_architecture(workdir, tmp_path):
    config = _finetune_config(workdir, width=64, decoder_width=64)
    with pytest.raises(checkpoints.CheckpointError, match=r'model\.width: workdir .* 32, config 64'):
        finetune.finetune_and_evaluate(config, str(tmp_path / 'ft'))


def test_stored_model_configs_of_other_versions_load():
    stored = experiments.get_config('crate_mae_test').model.to_dict()
    del stored['attention']  # written before the key existed: takes today's default
    stored['future_key'] = 1  # written by a newer version: dropped
    cfg = checkpoints.normalize_model_config(stored)
    assert cfg.attention == 'einsum' and 'future_key' not in cfg and cfg.width == 32
