"""The first accelerator run, prepared: one device call returns every number, stage by stage, most important first.

  python3 tools/device_run.py [--out DIR] [--budget_s 400] [--stages env,correctness,headline,reference,sweep]
  python tools/device_run.py --rehearse      every stage at tiny sizes on this CPU (records in runs/device_rehearsal)

On the device it runs on the image's own python3 (jax 0.11.2 there), with the wheels of tools/device_wheels.sh
installed into a target directory and this repository on PYTHONPATH (nothing pip-installs cratemae, so the pins
of setup.py do not fight the image). Records go to $OUT/device_run.jsonl as each check ends, so a timeout still
returns what is done; every line carries the device kind, the versions, the date and the command. Subprocess
commands and output tails go to $OUT/device_run.log.

  1 env          device, driver, versions, free memory; every module imports; ops, model and bf16 tests on the GPU
  2 correctness  two float32 steps of crate_mae_tiny on the GPU equal the host CPU's (STEP_TOLERANCE);
                 launch.train of crate_mae_test end to end (eval, pictures, checkpoint); SIGKILL at the middle
                 checkpoint and a rerun that resumes to the same final loss (RESUME_TOLERANCE); bf16 compute over
                 the same steps tracks float32 (BF16_BOUND)
  3 headline     CRATE-MAE-Base, reference architecture, 224 px, mask 0.75, bf16, batch 256 (launch.benchmark):
                 images/s, peak memory, first-compile time; best guess (cuDNN attention), einsum if that fails
  4 reference    the reference PyTorch CRATE-MAE-Base (a checkout in .reference/CRATE): eager + bf16 autocast,
                 then torch.compile (tools/device_checks/reference_torch.py)
  5 sweep        tools/gpu_sweep.py with the time left: attention, remat, knobs, then a profile of the fastest
                 point summarised as a top-ops table, then models and extras

--rehearse runs the same stages on the CPU: crate_mae_test instead of Tiny and Base, a handful of steps, the
reference at width 32 with torch.compile's aot_eager backend, the sweep's smoke and profile points only. It also
hides tensorflow_datasets from every subprocess, since the device carries no tfds.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import gpu_sweep  # noqa: E402
from tools.device_checks import records as records_lib  # noqa: E402

STAGES = ('env', 'correctness', 'headline', 'reference', 'sweep')
# Two float32 steps at 'highest' matmul precision, GPU vs host CPU (different kernels and reduction orders).
STEP_TOLERANCE = {'loss_rel': 1e-4, 'grad_norm_rel': 1e-3, 'param_projection_rel': 1e-3}
# The resumed run's final loss against the uninterrupted run's (bit-exact on a CPU; GPU reductions may reorder).
RESUME_TOLERANCE = 1e-5
# bf16 compute vs float32: the largest relative difference of the logged training losses.
BF16_BOUND = 0.05
COMPAT_TESTS = (
    'tests/test_ops.py::test_subspace_attention_and_mssa',
    'tests/test_ops.py::test_ista',
    'tests/test_ops.py::test_loss_matches_reference',
    'tests/test_model_options.py::test_bfloat16_compute_is_close',
)
SIZES = {
    'device': {
        'compat': COMPAT_TESTS,
        'step': ('crate_mae_tiny', 8),
        'train': {'steps': 100, 'every': 50, 'log_every': 10, 'flags': []},
        'headline': {'config': 'crate_mae_base', 'batch': 256, 'steps': 10, 'warmup': 3},
        'best_guess': {'model.attention': 'cudnn'},
        'reference': ['--model', 'base', '--batch', '256', '--steps', '10', '--warmup', '3'],
        'sweep': {'smoke': False, 'stages': None, 'steps': 10, 'warmup': 3},
    },
    'rehearse': {
        'compat': COMPAT_TESTS[2:3],  # the others take a minute of this CPU; the tests run here anyway
        'step': ('crate_mae_test', 16),
        # The white-box eval measures compile for a minute of this CPU; the test suite covers them.
        'train': {'steps': 12, 'every': 6, 'log_every': 2, 'flags': ['--config.eval.whitebox=false']},
        'headline': {'config': 'crate_mae_test', 'batch': 16, 'steps': 2, 'warmup': 1},
        'best_guess': {},  # cuDNN cannot run on a CPU; the rehearsal times the fallback directly
        'reference': ['--tiny', '--batch', '8', '--steps', '2', '--warmup', '1', '--compile_backend', 'aot_eager'],
        'sweep': {'smoke': True, 'stages': ['profile'], 'steps': 2, 'warmup': 1},
    },
}


class DeviceRun:
    def __init__(self, args, argv):
        self.args, self.rehearse = args, args.rehearse
        self.sizes = SIZES['rehearse' if args.rehearse else 'device']
        self.rec = records_lib.Recorder(args.out, args.budget_s, args.rehearse, argv)
        self.scratch = tempfile.mkdtemp(prefix='device_run_')
        paths = [REPO, *filter(None, [os.environ.get('PYTHONPATH')])]
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED='1',
            JAX_COMPILATION_CACHE_DIR=os.path.join(self.scratch, 'jax_cache'),  # the resumed run recompiles nothing
        )
        if self.rehearse:
            self.env['JAX_PLATFORMS'] = 'cpu'
            paths.insert(0, self._hide_tfds())
        self.env['PYTHONPATH'] = os.pathsep.join(paths)

    def _hide_tfds(self):
        """A tensorflow_datasets that refuses to import, first on the path: the rehearsal sees the device's set."""
        folder = os.path.join(self.scratch, 'hidden')
        os.makedirs(os.path.join(folder, 'tensorflow_datasets'))
        with open(os.path.join(folder, 'tensorflow_datasets', '__init__.py'), 'w') as f:
            f.write(
                'raise ModuleNotFoundError("tensorflow_datasets is not carried to the device '
                '(tools/device_run.py --rehearse hides it)", name="tensorflow_datasets")\n'
            )
        return folder

    def python(self, *args, timeout, env=None):
        # A shared CPU can run the rehearsal's steps many times slower than a GPU runs the real ones.
        timeout *= 4 if self.rehearse else 1
        return self.rec.run([sys.executable, *args], min(timeout, max(5.0, self.rec.left())), env or self.env, REPO)

    # ------------------------------------------------------------------------------------------------------------
    # 1. The environment, and the compatibility check before anything costly.

    def env_stage(self):
        code, out, err, wall = self.python('-m', 'tools.device_checks.environment', timeout=120)
        result = records_lib.last_json(out)
        if result is None:
            return self.rec.write('env', 'environment', ok=False, error=err.strip()[-2000:], wall_s=wall)
        self.rec.common = {k: result[k] for k in ('device_kind', 'platform', 'versions')}
        rest = {k: v for k, v in result.items() if k not in self.rec.common}
        self.rec.write('env', 'environment', ok=code == 0, wall_s=round(wall, 1), **rest)
        code, out, err, wall = self.python(
            '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *self.sizes['compat'], timeout=150
        )
        summary = (out.strip().splitlines() or [''])[-1]
        failed = [line for line in out.splitlines() if line.startswith('FAILED')]
        return self.rec.write(
            'env',
            'compat_tests',
            ok=code == 0,
            tests=list(self.sizes['compat']),
            summary=summary,
            failed=failed,
            wall_s=round(wall, 1),
            **({} if code == 0 else {'error': out[-2000:]}),
        )

    # ------------------------------------------------------------------------------------------------------------
    # 2. Correctness.

    def one_step(self):
        config, batch = self.sizes['step']
        results = {}
        for side, platforms in (('device', self.env.get('JAX_PLATFORMS', '')), ('host', 'cpu')):
            env = dict(self.env, JAX_PLATFORMS=platforms)
            code, out, err, _ = self.python(
                '-m', 'tools.device_checks.one_step', config, str(batch), timeout=150, env=env
            )
            results[side] = records_lib.last_json(out) or {'error': err.strip()[-1500:]}
        device, host = results['device'], results['host']
        if 'error' in device or 'error' in host:
            return self.rec.write('correctness', 'step_vs_host', ok=False, config=config, error=results)
        rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
        first_d, first_h = device['metrics'][0], host['metrics'][0]
        diffs = {
            'loss_rel': rel(first_d['loss'], first_h['loss']),
            'grad_norm_rel': rel(first_d['grad_norm'], first_h['grad_norm']),
            'param_projection_rel': max(
                rel(a, b) for a, b in zip(device['param_projections'], host['param_projections'])
            ),
        }
        return self.rec.write(
            'correctness',
            'step_vs_host',
            ok=all(diffs[k] <= STEP_TOLERANCE[k] for k in diffs),
            config=config,
            batch=batch,
            differences=diffs,
            tolerance=STEP_TOLERANCE,
            device_step=device,
            host_step=host,
        )

    def train(self, workdir, *flags, kill_at=None, timeout=240):
        t = self.sizes['train']
        launcher = ['-m'] if kill_at is None else [os.path.join('tests', 'faults.py'), f'--kill_at_step={kill_at}']
        return self.python(
            *launcher,
            'launch.train',
            '--config=experiments/registry.py:crate_mae_test',
            f'--workdir={workdir}',
            f'--config.train.steps={t["steps"]}',
            f'--config.train.log_every={t["log_every"]}',
            f'--config.train.eval_every={t["every"]}',
            f'--config.checkpoint.every={t["every"]}',
            *t['flags'],
            *flags,
            timeout=timeout,
        )

    @staticmethod
    def losses(workdir):
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            rows = [json.loads(line) for line in f]
        return {r['step']: r['loss'] for r in rows if 'loss' in r}, [r for r in rows if any('eval/' in k for k in r)]

    def correctness_stage(self):
        self.one_step()
        steps = self.sizes['train']['steps']
        straight = os.path.join(self.scratch, 'straight')
        code, out, err, wall = self.train(straight)
        if code != 0:
            return self.rec.write('correctness', 'launch_train', ok=False, error=err.strip()[-2000:], wall_s=wall)
        losses, evals = self.losses(straight)
        pictures = sorted(os.listdir(os.path.join(straight, 'images')))
        checkpoints = sorted(int(p) for p in os.listdir(os.path.join(straight, 'checkpoints')) if p.isdigit())
        final = records_lib.last_json(out) or {}
        ok = bool(evals) and bool(pictures) and steps in checkpoints and final.get('step') == steps
        self.rec.write(
            'correctness',
            'launch_train',
            ok=ok,
            steps=steps,
            final=final,
            losses=losses,
            eval_rows=len(evals),
            pictures=pictures,
            checkpoints=checkpoints,
            wall_s=round(wall, 1),
        )
        killed = os.path.join(self.scratch, 'killed')
        middle = self.sizes['train']['every']
        code, _, err, _ = self.train(killed, kill_at=middle)
        code2, out2, err2, wall2 = self.train(killed)
        resumed = records_lib.last_json(out2) or {}
        diff = abs(resumed.get('loss', float('nan')) - final['loss']) / abs(final['loss'])
        self.rec.write(
            'correctness',
            'sigkill_resume',
            ok=code == -9 and code2 == 0 and f'Resumed from step {middle}' in err2 and diff <= RESUME_TOLERANCE,
            killed_exit=code,
            killed_at_step=middle,
            resumed_exit=code2,
            resumed_loss=resumed.get('loss'),
            uninterrupted_loss=final['loss'],
            relative_difference=diff,
            bit_exact=resumed.get('loss') == final['loss'],
            tolerance=RESUME_TOLERANCE,
            wall_s=round(wall2, 1),
            **({} if code2 == 0 else {'error': err2.strip()[-1500:]}),
        )
        bf16 = os.path.join(self.scratch, 'bf16')
        code, out, err, wall = self.train(bf16, '--config.model.dtype=bfloat16')
        if code != 0:
            return self.rec.write('correctness', 'bf16_vs_f32', ok=False, error=err.strip()[-2000:])
        low, _ = self.losses(bf16)
        gaps = {s: abs(low[s] - losses[s]) / losses[s] for s in losses if s in low}
        first, last = min(low), max(low)
        return self.rec.write(
            'correctness',
            'bf16_vs_f32',
            ok=max(gaps.values()) <= BF16_BOUND and low[last] < low[first],
            steps=steps,
            max_relative_gap=max(gaps.values()),
            bound=BF16_BOUND,
            tolerance=BF16_BOUND,
            bf16_losses=low,
            f32_losses=losses,
            wall_s=round(wall, 1),
        )

    # ------------------------------------------------------------------------------------------------------------
    # 3. The headline, 4. the reference, 5. the sweep.

    def benchmark(self, name, overrides):
        h = self.sizes['headline']
        point = {'config': h['config'], 'batch': h['batch'], 'overrides': {'model.dtype': 'bfloat16', **overrides}}
        cmd = gpu_sweep.command(point, h['steps'], h['warmup'])
        code, out, err, wall = self.python(*cmd[1:], timeout=240)
        result = records_lib.last_json(out) or {'error': err.strip()[-2000:]}
        keep = (
            'images_per_s',
            'ms_per_step',
            'first_step_compile_s',
            'compile_s',
            'peak_memory_gib',
            'peak_memory_source',
            'mfu',
            'options',
            'loss',
            'error',
            'config',
            'batch',
        )
        return self.rec.write(
            'headline',
            name,
            ok=code == 0 and 'images_per_s' in result,
            wall_s=round(wall, 1),
            benchmark_command=' '.join(cmd[1:]),
            **{k: result[k] for k in keep if k in result},
        )

    def headline_stage(self):
        best = self.sizes['best_guess']
        if best:
            record = self.benchmark('best_guess', best)
            if record['ok']:
                return record
        return self.benchmark('einsum', {'model.attention': 'einsum'})

    def reference_stage(self):
        reference = self.args.reference_dir
        if not os.path.isdir(os.path.join(reference, 'model', 'crate_ae')):
            return self.rec.skip('reference', 'torch', f'no reference checkout at {reference} (tools/device_wheels.sh)')
        code, out, err, wall = self.python(
            '-m',
            'tools.device_checks.reference_torch',
            '--reference_dir',
            reference,
            *self.sizes['reference'],
            timeout=300,
        )
        rows = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
        if not rows:
            return self.rec.write('reference', 'torch', ok=False, error=err.strip()[-2000:], wall_s=wall)
        for row in rows:
            self.rec.write('reference', row['mode'].split()[0], ok='error' not in row, **row)
        return rows

    def sweep_stage(self):
        s = self.sizes['sweep']
        out = os.path.join(self.rec.out, 'sweep')
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # the sweep's subprocesses inherit this process's environment
        try:
            results = gpu_sweep.run_sweep(
                out, max(0.0, self.rec.left() - 10), s['steps'], s['warmup'], s['smoke'], stage_names=s['stages']
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for r in results:
            fields = {
                k: r[k]
                for k in ('images_per_s', 'peak_memory_gib', 'first_step_compile_s', 'options', 'top_ops', 'error')
                if k in r
            }
            self.rec.write('sweep', r['sweep']['name'], ok='images_per_s' in r, point=r['sweep'], **fields)
        return results

    def run(self, stages):
        for stage in stages:
            if self.rec.left() < 15:
                self.rec.skip(stage, 'all', f'{self.rec.left():.0f} s of the budget left')
                continue
            try:
                getattr(self, f'{stage}_stage')()
            except Exception as e:  # noqa: BLE001 - one stage's failure is a record; the next stage still runs
                self.rec.write(stage, 'stage', ok=False, error=f'{type(e).__name__}: {e}'[:2000])
        shutil.rmtree(self.scratch, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog='python3 tools/device_run.py', description=__doc__.split('\n\n')[0])
    p.add_argument('--rehearse', action='store_true', help='every stage at tiny sizes on this CPU')
    p.add_argument('--out', default=None, help='default $OUT, else runs/device_rehearsal (rehearse) or runs/device_run')
    p.add_argument('--budget_s', type=float, default=None, help='default 400 on the device, 600 rehearsing')
    p.add_argument('--stages', default=','.join(STAGES), help=f'comma-separated, from {",".join(STAGES)}')
    p.add_argument('--reference_dir', default=os.path.join(REPO, '.reference', 'CRATE'))
    args = p.parse_args(argv)
    args.out = (
        args.out
        or os.environ.get('OUT')
        or os.path.join(REPO, 'runs', 'device_rehearsal' if args.rehearse else 'device_run')
    )
    args.budget_s = args.budget_s or (600.0 if args.rehearse else 400.0)
    stages = args.stages.split(',')
    if set(stages) - set(STAGES):
        p.error(f'unknown --stages {sorted(set(stages) - set(STAGES))}; choose from {STAGES}.')
    DeviceRun(args, ['tools/device_run.py', *argv]).run(stages)
    return 0


if __name__ == '__main__':
    sys.exit(main())
