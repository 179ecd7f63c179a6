"""One CRATE encoder layer's forward + backward against the token count: MSSA against ToST's TSSA (issue 23).

  JAX_PLATFORMS=cpu nice -n 15 python -m tools.operator_scaling [--width 128 --heads 4 --batch 1]
      [--tokens 256,512,...,16384] [--run_limit_gib 12] [--out docs/perf/operator_scaling_DATE.jsonl]
      [--plot docs/images/operator_scaling.png]
  python -m tools.operator_scaling --replot docs/perf/operator_scaling_DATE.jsonl --plot docs/images/operator_scaling.png

For each operator and token count n it compiles the gradient of sum(layer(Z)) with respect to the layer's parameters
and its input Z (B, n, d) (the layer's whole training work), and records

  * memory: XLA's buffer plan for that program (arguments + outputs + temporaries, ``compiled.memory_analysis()``);
    the peak the program needs, independent of the machine's load;
  * time: CPU seconds (process time, all threads) and wall seconds per call, median of ``--repeats`` calls after one
    warm-up; only where the planned memory is under ``--run_limit_gib`` (a shared machine), else compile-only.

One JSON line per (operator, n), then a fit of log(value) against log(n) over the points of each operator (the
slope: 1 = linear, 2 = quadratic) and, with --plot, a two-panel log-log figure. ``--replot`` measures nothing: it fits
and plots every (operator, n) row of a records file, so points measured by several invocations share one figure.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from cratemae.models import layers

_GIB = 1024**3


def layer_program(operator, n, width, heads, batch):
    """The jitted gradient of one encoder layer and its arguments."""
    layer = layers.CrateEncoderLayer(heads=heads, attention_operator=operator)
    z = jax.random.normal(jax.random.key(0), (batch, n, width), jnp.float32)
    params = layer.init(jax.random.key(1), z[:, :8])['params']  # the parameters do not depend on n; eager init at
    # n tokens would materialise MSSA's n x n maps outside the measured program

    def loss(p, x):
        return jnp.sum(layer.apply({'params': p}, x)[0])

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, z)


def measure(operator, n, args):
    fn, fn_args = layer_program(operator, n, args.width, args.heads, args.batch)
    t0 = time.perf_counter()
    compiled = fn.lower(*fn_args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    row = {
        'operator': operator,
        'tokens': n,
        'planned_bytes': int(planned),
        'temp_bytes': int(mem.temp_size_in_bytes),
        'compile_s': round(compile_s, 3),
    }
    if planned < args.run_limit_gib * _GIB:
        jax.block_until_ready(compiled(*fn_args))  # warm-up
        cpu, wall = [], []
        for _ in range(args.repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(compiled(*fn_args))
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        row.update(cpu_s=statistics.median(cpu), wall_s=statistics.median(wall))
    else:
        row['skipped_run'] = f'planned {planned / _GIB:.1f} GiB >= --run_limit_gib {args.run_limit_gib}'
    return row


def slope(rows, key):
    points = [(r['tokens'], r[key]) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def plot(rows, path, about):
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for operator, color in (('mssa', 'tab:blue'), ('tssa', 'tab:orange')):
        mine = [r for r in rows if r['operator'] == operator]
        timed = [r for r in mine if 'cpu_s' in r]
        axes[0].loglog(
            [r['tokens'] for r in timed],
            [r['cpu_s'] for r in timed],
            'o-',
            color=color,
            label=f'{operator.upper()} (slope {slope(mine, "cpu_s")})',
        )
        axes[1].loglog(
            [r['tokens'] for r in mine],
            [r['planned_bytes'] / _GIB for r in mine],
            'o-',
            color=color,
            label=f'{operator.upper()} (slope {slope(mine, "planned_bytes")})',
        )
    axes[0].set(xlabel='tokens n', ylabel='CPU seconds per forward + backward', title='Time')
    axes[1].set(xlabel='tokens n', ylabel='GiB (XLA buffer plan)', title='Memory')
    for ax in axes:
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    fig.suptitle(about, fontsize=9)
    fig.savefig(path, dpi=110)


def replot(records, path):
    """Prints the slopes of every operator's rows in `records` (the latest row per (operator, n)) and plots them."""
    latest = {}
    with open(records, encoding='utf-8') as f:
        for line in f:
            row = json.loads(line)
            if 'operator' in row:
                latest[(row['operator'], row['tokens'])] = row
    rows = [latest[k] for k in sorted(latest)]
    operators = sorted({r['operator'] for r in rows})
    fits = {
        op: {key: slope([r for r in rows if r['operator'] == op], key) for key in ('cpu_s', 'planned_bytes')}
        for op in operators
    }
    print(json.dumps({'records': records, 'points': len(rows), 'log_log_slopes': fits}))
    if path:
        first = rows[0]
        layer = first['layer']
        plot(
            rows,
            path,
            f"one encoder layer, d={layer['width']}, K={layer['heads']}, batch {layer['batch']}; {first['cpu_model']}; "
            f"{min(r['date'][:10] for r in rows)}; shared load",
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--width', type=int, default=128)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--tokens', default='256,512,1024,2048,4096,8192,16384')
    parser.add_argument('--operators', default='mssa,tssa')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--run_limit_gib', type=float, default=12.0)
    parser.add_argument('--out', default=None)
    parser.add_argument('--plot', default=None)
    parser.add_argument('--replot', default=None, help='Fit and plot the rows of this records file; measure nothing.')
    args = parser.parse_args()
    if args.replot:
        replot(args.replot, args.plot)
        return
    cpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    model = next((line.split(':', 1)[1].strip() for line in cpu.splitlines() if line.startswith('Model name')), '')
    common = {
        'tool': 'operator_scaling',
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'cpu_model': model or platform.processor(),
        'cpu_count': os.cpu_count(),
        'jax': jax.__version__,
        'layer': dict(width=args.width, heads=args.heads, batch=args.batch, block='CrateEncoderLayer, ISTA'),
    }
    rows = []
    out = open(args.out, 'a') if args.out else None  # noqa: SIM115 (appended to as each point finishes)
    for operator in args.operators.split(','):
        for n in (int(t) for t in args.tokens.split(',')):
            row = {**common, **measure(operator, n, args), 'load_average': [round(x, 2) for x in os.getloadavg()]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + '\n')
                out.flush()
    fits = {
        op: {key: slope([r for r in rows if r['operator'] == op], key) for key in ('cpu_s', 'wall_s', 'planned_bytes')}
        for op in args.operators.split(',')
    }
    summary = {**common, 'log_log_slopes': fits}
    print(json.dumps(summary))
    if out:
        out.write(json.dumps(summary) + '\n')
        out.close()
    if args.plot:
        plot(
            rows,
            args.plot,
            f"one encoder layer, d={args.width}, K={args.heads}, batch {args.batch}; {model}; "
            f"{common['date'][:10]}; shared load",
        )


if __name__ == '__main__':
    main()
