"""Two float32 train steps of a registered config on this process's platform, for tools/device_run.py's comparison
of the GPU with the host CPU.

  JAX_PLATFORMS=cuda|cpu python -m tools.device_checks.one_step CONFIG BATCH     prints one JSON line

The step is the engine's own program (``cratemae.benchmark.build``: the optimizer, shardings and donation of a real
run) on ``benchmark.synthetic_batch`` images. The first step's loss and gradient norm are the check; the second
(the first has learning rate 0 in warmup) moves the parameters, whose fingerprint is compared too; init and the images come from the same PRNG keys on every backend.
Matmuls run at 'highest' precision, so a GPU's TF32 default does not widen the difference being checked."""

import json
import sys

import jax
import numpy as np


def main(config_name: str, batch: int) -> dict:
    jax.config.update('jax_default_matmul_precision', 'highest')
    from cratemae import benchmark
    from cratemae import sharding
    from cratemae.train import engine
    from experiments import registry

    config = registry.get_config(config_name)
    config.model.dtype = 'float32'
    config.train.global_batch = batch
    mesh = sharding.make_mesh(config.mesh)
    engine.settle_config(config, mesh, jax.process_count())
    state, train_step, batch_sharding = benchmark.build(config, mesh)
    data = benchmark.synthetic_batch(config, batch, batch_sharding)
    steps = []
    for _ in range(2):
        state, metrics = train_step(state, data)
        steps.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(jax.device_get(state.params))]
    flat = np.concatenate(leaves)
    return {
        'platform': jax.devices()[0].platform,
        'device_kind': jax.devices()[0].device_kind,
        'config': config_name,
        'batch': batch,
        'metrics': steps,
        'param_count': int(flat.size),
        # A fingerprint of the updated parameters: sums over fixed random projections, compared across backends.
        'param_projections': (np.random.default_rng(0).standard_normal((4, flat.size)) @ flat).tolist(),
        'options': {k: config.model.get(k) for k in ('attention', 'remat', 'fused_ista', 'dtype')},
    }


if __name__ == '__main__':
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))), flush=True)
