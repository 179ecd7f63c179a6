"""PyTorch checkpoints as the reference's scripts write them: real files from torch.save, loaded or refused by name.

FAIR MAE's save_model writes {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}; a DDP model
saved as it is has 'module.'-prefixed keys; a fine-tuned classifier adds fc_norm and head. torch is in the test
extra, so none of this is skipped.
"""

import argparse
import json
import logging
import re
import sys

import numpy as np
import pytest
import torch

import experiments
from cratemae import export
from cratemae import ops
from cratemae.evaluate import checkpoints
from cratemae.train import finetune
from experiments import base
from experiments import downstream
from launch import cli
from launch import export as export_cli
from launch import probe as probe_cli


class Foreign:  # an object no allowlist knows: safe loading must refuse it
    def __init__(self, value):
        self.value = value


@pytest.fixture(scope='module')
def small():
    return experiments.get_config('crate_mae_test').model


def _reference_state_dict(cfg, seed=0, encoder_only=False):
    """Random tensors in the reference layout, as torch tensors (what model.state_dict() holds)."""
    rng = np.random.default_rng(seed)
    table = ops.sincos_pos_embed(cfg.width, cfg.image_size // cfg.patch_size)[None].astype(np.float32)
    return {
        k: torch.from_numpy(table if k.endswith('pos_embed') else rng.standard_normal(shape).astype(np.float32))
        for k, shape in export.reference_shapes(cfg, encoder_only).items()
    }


def _args(**kw):
    """The kind of Namespace FAIR MAE's main_pretrain parses (a few of its fields)."""
    fields = dict(
        batch_size=64,
        epochs=800,
        accum_iter=1,
        model='mae_crate_tiny',
        input_size=224,
        mask_ratio=0.75,
        norm_pix_loss=False,
        weight_decay=0.05,
        lr=None,
        blr=1.5e-4,
        min_lr=0.0,
        warmup_epochs=40,
        data_path='/datasets01/imagenet_full_size/061417/',
        output_dir='./output_dir',
        device='cuda',
        seed=0,
        resume='',
        start_epoch=0,
        num_workers=10,
        pin_mem=True,
        world_size=1,
        local_rank=-1,
        dist_on_itp=False,
        dist_url='env://',
        distributed=False,
    )
    fields.update(kw)
    return argparse.Namespace(**fields)


def _save_model_style(state_dict, path, epoch=7, **args):
    """What util/misc.py save_model writes: the weights plus a real AdamW state, a GradScaler state and the args."""
    params = [torch.nn.Parameter(v.clone()) for v in list(state_dict.values())[:3]]
    optimizer = torch.optim.AdamW(
        [{'params': params, 'weight_decay': 0.05, 'lr_scale': 1.0}], lr=1e-3, betas=(0.9, 0.95)
    )
    sum((p * p).sum() for p in params).backward()
    optimizer.step()
    scaler = torch.amp.GradScaler('cpu')
    torch.save(
        {
            'model': state_dict,
            'optimizer': optimizer.state_dict(),
            'epoch': epoch,
            'scaler': scaler.state_dict(),
            'args': _args(**args),
        },
        path,
    )
    return path


def _assert_params_equal(params, state_dict, cfg, encoder_only):
    back = export.to_reference_state_dict(params, cfg, encoder_only=encoder_only)
    for key, value in state_dict.items():
        if key in back and not key.endswith('pos_embed') and not key.startswith('decoder_embed.'):
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_fair_mae_save_model_file_loads(tmp_path, small, caplog):
    sd = _reference_state_dict(small)
    path = _save_model_style(sd, tmp_path / 'checkpoint-7.pth', model='mae_crate_test')
    with caplog.at_level(logging.INFO, logger='cratemae'):
        ckpt = checkpoints.load(path, model_config=small, encoder_only=False)
    _assert_params_equal(ckpt.params, sd, small, encoder_only=False)
    assert 'epoch 7' in caplog.text
    assert ckpt.source == 'torch'


def test_ddp_module_prefixed_file_loads(tmp_path, small):
    sd = _reference_state_dict(small, seed=1)
    path = _save_model_style({f'module.{k}': v for k, v in sd.items()}, tmp_path / 'ddp.pth')
    ckpt = checkpoints.load(path, model_config=small, encoder_only=True)
    _assert_params_equal(ckpt.params, sd, small, encoder_only=True)
    assert 'decoder' not in ckpt.params


def test_numpy_scalars_beside_the_weights_load(tmp_path, small):
    sd = _reference_state_dict(small)
    path = tmp_path / 'best.pth'
    torch.save({'state_dict': sd, 'epoch': torch.tensor(3), 'best_acc1': np.float64(71.5)}, path)
    state_dict, metadata = export.load_state_dict(path)
    assert metadata == {'epoch': '3'}
    np.testing.assert_array_equal(state_dict['cls_token'], sd['cls_token'].numpy())


def test_fine_tuned_file_loads_its_encoder_and_reports_the_head(tmp_path, small, caplog):
    sd = _reference_state_dict(small, seed=2, encoder_only=True)
    d = small.width
    classifier = {
        'fc_norm.weight': torch.ones(d),
        'fc_norm.bias': torch.zeros(d),
        'head.weight': torch.randn(10, d),
        'head.bias': torch.zeros(10),
    }
    path = _save_model_style({**sd, **classifier}, tmp_path / 'finetuned.pth')
    with caplog.at_level(logging.INFO, logger='cratemae'):
        ckpt = checkpoints.load(path, model_config=small, encoder_only=True)
    _assert_params_equal(ckpt.params, sd, small, encoder_only=True)
    report = [r.getMessage() for r in caplog.records if 'loaded' in r.getMessage()]
    assert len(report) == 1, caplog.text
    assert f'loaded {len(sd) - 1} tensors' in report[0]  # pos_embed is the fixed table, not loaded
    assert '4 classification head of a fine-tuned checkpoint' in report[0]
    assert 'fc_norm.weight' in report[0] and 'head.bias' in report[0]
    with pytest.raises(checkpoints.CheckpointError, match=r'Missing keys .*decoder_blocks'):
        checkpoints.load(path, model_config=small, encoder_only=False)
    # a classifier saved without the mask token (which encode() never reads) loads with a zero one
    no_mask = {k: v for k, v in {**sd, **classifier}.items() if k != 'mask_token'}
    _save_model_style(no_mask, tmp_path / 'no_mask_token.pth')
    with caplog.at_level(logging.INFO, logger='cratemae'):
        ckpt = checkpoints.load(tmp_path / 'no_mask_token.pth', model_config=small, encoder_only=True)
    assert not ckpt.params['mask_token'].any() and 'has no mask_token' in caplog.text
    _assert_params_equal(ckpt.params, {k: v for k, v in sd.items() if k != 'mask_token'}, small, encoder_only=True)
    # FAIR's --global_pool fine-tuning deletes the per-token final norm: no encoder to load, and the message says so
    global_pool = {k: v for k, v in {**sd, **classifier}.items() if not k.startswith('norm.')}
    _save_model_style(global_pool, tmp_path / 'global_pool.pth')
    with pytest.raises(checkpoints.CheckpointError, match='global pooling'):
        checkpoints.load(tmp_path / 'global_pool.pth', model_config=small)


def test_truncated_and_non_checkpoint_files(tmp_path, small):
    good = _save_model_style(_reference_state_dict(small), tmp_path / 'good.pth')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(checkpoints.CheckpointError, match='truncated PyTorch checkpoint.*Download or copy it again'):
        checkpoints.load(truncated, model_config=small)
    legacy = tmp_path / 'legacy.pth'  # torch's pre-1.6 format, a bare pickle stream
    torch.save({'model': _reference_state_dict(small)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[: len(legacy.read_bytes()) // 2])
    with pytest.raises(checkpoints.CheckpointError, match='truncated PyTorch checkpoint: the data ends early'):
        checkpoints.load(legacy, model_config=small)
    page = tmp_path / 'page.pth'
    page.write_text('<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>')
    with pytest.raises(checkpoints.CheckpointError, match='not a PyTorch checkpoint at all.*HTML page'):
        checkpoints.load(page, model_config=small)
    text = tmp_path / 'notes.pt'
    text.write_text('weights are on the shared drive')
    with pytest.raises(checkpoints.CheckpointError, match="not a PyTorch checkpoint at all.*b'weights are"):
        checkpoints.load(text, model_config=small)


def test_foreign_global_is_refused_by_name_unless_trusted(tmp_path, small):
    sd = _reference_state_dict(small)
    path = tmp_path / 'foreign.pth'
    torch.save({'model': sd, 'epoch': 1, 'logger': Foreign(3)}, path)
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load(path, model_config=small)
    message = str(err.value)
    assert f'{Foreign.__module__}.Foreign' in message
    assert '--trust_checkpoint' in message and 'weights_only' in message
    ckpt = checkpoints.load(path, model_config=small, encoder_only=False, trust_checkpoint=True)
    _assert_params_equal(ckpt.params, sd, small, encoder_only=False)


def test_missing_torch_names_the_converting_command(tmp_path, small, monkeypatch):
    path = _save_model_style(_reference_state_dict(small), tmp_path / 'crate_mae.pth')
    monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load(path, model_config=small)
    assert 'pip install torch' in str(err.value)
    assert f'python -m launch.export --from {path} --format safetensors --out {tmp_path}/crate_mae.safetensors' in str(
        err.value
    )


def test_architecture_errors_name_the_config(tmp_path, small):
    tiny = experiments.get_config('crate_mae_tiny').model
    path = _save_model_style(_reference_state_dict(tiny, encoder_only=True), tmp_path / 'tiny.pth', epoch=799)
    with pytest.raises(checkpoints.CheckpointError, match='--config=experiments/registry.py:crate_mae_tiny'):
        checkpoints.load(path)  # no config: the message says which one fits
    small_size = experiments.get_config('crate_mae_small').model
    fits = r'CRATE-MAE-Tiny: pass --config=experiments/registry.py:crate_mae_tiny\. Mismatched shapes'
    with pytest.raises(checkpoints.CheckpointError, match=fits):
        checkpoints.load(path, model_config=small_size)
    # shapes of no registry size: the message gives the numbers as overrides
    odd = _save_model_style(_reference_state_dict(small, encoder_only=True), tmp_path / 'odd.pth')
    with pytest.raises(checkpoints.CheckpointError, match=r'match no registry size.*--config\.model\.width=32'):
        checkpoints.load(odd, model_config=tiny)
    # keys of another architecture keep their hint
    vit = tmp_path / 'vit.pth'
    torch.save({'model': {'blocks.0.attn.qkv.weight': torch.zeros(3, 1), 'cls_token': torch.zeros(1, 1, 32)}}, vit)
    with pytest.raises(checkpoints.CheckpointError, match='timm ViT blocks'):
        checkpoints.load(vit, model_config=small)


def test_reference_sizes_are_the_registry_sizes():
    for name, (width, depth, heads) in export.REFERENCE_SIZES.items():
        model = experiments.get_config(f'crate_mae_{name}').model
        assert (model.width, model.depth, model.heads, model.patch_size, model.image_size) == (
            width,
            depth,
            heads,
            16,
            224,
        )
        assert (model.decoder_width, model.decoder_depth, model.decoder_heads) == (width, depth, heads)


def test_converter_round_trip(tmp_path, capsys):
    """pth -> safetensors (architecture inferred from the saved --model, epoch kept) -> probe-loadable params."""
    tiny = experiments.get_config('crate_mae_tiny').model
    sd = _reference_state_dict(tiny, seed=3)
    src = _save_model_style(sd, tmp_path / 'checkpoint-799.pth', epoch=799, model='mae_crate_tiny', mask_ratio=0.5)
    out = tmp_path / 'crate_mae_tiny.safetensors'
    argv = ['--from', str(src), '--format', 'safetensors', '--out', str(out)]
    assert cli.run(export_cli.main, export_cli.FLAGS, argv) == 0
    assert 'Converted' in capsys.readouterr().out
    _, metadata = export.load_state_dict(out)
    assert metadata['epoch'] == '799' and metadata['converted_from'] == 'checkpoint-799.pth'
    ckpt = checkpoints.load(out)  # no config needed any more, and no torch
    assert (ckpt.model_config.width, ckpt.model_config.heads, ckpt.model_config.decoder_depth) == (384, 6, 12)
    assert ckpt.model_config.mask_ratio == 0.5  # carried over from the training command
    _assert_params_equal(ckpt.params, sd, tiny, encoder_only=True)
    full = checkpoints.load(out, encoder_only=False)
    _assert_params_equal(full.params, sd, tiny, encoder_only=False)


def test_converter_needs_the_heads_when_nothing_shows_them(tmp_path, small, capsys):
    src = tmp_path / 'bare.pth'
    torch.save(_reference_state_dict(small), src)
    assert (
        cli.run(
            export_cli.main,
            export_cli.FLAGS,
            ['--from', str(src), '--format', 'safetensors', '--out', str(tmp_path / 'x.safetensors')],
        )
        == cli.EXIT_USAGE
    )
    assert 'number of attention heads is not in the checkpoint' in capsys.readouterr().err
    out = tmp_path / 'named.npz'
    assert (
        cli.run(
            export_cli.main,
            export_cli.FLAGS,
            ['--from', str(src), '--format', 'npz', '--out', str(out), '--config', 'crate_mae_test'],
        )
        == 0
    )
    assert checkpoints.load(out).model_config.heads == small.heads


def _fine_tuned_file_with_a_foreign_object(path, cfg):
    d = cfg.width
    sd = {
        **_reference_state_dict(cfg, encoder_only=True),
        'fc_norm.weight': torch.ones(d),
        'fc_norm.bias': torch.zeros(d),
        'head.weight': torch.zeros(10, d),
        'head.bias': torch.zeros(10),
    }
    torch.save({'model': sd, 'epoch': 99, 'args': _args(model='crate_mae_test'), 'logger': Foreign(1)}, path)
    return path


def test_probe_cli_trusts_a_file_only_when_told(tmp_path, small, capsys):
    path = _fine_tuned_file_with_a_foreign_object(tmp_path / 'finetuned.pth', small)
    args = [
        f'--checkpoint={path}',
        '--config=experiments/registry.py:crate_mae_test',
        f'--out={tmp_path}',
        f'--cache_dir={tmp_path / "cache"}',
        '--methods=knn',
    ]
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args) == cli.EXIT_USAGE
    assert re.search('Foreign.*--trust_checkpoint', capsys.readouterr().err)
    assert cli.run(probe_cli.main, probe_cli.FLAGS, args + ['--trust-checkpoint']) == 0
    record = json.loads((tmp_path / 'probe_mnist_cls.json').read_text())
    assert record['source'] == 'torch' and record['num_test'] == 500


def test_finetune_trusts_a_file_only_when_told(tmp_path, small):
    path = _fine_tuned_file_with_a_foreign_object(tmp_path / 'finetuned.pth', small)
    config = downstream.finetune_config(
        base.crate_mae_test(), 'mnist', ('train', 'test'), 4500, epochs=1, batch=16, image_size=28
    )
    config.train.update(steps=2, log_every=2, eval_every=2, eval_batch=64)
    config.checkpoint.update(every=2, async_save=False)
    config.finetune.update(checkpoint=str(path))
    with pytest.raises(checkpoints.CheckpointError, match='--trust_checkpoint'):
        finetune.finetune_and_evaluate(config, str(tmp_path / 'refused'))
    config.finetune.trust_checkpoint = True
    result = finetune.finetune_and_evaluate(config, str(tmp_path / 'ft'))
    assert 0.0 <= result['eval/top1'] <= 1.0
