"""Where the CPU train step's time goes: per-thunk times from a jax.profiler trace, joined with the compiled HLO.

  JAX_PLATFORMS=cpu python tools/profile_cpu_step.py CONFIG BATCH STEPS OUTDIR ['{"model.KEY": VALUE}'] ['{XLA option}']
  REANALYZE=1 python tools/profile_cpu_step.py ...   # re-read OUTDIR's hlo.txt and trace without running

Each executed HLO instruction (a thunk: a fusion, a YNNPACK/oneDNN dot fusion, a copy) is put in one category from
its op_name metadata (the JAX source op): matmul, matmul (attention), layernorm, softmax, optimizer,
transpose/copy, elementwise/other. Dot FLOPs come from the instruction's shapes. Prints one JSON record: seconds per
step per category and its share of the summed thunk time, plus the 25 slowest instructions. Thunk times are wall
times of the worker threads: on a loaded machine they include time spent waiting for a core, so compare shares.
Instructions inside the scanned layers run once per layer per step (``calls_per_step``).
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cratemae import benchmark as B
from cratemae import sharding
from experiments import registry

cfg_name, batch, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ov = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
co = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
if os.environ.get('REANALYZE'):
    with open(os.path.join(out, 'hlo.txt')) as f:
        hlo = f.read()
    wall = cpu = None
else:
    config = registry.get_config(cfg_name).copy_and_resolve_references()
    config.unlock()
    for key, value in ov.items():  # 'model.fused_ista': true
        *parents, last = key.split('.')
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    config.train.global_batch = batch
    mesh = sharding.make_mesh(config.mesh)
    state, step, bs = B.build(config, mesh, True)
    data = B.synthetic_batch(config, batch, bs)
    compiled = step.lower(state, data).compile(co or None)
    hlo = compiled.as_text()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'hlo.txt'), 'w') as f:
        f.write(hlo)
    for _ in range(2):
        state, m = compiled(state, data)
    jax.block_until_ready(state)
    c0, w0 = time.process_time(), time.perf_counter()
    with jax.profiler.trace(out):
        for _ in range(steps):
            state, m = compiled(state, data)
        jax.block_until_ready(state)
    wall, cpu = (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps
# instruction -> (op_name, category, flops)
comps, cur = {}, None
for line in hlo.splitlines():
    mm = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if mm and not line.startswith(' '):
        cur = mm.group(1)
        comps[cur] = []
    elif cur and line.startswith('  '):
        comps[cur].append(line)


def shape_elems(s):
    d = re.findall(r'\[([\d,]*)\]', s)
    return d


info = {}
SHAPES = {}
for _l in hlo.splitlines():
    _m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]', _l)
    if _m:
        SHAPES[_m.group(1)] = [int(x) for x in _m.group(3).split(',') if x]


def dot_flops(line):
    m = re.match(r'\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]', line)
    res = [int(x) for x in m.group(2).split(',') if x] if m else []
    ops = re.search(r' dot\(%?([\w.\-]+), %?([\w.\-]+)\)', line)
    lc = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line)
    if not ops or not lc or ops.group(1) not in SHAPES:
        return 0, ''
    lhs = SHAPES[ops.group(1)]
    k = 1
    for i in lc.group(1).split(','):
        if i:
            k *= lhs[int(i)]
    n = 1
    for x in res:
        n *= x
    return 2 * n * k, m.group(1)


def category(text, opname):
    o = opname.lower()
    if 'adam' in o or 'optax' in o or 'apply_updates' in o or 'clip' in o or 'tree_norm' in o or 'scale_by' in o:
        return 'optimizer'
    if 'layernorm' in o or 'norm1' in o or 'norm2' in o or '_norm/' in o:
        return 'layernorm'
    if 'softmax' in o or '/exp' in o or 'reduce_max' in o:
        return 'softmax'
    if ' dot(' in text or 'dot_general' in o:
        return 'matmul'
    if 'transpose' in text or 'copy' in text:
        return 'transpose/copy'
    return 'elementwise/other'


for lines in comps.values():
    for line in lines:
        mm = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
        if not mm:
            continue
        name = mm.group(1)
        opn = re.search(r'op_name="([^"]*)"', line)
        opname = opn.group(1) if opn else ''
        called = re.findall(r'calls=%?([\w.\-]+)', line)
        body = '\n'.join(l for c in called for l in comps.get(c, []))
        fl, dt = 0, ''
        for l in ([line] if ' dot(' in line else []) + [l for l in body.splitlines() if ' dot(' in l]:
            f, d = dot_flops(l)
            fl += f
            dt = dt or d
        text = line + '\n' + body
        cat = 'matmul' if fl else category(text, opname)
        if cat == 'matmul' and ('softmax' in opname or 'bkqs' in opname or 'bqkh' in opname):
            cat = 'matmul (attention)'
        info[name] = (opname, cat, fl, dt)
with gzip.open(max(glob.glob(os.path.join(out, 'plugins/profile/*/*.trace.json.gz')))) as f:
    t = json.load(f)
agg, cnt = collections.Counter(), collections.Counter()
for e in t['traceEvents']:
    if e.get('ph') == 'X' and e['name'] in info:
        agg[e['name']] += e['dur'] / 1e6 / steps
        cnt[e['name']] += 1
cats = collections.defaultdict(lambda: [0.0, 0])
for n, d in agg.items():
    cats[info[n][1]][0] += d
    cats[info[n][1]][1] += info[n][2] * cnt[n] / steps
total = sum(agg.values())
rec = {
    'config': cfg_name,
    'batch': batch,
    'overrides': ov,
    'compiler_options': co,
    'wall_s_per_step': wall,
    'cpu_s_per_step': cpu,
    'thunk_s_per_step': total,
    'loadavg': os.getloadavg(),
    'command': 'JAX_PLATFORMS=cpu python tools/profile_cpu_step.py ' + ' '.join(sys.argv[1:]),
    'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    'cpu_model': next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if 'model name' in line), None),
    'jax': jax.__version__,
    'categories': {
        c: {
            's': round(v[0], 4),
            'share': round(v[0] / total, 3),
            'gflop': round(v[1] / 1e9, 2),
            'gflop_per_s': round(v[1] / 1e9 / v[0], 1) if v[0] else None,
        }
        for c, v in sorted(cats.items(), key=lambda kv: -kv[1][0])
    },
    'top': [
        {
            'name': n,
            'cat': info[n][1],
            'dtype': info[n][3],
            's': round(d, 4),
            'gflop_per_call': round(info[n][2] / 1e9, 3),
            'calls_per_step': cnt[n] / steps,
            'gflop_per_s': round(info[n][2] * cnt[n] / steps / 1e9 / d, 1) if info[n][2] else None,
            'op_name': info[n][0][-110:],
        }
        for n, d in agg.most_common(25)
    ],
}
print(json.dumps(rec, indent=1))
