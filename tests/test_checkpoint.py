"""Tests for cratemae.checkpoint: round trip, retention, corrupt-step fallback, config checks."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cratemae import checkpoint
from cratemae import sharding

# A failed tensorstore read can leave an asyncio callback behind that fires "Event loop is closed"
# when collected, possibly during a later test; harmless.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _state(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        'encoder': {'kernel': jax.random.normal(k1, (8, 16))},
        'head': {'kernel': jax.random.normal(k2, (16, 4)), 'bias': jnp.zeros((4,))},
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
    return {'params': params, 'opt_state': opt_state, 'step': jnp.int32(seed)}


def _save_steps(workdir, steps, **kw):
    ckpt = checkpoint.Checkpointer(workdir, **kw)
    for s in steps:
        ckpt.save(s, _state(s), {'data_position': s * 10, 'rng': np.uint32(s)})
    ckpt.close()


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_round_trip_keeps_optax_namedtuples_and_sharding(tmp_path):
    _save_steps(tmp_path, [1, 2])
    mesh = sharding.make_mesh({'fsdp': 8})
    target = _state(0)
    shardings = sharding.param_shardings(target, sharding.FSDP_RULES, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    ckpt = checkpoint.Checkpointer(tmp_path)
    step, state, meta = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 2
    assert meta == {'data_position': 20, 'rng': 2, 'step': 2}
    assert type(state['opt_state'][0]).__name__ == 'ScaleByAdamState'
    _assert_tree_equal(state, _state(2))
    assert state['params']['encoder']['kernel'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')


def test_empty_workdir_returns_none(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.restore_latest(_state()) is None
    ckpt.close()


def test_max_to_keep_and_interval(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, every=2, max_to_keep=2)
    saved = [s for s in range(1, 7) if ckpt.save(s, _state(s))]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, _state(7), force=True)
    assert not ckpt.save(7, _state(7), force=True)  # already saved: skipped, not an error
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [6, 7]
    ckpt.close()


def _damage(step_dir, what):
    state_dir = step_dir / 'state'
    if what == 'data':
        files = [p for p in (state_dir / 'd').iterdir() if p.is_file()]
    else:
        files = [state_dir / what]
    assert files and all(f.exists() for f in files), what
    for f in files:
        size = f.stat().st_size
        with open(f, 'r+b') as fh:
            fh.truncate(size // 2)


@pytest.mark.parametrize('what', ['data', 'manifest.ocdbt', '_METADATA'])
def test_corrupt_newest_falls_back(tmp_path, what, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    _damage(tmp_path / 'checkpoints' / '3', what)
    ckpt = checkpoint.Checkpointer(tmp_path)
    with caplog.at_level('WARNING'):
        step, state, meta = ckpt.restore_latest(_state())
    ckpt.close()
    assert step == 2 and meta['data_position'] == 20
    _assert_tree_equal(state, _state(2))
    assert 'step 3' in caplog.text and 'failed to restore' in caplog.text


def test_all_corrupt_raises(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for s in (1, 2):
        _damage(tmp_path / 'checkpoints' / str(s), 'manifest.ocdbt')
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(RuntimeError, match=r'none could be restored[\s\S]*step 2[\s\S]*step 1'):
        ckpt.restore_latest(_state())
    ckpt.close()


def test_config_compatibility(tmp_path):
    cfg = ml_collections.ConfigDict(
        {
            'model': {'width': 64, 'depth': 2},
            'train': {'steps': 10},
            'checkpoint': {'every': 5},
            'mesh': {'rules': [('.*', ('fsdp',))]},
        }
    )
    assert checkpoint.check_compatible(tmp_path, cfg) == []  # no config.json yet
    checkpoint.save_config(tmp_path, cfg)
    assert checkpoint.check_compatible(tmp_path, cfg) == []  # tuples vs JSON lists are equal
    cfg.checkpoint.every = 1
    assert checkpoint.check_compatible(tmp_path, cfg) == []  # ignored keys
    cfg.train.steps = 20  # would stretch the schedule of the 10 steps trained on: refused, with the fix named
    with pytest.raises(ValueError, match=r'optim.schedule_steps: 10 -> 20(.|\n)*--config.optim.schedule_steps=10'):
        checkpoint.check_compatible(tmp_path, cfg)
    cfg.optim = ml_collections.ConfigDict({'schedule_steps': 10})
    assert checkpoint.check_compatible(tmp_path, cfg) == []  # longer, on the same schedule
    cfg.model.width = 32
    cfg.model.extra = True
    with pytest.raises(ValueError) as e:
        checkpoint.check_compatible(tmp_path, cfg)
    msg = str(e.value)
    assert 'model.width: 64 -> 32' in msg and 'model.extra: <absent> -> true' in msg
    assert '--allow_config_change' in msg and 'train.steps' not in msg
    assert len(checkpoint.check_compatible(tmp_path, cfg, allow_change=True)) == 2
    assert checkpoint.config_hash(cfg) != checkpoint.config_hash(cfg.to_dict() | {'x': 1})


def test_ensure_writable(tmp_path):
    assert checkpoint.ensure_writable(tmp_path / 'a' / 'b').exists()
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(PermissionError, match='not writable'):
        checkpoint.ensure_writable(blocker / 'sub')  # a file is in the way


def test_sigterm_sets_preemption_flag(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    try:
        ckpt.install_preemption_handler()
        assert not ckpt.reached_preemption(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.reached_preemption(2)
    finally:
        ckpt.uninstall_preemption_handler()
        ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_save_config_overwrites_an_existing_config(tmp_path):
    import ml_collections

    checkpoint.save_config(tmp_path, ml_collections.ConfigDict({'a': 1}))
    checkpoint.save_config(tmp_path, ml_collections.ConfigDict({'a': 2}))
    assert json.loads((tmp_path / 'config.json').read_text()) == {'a': 2}
    assert [p.name for p in tmp_path.iterdir()] == ['config.json']


def test_performance_options_may_change_on_resume_but_the_model_may_not(tmp_path):
    old = ml_collections.ConfigDict({'model': {'remat': 'none', 'attention': 'einsum', 'width': 64}})
    checkpoint.save_config(tmp_path, old)
    new = ml_collections.ConfigDict(
        {'model': {'remat': 'full', 'attention': 'dot_product_attention', 'width': 64, 'attention_pad': 64}}
    )
    assert checkpoint.check_compatible(tmp_path, new) == []
    new.model.width = 128
    with pytest.raises(ValueError, match='model.width: 64 -> 128'):
        checkpoint.check_compatible(tmp_path, new)


def test_saved_steps_lists_finished_steps_only(tmp_path):
    assert checkpoint.saved_steps(tmp_path) == []
    for name in ('10', '2', '20.orbax-checkpoint-tmp-1234', 'notes'):
        (tmp_path / checkpoint.CKPT_DIR / name).mkdir(parents=True)
    assert checkpoint.saved_steps(tmp_path) == [2, 10]
    assert checkpoint.saved_steps(str(tmp_path)) == [2, 10]


def test_restore_newest_skips_unreadable_steps_and_names_them(caplog):
    def restore(step):
        if step > 3:
            raise ValueError(f'truncated file of step {step}\nmore detail')
        return f'state {step}'

    assert checkpoint.restore_newest([1, 3, 5, 7], restore, 'dir') == (3, 'state 3')
    assert 'step 7' in caplog.text and 'step 5' in caplog.text and 'more detail' not in caplog.text
    assert checkpoint.restore_newest([], restore, 'dir') is None
    with pytest.raises(checkpoint.UnreadableCheckpointsError, match=r'steps \[5, 7\][\s\S]*step 7: ValueError'):
        checkpoint.restore_newest([5, 7], restore, 'dir')
