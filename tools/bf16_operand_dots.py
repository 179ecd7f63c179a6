"""Would bf16 matmul operands (float32 results) speed up the CPU train step? An A/B in one process, alternating.

  JAX_PLATFORMS=cpu python tools/bf16_operand_dots.py [--config=crate_mae_tiny] [--batch=16] [--rounds=4]

XLA:CPU has a fast kernel for bf16 x bf16 -> float32 dots (``tools/cpu_dot_rates.py``), unlike the bf16 -> bf16 dots
that ``model.dtype=bfloat16`` asks for. This experiment, kept out of the library, rounds both operands of every
Dense layer and of the three ISTA products to bf16 and asks for float32 results; a custom VJP forms the gradient
dots the same way (dx = bf16(g) bf16(W)^T, dW = bf16(x)^T bf16(g)). It patches flax's Dense and ``ops.ista`` for the
second build only; attention products stay float32. Both steps run three-matmul ISTA (``model.fused_ista=False``).
Prints one JSON line: per round wall seconds, process CPU-seconds and loss of each variant, their medians, the count
of bf16 dot fusions in the patched program, the load average and versions.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import flax.linen.linear as flax_linear
import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cratemae import benchmark  # noqa: E402
from cratemae import ops  # noqa: E402
from cratemae import sharding  # noqa: E402
from cratemae.train import engine  # noqa: E402
from cratemae.train import tasks  # noqa: E402
from experiments import registry  # noqa: E402


@jax.custom_vjp
def bf16_dot(x, w):
    """x @ w with both operands rounded to bf16 and the products summed into float32 (x: (..., k), w: (k, n))."""
    return _bf16_dot_fwd(x, w)[0]


def _flat_dot(a, b):
    return jnp.dot(a.reshape(-1, a.shape[-1]), b, preferred_element_type=jnp.float32)


def _bf16_dot_fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _flat_dot(xb, wb).reshape(*x.shape[:-1], w.shape[-1]), (xb, wb)


def _bf16_dot_bwd(residuals, g):
    xb, wb = residuals
    gb = g.astype(jnp.bfloat16)
    dx = _flat_dot(gb, wb.T).reshape(xb.shape)
    dw = _flat_dot(xb.reshape(-1, xb.shape[-1]).T, gb.reshape(-1, gb.shape[-1]))
    return dx, dw


bf16_dot.defvjp(_bf16_dot_fwd, _bf16_dot_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    (lhs_contract, rhs_contract), batch = dimension_numbers
    assert lhs_contract == (lhs.ndim - 1,) and rhs_contract == (0,) and batch == ((), ()), dimension_numbers
    return bf16_dot(lhs, rhs)


class _LaxWithBf16Dots:
    """flax's Dense calls ``lax.dot_general`` of its module; everything else goes to jax.lax."""

    def __getattr__(self, name):
        return _dense_dot_general if name == 'dot_general' else getattr(lax, name)


def _ista_bf16(v, dictionary, step, lam, fused=False):
    assert not fused
    grad_sparse = bf16_dot(bf16_dot(v, dictionary.T), dictionary)
    return jax.nn.relu(v + step * (bf16_dot(v, dictionary) - grad_sparse) - step * lam)


def _compiled_step(config, batch):
    mesh = sharding.make_mesh(config.mesh)
    engine.settle_config(config, mesh, jax.process_count())
    program = tasks.build_program(config, mesh)
    data = benchmark.synthetic_batch(config, batch, sharding.batch_sharding(mesh))
    state = program.init()
    compiled = program.train_step.lower(state, data).compile()
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], data)
        return float(jax.device_get(metrics['loss']))

    return step, compiled.as_text()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='crate_mae_tiny')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--rounds', type=int, default=4)
    args = parser.parse_args()

    def config():
        c = registry.get_config(args.config).copy_and_resolve_references()
        c.unlock()
        c.train.global_batch = args.batch
        c.model.fused_ista = False
        return c

    steps = {'float32': _compiled_step(config(), args.batch)[0]}
    real_lax, real_ista = flax_linear.lax, ops.ista
    flax_linear.lax, ops.ista = _LaxWithBf16Dots(), _ista_bf16
    try:
        steps['bf16_operands'], hlo = _compiled_step(config(), args.batch)
    finally:
        flax_linear.lax, ops.ista = real_lax, real_ista
    bf16_fusions = sum(1 for line in hlo.splitlines() if line.startswith('%fused_computation') and 'bf16[' in line)

    for step in steps.values():
        step()
    load_before = os.getloadavg()
    rounds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            loss = step()
            rounds[name].append([round(time.perf_counter() - wall0, 3), round(time.process_time() - cpu0, 3), loss])
    print(
        json.dumps(
            {
                'tool': 'bf16_operand_dots',
                'config': args.config,
                'batch': args.batch,
                'model.fused_ista': False,
                'rounds_wall_s_cpu_s_loss': rounds,
                'median_cpu_s_per_step': {n: statistics.median(r[1] for r in v) for n, v in rounds.items()},
                'median_wall_s_per_step': {n: statistics.median(r[0] for r in v) for n, v in rounds.items()},
                'bf16_fused_computations': bf16_fusions,
                'load_average_before_after': [list(load_before), list(os.getloadavg())],
                'cpu_count': os.cpu_count(),
                'jax': jax.__version__,
                'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            }
        )
    )


if __name__ == '__main__':
    main()
