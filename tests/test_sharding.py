"""Tests for cratemae.sharding (8 fake CPU devices, set by tests/conftest.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from cratemae import distributed
from cratemae import sharding


def _params(depth=2, d=16):
    return {
        'patch_embed': {'kernel': jnp.ones((4, 4, 3, d)), 'bias': jnp.ones((d,))},
        'cls_token': jnp.ones((1, 1, d)),
        'encoder': {
            'layers': {
                'norm1': {'scale': jnp.ones((depth, d)), 'bias': jnp.ones((depth, d))},
                'mssa': {
                    'qkv': {'kernel': jnp.ones((depth, d, d))},
                    'out': {'kernel': jnp.ones((depth, d, d)), 'bias': jnp.ones((depth, d))},
                },
                'ista': {'dictionary': jnp.ones((depth, d, d))},
            }
        },
        'decoder_pred': {'kernel': jnp.ones((d, 48)), 'bias': jnp.ones((48,))},
        'odd': jnp.ones((3, 5)),
    }


def _specs(tree, rules, mesh):
    shardings = sharding.param_shardings(tree, rules, mesh)
    return {sharding.path_to_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def test_make_mesh_defaults_and_config():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(None)
    assert mesh.axis_names == ('data', 'fsdp', 'model')
    assert dict(mesh.shape) == {'data': 8, 'fsdp': 1, 'model': 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    cfg = ml_collections.ConfigDict({'data': -1, 'fsdp': 2, 'model': 2})
    assert dict(sharding.make_mesh(cfg).shape) == {'data': 2, 'fsdp': 2, 'model': 2}


@pytest.mark.parametrize('cfg', [{'fsdp': 3}, {'data': 2, 'fsdp': 2}, {'data': 16}, {'fsdp': 0}])
def test_make_mesh_errors(cfg):
    with pytest.raises(ValueError, match='mesh|Invalid'):
        sharding.make_mesh(cfg)


def test_fsdp_rules_params_and_adamw_state():
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})
    params = _params()
    specs = _specs(params, sharding.FSDP_RULES, mesh)
    assert specs['encoder/layers/mssa/qkv/kernel'] == P(None, 'fsdp')  # d=16 > depth=2
    assert specs['patch_embed/kernel'] == P(None, None, None, 'fsdp')
    assert specs['decoder_pred/kernel'] == P(None, 'fsdp')  # 48 is largest
    assert specs['patch_embed/bias'] == P()  # 1-D: replicated
    assert specs['encoder/layers/norm1/scale'] == P(None, 'fsdp')
    assert specs['cls_token'] == P(None, None, 'fsdp')
    assert specs['odd'] == P()  # nothing divides 4

    opt_state = optax.adamw(1e-3).init(params)
    ospecs = _specs(opt_state, sharding.FSDP_RULES, mesh)
    assert ospecs['0/count'] == P()
    for name, spec in specs.items():
        assert ospecs[f'0/mu/{name}'] == spec
        assert ospecs[f'0/nu/{name}'] == spec
    # The shardings can actually be applied, and namedtuples survive.
    placed = jax.device_put(opt_state, sharding.param_shardings(opt_state, sharding.FSDP_RULES, mesh))
    assert type(placed[0]).__name__ == 'ScaleByAdamState'
    assert placed[0].mu['encoder']['layers']['mssa']['qkv']['kernel'].addressable_shards[0].data.shape == (2, 4, 16)


def test_explicit_rules_first_match_and_fallback(caplog):
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'model': 2})
    rules = [
        ('mssa/qkv/kernel$', (None, 'fsdp', 'model')),
        ('kernel$', [None, ['data', 'fsdp']]),  # ConfigDict-style lists
        ('dictionary', P(None, None, 'model')),
        ('odd', ('model', 'fsdp')),
    ]
    params = _params()
    specs = _specs(params, rules, mesh)
    assert specs['encoder/layers/mssa/qkv/kernel'] == P(None, 'fsdp', 'model')
    assert specs['encoder/layers/mssa/out/kernel'] == P(None, ('data', 'fsdp'))
    assert specs['decoder_pred/kernel'] == P(None, ('data', 'fsdp'))
    assert specs['encoder/layers/ista/dictionary'] == P(None, None, 'model')
    assert specs['cls_token'] == P()  # no rule: replicated
    with caplog.at_level('WARNING'):
        assert _specs({'odd': params['odd']}, rules, mesh)['odd'] == P()  # 3, 5 not divisible by 2
    assert 'not divisible' in caplog.text
    opt = optax.adamw(1e-3).init(params)
    assert _specs(opt, rules, mesh)['0/nu/encoder/layers/mssa/qkv/kernel'] == P(None, 'fsdp', 'model')


def test_bad_rules_raise():
    mesh = sharding.make_mesh(None)
    with pytest.raises(ValueError, match='not a mesh axis'):
        sharding.param_shardings({'w': jnp.ones((8, 8))}, [('w', ('batch',))], mesh)
    with pytest.raises(ValueError, match='entries'):
        sharding.param_shardings({'w': jnp.ones((8, 8))}, [('w', ('data', None, None))], mesh)
    with pytest.raises(ValueError, match='Unknown'):
        sharding.param_shardings({'w': jnp.ones((8, 8))}, [('w', 'fsdp_smallest')], mesh)


def test_sharded_jit_matches_unsharded():
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'model': 2})
    rng = np.random.default_rng(0)
    params = {'w1': rng.normal(size=(16, 32)).astype(np.float32), 'w2': rng.normal(size=(32, 8)).astype(np.float32)}
    x = rng.normal(size=(16, 16)).astype(np.float32)

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p['w1']) @ p['w2']) ** 2

    def step(p, x):
        g = jax.grad(loss)(p, x)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), loss(p, x)

    ref_p, ref_l = jax.jit(step)(params, x)
    rules = [('w1', ('fsdp', 'model')), ('w2', ('model', None))]
    ps = sharding.param_shardings(params, rules, mesh)
    out_p, out_l = jax.jit(step, out_shardings=(ps, sharding.replicated(mesh)))(
        jax.device_put(params, ps), jax.device_put(x, sharding.batch_sharding(mesh))
    )
    assert out_p['w1'].sharding.spec == P('fsdp', 'model')
    np.testing.assert_allclose(out_l, ref_l, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(out_p[k], ref_p[k], rtol=1e-5, atol=1e-6)


def test_host_local_to_global():
    mesh = sharding.make_mesh({'fsdp': 2})
    batch = {'image': np.arange(8 * 4 * 4 * 3, dtype=np.float32).reshape(8, 4, 4, 3), 'label': np.arange(8)}
    out = sharding.host_local_to_global(batch, mesh)
    assert out['image'].shape == (8, 4, 4, 3)  # one process: global == local
    assert out['image'].sharding.spec == P(('data', 'fsdp'))
    assert out['image'].addressable_shards[0].data.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(out['label'], batch['label'])


def test_distributed_request_env():
    req = distributed.distributed_request
    assert req({}) is None
    assert req({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None  # single-host TPU VM
    assert req({'TPU_WORKER_HOSTNAMES': 'h0,h1'})[1] == {}
    assert req({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1'}) is None
    assert req({'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '4'}) is not None
    assert req({'JAX_COORDINATOR_ADDRESS': 'h:1234'}) is not None
    assert req({'OMPI_COMM_WORLD_SIZE': '2'}) is not None
    assert req({'CRATEMAE_COORDINATOR_ADDRESS': 'h:1', 'CRATEMAE_NUM_PROCESSES': '2', 'CRATEMAE_PROCESS_ID': '1'})[
        1
    ] == {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1}
    assert distributed.maybe_initialize_distributed(env={}) is False


def test_fsdp_over_every_device_with_one_minus_one_axis():
    mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'model': 1})
    assert dict(mesh.shape) == {'data': 1, 'fsdp': 8, 'model': 1}
    with pytest.raises(ValueError, match='at most one may be -1'):
        sharding.make_mesh({'data': -1, 'fsdp': -1, 'model': 1})
