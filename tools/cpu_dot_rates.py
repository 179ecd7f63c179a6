"""What one matmul reaches on this CPU: XLA:CPU (jax) against oneDNN (torch), float32 and bfloat16.

  JAX_PLATFORMS=cpu python tools/cpu_dot_rates.py [--shapes 3152x384x384,3152x384x1536,3152x192x768] [--repeats 20]

For each (M, K, N) it times a lone jitted ``(M, K) @ (K, N)``: float32; bfloat16 operands with a bfloat16 result (what
``model.dtype=bfloat16`` asks of XLA); bfloat16 operands with a float32 result (``preferred_element_type``); and, if
torch is installed, torch's float32 and bfloat16 matmul. M = 16 images x 197 tokens is one layer of CRATE-MAE-Tiny
at batch 16. Prints one JSON line per shape and kind with GFLOP/s (median of ``--repeats`` calls after 3 warm-ups).
"""

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _rate(fn, flop, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flop / statistics.median(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shapes', default='3152x384x384,3152x384x1536,3152x192x768')
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    common = {
        'tool': 'cpu_dot_rates',
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'cpu_count': os.cpu_count(),
        'jax': jax.__version__,
        'torch': torch.__version__ if torch else None,
        'load_average': [round(x, 2) for x in os.getloadavg()],
    }
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(','):
        m, k, n = (int(x) for x in shape.split('x'))
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        flop = 2.0 * m * k * n
        kinds = {}
        for name, dtype, result in (
            ('jax_f32', jnp.float32, None),
            ('jax_bf16_to_bf16', jnp.bfloat16, None),
            ('jax_bf16_to_f32', jnp.bfloat16, jnp.float32),
        ):
            x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
            f = jax.jit(lambda x, y, result=result: jnp.dot(x, y, preferred_element_type=result))
            kinds[name] = _rate(lambda f=f, x=x, y=y: f(x, y).block_until_ready(), flop, args.repeats)
        if torch is not None:
            for name, dtype in (('torch_f32', torch.float32), ('torch_bf16', torch.bfloat16)):
                x, y = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
                kinds[name] = _rate(lambda x=x, y=y: x @ y, flop, args.repeats)
        for name, gflops in kinds.items():
            print(json.dumps({**common, 'shape_mkn': [m, k, n], 'kind': name, 'gflop_per_s': round(gflops, 1)}))


if __name__ == '__main__':
    main()
