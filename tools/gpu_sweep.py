"""One-shot train-step sweep for a session that has one H100 or H200: inside 8 minutes, JSON lines to --out.

  python -m tools.gpu_sweep --out "$OUT" [--budget_s 450] [--steps 10] [--warmup 3] [--dry_run] [--smoke]
      [--stages attention,remat,knobs,profile,models,extras]

tools/device_run.py runs it as its stage 4 (``run_sweep``), after the correctness checks and the headline.

Every point is ``python -m launch.benchmark`` in its own process, so ``peak_bytes_in_use`` is the point's own peak
and an out-of-memory or an unsupported kernel costs only that point. Points run in priority order and the later
stages use the winners of the earlier ones (CRATE-MAE-Base, reference architecture, batch 256, bf16 compute):

  0 smoke      crate_mae_test, 2 steps: the stack works (jax, the carried wheels); the sweep stops here if not
  1 attention  einsum | cudnn | cudnn + tokens padded to a multiple of 64 (197 -> 256) | dot_product_attention (XLA)
  2 remat      full | dots_saveable | dots_with_no_batch_dims_saveable, with the fastest attention
  3 knobs      fused_ista | scan_unroll=2, with the fastest attention + remat
  4 profile    the fastest so far again, with a jax.profiler trace, summarised as a top-ops table
               (tools/device_checks/top_ops.py) in its record and in the summary
  5 models     visible-only encoder (the ablation) | crate_mae_small | crate_mae_large (remat falls back on OOM)
  6 extras     batch 512 | scan_unroll=12 | einsum + dots_with_no_batch_dims_saveable | plain fp32 einsum

Before each point the sweep checks that the time left covers 1.25x the slowest point so far, else it records the
point as skipped, so the whole run ends inside --budget_s plus 30 s. Files in --out:
gpu_sweep.jsonl (the benchmark records plus 'sweep': stage, name, wall_s; the profiled point's also 'top_ops'),
gpu_sweep_summary.md (a table, the winners and the top ops), gpu_sweep.log (each point's command and the tail of its stderr), gpu_sweep_profile.tgz (the trace; open
it with TensorBoard's profile plugin or xprof).
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from tools.device_checks import top_ops

_BASE = {'config': 'crate_mae_base', 'batch': 256, 'overrides': {'model.dtype': 'bfloat16'}}
BASE = dict(_BASE)  # main() resets it; --smoke moves every point onto crate_mae_test
_OOM = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')


def _point(name, stage, overrides=None, config=None, batch=None):
    """A sweep point: the base (Base, batch 256, bf16) with config-path overrides on top (--smoke: all on the base)."""
    if BASE.get('smoke'):
        config, batch = None, None
    return {
        'name': name,
        'stage': stage,
        'config': config or BASE['config'],
        'batch': batch or BASE['batch'],
        'overrides': {**BASE['overrides'], **(overrides or {})},
    }


def _fastest(results, stages_=None):
    ok = [r for r in results if 'images_per_s' in r and (stages_ is None or r['sweep']['stage'] in stages_)]
    return max(ok, key=lambda r: r['images_per_s']) if ok else None


def _settings(record, keys=('attention', 'attention_pad', 'remat')):
    """The model overrides of a finished record that later stages inherit (the plain step when none ran)."""
    if record is None:
        return {
            k: v
            for k, v in {'model.attention': 'einsum', 'model.attention_pad': 0, 'model.remat': 'none'}.items()
            if k.split('.')[1] in keys
        }
    return {f'model.{k}': record['options'][k] for k in keys}


def stages():
    """[(stage name, function(results so far) -> points)], in priority order."""

    def attention(_):
        plain = {'model.remat': 'none'}
        return [
            _point('einsum', 'attention', {**plain, 'model.attention': 'einsum'}),
            _point('cudnn', 'attention', {**plain, 'model.attention': 'cudnn'}),
            _point('cudnn_pad64', 'attention', {**plain, 'model.attention': 'cudnn', 'model.attention_pad': 64}),
            _point('xla_dpa', 'attention', {**plain, 'model.attention': 'dot_product_attention'}),
        ]

    def remat(results):
        best = _settings(_fastest(results, ('attention',)), ('attention', 'attention_pad'))
        return [
            _point(f'remat_{policy}', 'remat', {**best, 'model.remat': policy})
            for policy in ('full', 'dots_saveable', 'dots_with_no_batch_dims_saveable')
        ]

    def best(results):
        return _settings(_fastest(results, ('attention', 'remat')))

    def profile(results):
        fastest = _fastest(results, ('attention', 'remat', 'knobs'))
        overrides = best(results)
        if fastest is not None and fastest['sweep']['stage'] == 'knobs':
            overrides.update({f'model.{k}': fastest['options'][k] for k in ('fused_ista', 'scan_unroll')})
        point = _point('profile_fastest', 'profile', overrides)
        point['profile'] = True
        return [point]

    def knobs(results):
        return [
            _point('fused_ista', 'knobs', {**best(results), 'model.fused_ista': True}),
            _point('scan_unroll2', 'knobs', {**best(results), 'model.scan_unroll': 2}),
        ]

    def models(results):
        large = _point('large', 'models', best(results), config='crate_mae_large')
        large['fallback'] = {'model.remat': 'dots_with_no_batch_dims_saveable'}
        return [
            _point('visible_only', 'models', {**best(results), 'model.encoder_sees_mask_tokens': False}),
            _point('small', 'models', best(results), config='crate_mae_small'),
            large,
        ]

    def extras(results):
        return [
            _point('batch512', 'extras', best(results), batch=512),
            _point('scan_unroll12', 'extras', {**best(results), 'model.scan_unroll': 12}),
            _point(
                'einsum_dots_no_batch',
                'extras',
                {'model.attention': 'einsum', 'model.remat': 'dots_with_no_batch_dims_saveable'},
            ),
            _point(
                'einsum_fp32', 'extras', {'model.attention': 'einsum', 'model.remat': 'none', 'model.dtype': 'float32'}
            ),
        ]

    return [
        ('attention', attention),
        ('remat', remat),
        ('knobs', knobs),
        ('profile', profile),
        ('models', models),
        ('extras', extras),
    ]


_TRACE = '/tmp/gpu_sweep_trace'
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the benchmark's -m and --config resolve here


def command(point, steps, warmup):
    cmd = [
        sys.executable,
        '-m',
        'launch.benchmark',
        f'--config=experiments/registry.py:{point["config"]}',
        f'--batch={point["batch"]}',
        f'--steps={steps}',
        f'--warmup={warmup}',
    ]
    if point.get('profile'):
        cmd.append(f'--profile={_TRACE}')
    for key, value in point['overrides'].items():
        cmd.append(f'--config.{key}={str(value).lower() if isinstance(value, bool) else value}')
    return cmd


class Sweep:
    """Runs points in subprocesses against a deadline and writes the three output files."""

    def __init__(self, out, budget_s, steps, warmup, dry_run=False):
        self.out, self.budget_s, self.steps, self.warmup, self.dry_run = out, budget_s, steps, warmup, dry_run
        self.start = time.monotonic()
        self.results, self.walls = [], []
        os.makedirs(out, exist_ok=True)
        self.jsonl = os.path.join(out, 'gpu_sweep.jsonl')
        self.log = os.path.join(out, 'gpu_sweep.log')

    def left(self):
        return self.budget_s - (time.monotonic() - self.start)

    def _write(self, record):
        with open(self.jsonl, 'a') as f:
            f.write(json.dumps(record, sort_keys=True) + '\n')
        s = record['sweep']
        shown = f"{record['images_per_s']:.0f} img/s" if 'images_per_s' in record else record.get('error', '')[:160]
        print(f"[{s['stage']}/{s['name']}] {shown} ({s.get('wall_s', 0):.0f} s, {self.left():.0f} s left)", flush=True)

    def run(self, point, steps=None, warmup=None):
        steps, warmup = steps or self.steps, warmup or self.warmup
        cmd = command(point, steps, warmup)
        sweep = {'stage': point['stage'], 'name': point['name'], 'command': ' '.join(shlex.quote(c) for c in cmd)}
        estimate = 1.25 * max(self.walls) if self.walls else 60.0
        if self.dry_run or self.left() < estimate:
            record = {
                'sweep': dict(
                    sweep,
                    skipped='dry run' if self.dry_run else f'{self.left():.0f} s left < {estimate:.0f} s estimated',
                ),
                'error': 'skipped',
            }
            self._write(record)
            return record
        if point.get('profile'):
            shutil.rmtree(_TRACE, ignore_errors=True)  # a trace left by an earlier sweep on this machine
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=max(30.0, self.left()), check=False, cwd=_REPO
            )
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            stdout, stderr = e.stdout or '', (e.stderr or '') + '\nTIMEOUT'
            stdout, stderr = (x.decode() if isinstance(x, bytes) else x for x in (stdout, stderr))
        wall = time.monotonic() - t0
        self.walls.append(wall)
        lines = [line for line in stdout.splitlines() if line.startswith('{')]
        record = json.loads(lines[-1]) if lines else {'error': 'no JSON line: ' + stderr.strip()[-1500:]}
        record['sweep'] = dict(sweep, wall_s=round(wall, 1))
        with open(self.log, 'a') as f:
            f.write(f'### {point["stage"]}/{point["name"]}  ({wall:.1f} s)\n{sweep["command"]}\n{stderr[-4000:]}\n\n')
        self._write(record)
        if point.get('profile') and os.path.isdir(_TRACE):  # one file: only two folder levels of --out come back
            subprocess.run(
                ['tar', 'czf', os.path.join(self.out, 'gpu_sweep_profile.tgz'), '-C', _TRACE, '.'], check=False
            )
            try:
                record['top_ops'] = top_ops.top_ops(_TRACE)
            except (OSError, ValueError, KeyError) as e:
                record['top_ops'] = {'error': f'{type(e).__name__}: {e}'}
        if 'error' in record and point.get('fallback') and any(s in record['error'] for s in _OOM):
            retry = {k: v for k, v in point.items() if k != 'fallback'}
            retry.update(name=point['name'] + '_fallback', overrides={**point['overrides'], **point['fallback']})
            return self.run(retry)
        return record

    def summary(self):
        rows = [
            '| stage | point | images/s | ms/step (median) | compile s | peak GiB | MFU | note |',
            '|---|---|---|---|---|---|---|---|',
        ]
        for r in self.results:
            s = r['sweep']
            if 'images_per_s' in r:
                mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') else 'n/a'
                gib = f"{r['peak_memory_gib']:.1f}" if r.get('peak_memory_gib') is not None else 'n/a'
                rows.append(
                    f"| {s['stage']} | {s['name']} | {r['images_per_s']:.0f} | {r['ms_per_step']['median']:.1f}"
                    f" | {r['first_step_compile_s']:.1f} | {gib} | {mfu} | |"
                )
            else:
                note = s.get('skipped') or r.get('error', '')[:120].replace('|', '/').replace('\n', ' ')
                rows.append(f"| {s['stage']} | {s['name']} | - | - | - | - | - | {note} |")
        base = [r for r in self.results if r['sweep']['stage'] in ('attention', 'remat')]
        best = _fastest(base)
        fits = _fastest([r for r in base if (r.get('peak_memory_gib') or 1e9) <= 24])
        kinds = {r['device_kind'] for r in self.results if 'device_kind' in r}
        lines = ['# GPU sweep', '', f"device: {', '.join(sorted(kinds)) or '?'}", '', *rows, '']
        for label, r in (('fastest (attention x remat)', best), ('fastest within 24 GiB', fits)):
            if r:
                lines.append(
                    f"- {label}: {r['sweep']['name']} {json.dumps(_settings(r))}: {r['images_per_s']:.0f} "
                    f"img/s, {r.get('peak_memory_gib') or 0:.1f} GiB"
                )
        for r in self.results:
            if 'rows' in r.get('top_ops', {}):
                lines += ['', f"## Top ops of {r['sweep']['name']}", '', top_ops.markdown(r['top_ops'])]
        with open(os.path.join(self.out, 'gpu_sweep_summary.md'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        print('\n'.join(lines), flush=True)


def _environment(out):
    """nvidia-smi's view of the card, recorded before anything runs."""
    try:
        query = 'name,driver_version,memory.total,clocks.max.sm,power.limit'
        text = subprocess.run(
            ['nvidia-smi', f'--query-gpu={query}', '--format=csv'],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        text = f'nvidia-smi unavailable: {e}'
    with open(os.path.join(out, 'gpu_sweep.log'), 'a') as f:
        f.write(f'### environment\n{text}\npython {sys.version}\n\n')
    print(text.strip(), flush=True)


def run_sweep(out, budget_s, steps=10, warmup=3, smoke=False, dry_run=False, stage_names=None) -> list[dict]:
    """The smoke point, then the stages (all, or those named), then the summary; returns the records."""
    BASE.clear()
    BASE.update(_BASE)
    if smoke:
        BASE.update(config='crate_mae_test', batch=16, smoke=True)
    sweep = Sweep(out, budget_s, steps, warmup, dry_run)
    _environment(out)
    first = sweep.run(_point('smoke', 'smoke', {'model.dtype': 'float32'}, 'crate_mae_test', 16), steps=2, warmup=1)
    if 'error' in first and not dry_run:
        print('The smoke point failed; see gpu_sweep.log. Stopping.', flush=True)
        return [first]
    for name, make in stages():
        if stage_names is None or name in stage_names:
            for point in make(sweep.results):
                sweep.results.append(sweep.run(point))
    sweep.summary()
    return [first, *sweep.results]


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m tools.gpu_sweep')
    p.add_argument('--out', default=os.environ.get('OUT', 'gpu_sweep_out'))
    p.add_argument('--budget_s', type=float, default=450.0, help='Start no point that would end after this.')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--dry_run', action='store_true', help='Write the plan of the first stages, run nothing.')
    p.add_argument('--smoke', action='store_true', help='Every point on crate_mae_test, batch 16 (a CPU check).')
    p.add_argument('--stages', default=None, help='Comma-separated stage names to run (default: all).')
    args = p.parse_args(argv)
    names = None if args.stages is None else args.stages.split(',')
    unknown = set(names or ()) - {name for name, _ in stages()}
    if unknown:
        p.error(f'unknown --stages {sorted(unknown)}; choose from {[name for name, _ in stages()]}.')
    records = run_sweep(args.out, args.budget_s, args.steps, args.warmup, args.smoke, args.dry_run, names)
    return 1 if len(records) == 1 and 'error' in records[0] and not args.dry_run else 0


if __name__ == '__main__':
    raise SystemExit(main())
