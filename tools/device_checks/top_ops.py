"""The top-ops table of a jax.profiler trace: where a profiled step's device time goes, by operation.

``top_ops(trace_dir)`` reads the newest ``*.trace.json.gz`` under ``trace_dir`` (TensorBoard's profile layout). On
a GPU the device lanes (processes named ``/device:GPU:N``) hold one event per kernel, named after its HLO op; on a
CPU the XLA work runs on the host's ``tf_XLA*`` threads. Events are grouped by name, summed, and ranked; shares
are of the summed op time in those lanes (overlapping streams can make it exceed wall time)."""

import collections
import glob
import gzip
import json
import os


def _trace_file(trace_dir):
    files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
    if not files:
        raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
    return max(files, key=os.path.getmtime)


def top_ops(trace_dir, n=15) -> dict:
    """{'lanes', 'total_ms', 'rows': [{op, ms, count, share}]} of the n ops with the most time."""
    with gzip.open(_trace_file(trace_dir)) as f:
        events = json.load(f)['traceEvents']
    names = {
        (e['pid'], e.get('tid')): e['args']['name']
        for e in events
        if e.get('ph') == 'M' and 'name' in e.get('args', {})
    }
    processes = {pid: name for (pid, tid), name in names.items() if tid is None}
    device_pids = {pid for pid, name in processes.items() if name.startswith('/device:')}
    if device_pids:
        lanes = 'device: ' + ', '.join(sorted(processes[p] for p in device_pids))
        chosen = [e for e in events if e.get('ph') == 'X' and e['pid'] in device_pids]
    else:
        lanes = 'host XLA threads (no device lane in the trace)'
        chosen = [
            e for e in events if e.get('ph') == 'X' and names.get((e['pid'], e.get('tid')), '').startswith('tf_XLA')
        ]
    totals, counts = collections.Counter(), collections.Counter()
    for e in chosen:
        name = (e.get('args') or {}).get('hlo_op') or e['name']
        totals[name] += e.get('dur', 0.0)
        counts[name] += 1
    total = sum(totals.values())
    rows = [
        {'op': op, 'ms': round(us / 1e3, 3), 'count': counts[op], 'share': round(us / total, 4) if total else None}
        for op, us in totals.most_common(n)
    ]
    return {'lanes': lanes, 'total_ms': round(total / 1e3, 3), 'rows': rows}


def markdown(table) -> str:
    lines = [f"Lanes: {table['lanes']}; summed op time {table['total_ms']} ms.", '', '| op | ms | calls | share |']
    lines.append('|---|---|---|---|')
    for r in table['rows']:
        share = 'n/a' if r['share'] is None else f"{100 * r['share']:.1f}%"
        lines.append(f"| `{r['op'][:80]}` | {r['ms']} | {r['count']} | {share} |")
    return '\n'.join(lines)
