"""Our CPU train step against the reference PyTorch CRATE-MAE, or options against each other, in one process,
alternating.

  python tools/compare_reference_cpu.py --reference_dir PATH/TO/CRATE [--model tiny] [--batch 16] [--rounds 3]
      [--steps 1] [--modes jax_f32,torch_f32,torch_bf16] [--variant NAME=KEY=VALUE[,...] ...] [--output FILE]
  python tools/compare_reference_cpu.py --config=crate_mae_mnist --batch 128 --modes jax_f32 \
      --variant unfused=model.fused_ista=False --variant bf16=model.dtype=bfloat16     # options only, no torch

PATH/TO/CRATE is a checkout of Ma-Lab-Berkeley/CRATE (its model/crate_ae package is imported from there; nothing of
it is copied here). It needs torch, timm and einops. Modes:

- jax_f32: this framework's jitted train step (cratemae.train.tasks.build_program, crate_mae_<model>, float32);
- jax_bf16: the same with model.dtype=bfloat16 (parameters stay float32);
- torch_f32: the reference's mae_crate_<model> in eager PyTorch, AdamW, float32;
- torch_bf16: the same under torch.autocast('cpu', bfloat16) (oneDNN's bf16 kernels);
- jax:NAME: from ``--variant NAME=KEY=VALUE,...``, our step with those config values (any config path).

The jax modes take the config's platform choices for options it leaves unset (``models.apply_platform_defaults``),
as a run does; each record lists its overrides.

Every mode is built and warmed up first; then each round runs ``--steps`` steps of every mode in turn (ABAB...), so
drift from a shared machine hits all modes alike. One JSON line per mode: images/s (median and best round), process
CPU-seconds per step, achieved matmul GFLOP/s (cratemae/flops.py), the ratio to the fastest torch mode, the load
average and busiest processes before and after, versions and date.

timm imports torchvision, which only some machines can load beside a CPU-only torch (a CUDA torchvision wheel fails
with "operator torchvision::nms does not exist"). CRATE-MAE uses nothing of torchvision, so ``--stub_torchvision``
puts a placeholder module in its place; the record says so.
"""

if __name__ == '__main__':  # the same process settings as launch/train.py (cratemae/platform.py)
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cratemae import platform as _platform

    _platform.reexec_with_cpu_tunables()

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _load():
    ps = subprocess.run(
        ['ps', '-eo', 'pcpu,nice,args', '--sort=-pcpu'], capture_output=True, text=True, check=False
    ).stdout
    return {'loadavg': [round(x, 2) for x in os.getloadavg()], 'top': [line[:110] for line in ps.splitlines()[1:6]]}


def _parse_variant(text):
    """'NAME=KEY=VALUE[,KEY=VALUE...]' -> (NAME, ['KEY=VALUE', ...]); the values are parsed later as --config.KEY=VALUE
    command-line overrides are (launch/cli.py), so types, misspelt keys and bad values fail the same way."""
    name, _, rest = text.partition('=')
    overrides = [item for item in rest.split(',') if item]
    if not name or not overrides or any(not item.partition('=')[0] or '=' not in item for item in overrides):
        raise ValueError(f'--variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]')
    return name, overrides


def _jax_mode(config_name, batch, overrides):
    import jax

    from cratemae import benchmark
    from cratemae import sharding
    from cratemae.train import engine
    from cratemae.train import tasks
    from launch import cli

    flag_values = cli.flag_values()
    config_flag = cli.define_config(flag_values)
    argv = [f'--config={config_name}', f'--config.train.global_batch={batch}'] + [f'--config.{o}' for o in overrides]
    cli.parse(flag_values, ['compare_reference_cpu'] + argv)  # UsageError for a misspelt key or a bad value
    config = config_flag.value
    mesh = sharding.make_mesh(config.mesh)
    engine.settle_config(config, mesh, jax.process_count())  # as the engine does
    program = tasks.build_program(config, mesh)
    state = program.init()
    data = benchmark.synthetic_batch(config, batch, sharding.batch_sharding(mesh))  # uint8, as the engine feeds it
    compiled = program.train_step.lower(state, data).compile()
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], data)
        jax.block_until_ready((box[0], metrics))

    return step, config.model


def _torch_mode(model, batch, reference_dir, bf16, stub_torchvision):
    if stub_torchvision and 'torchvision' not in sys.modules:
        _install_torchvision_placeholder()
    import torch

    sys.path.insert(0, reference_dir)
    from model.crate_ae import crate_ae  # the reference's own code, from the user's checkout

    torch.manual_seed(0)
    net = getattr(crate_ae, f'mae_crate_{model}')()
    # The recipe's AdamW (FAIR MAE): lr = 1.5e-4 * batch / 256, betas (0.9, 0.95), weight decay 0.05.
    opt = torch.optim.AdamW(net.parameters(), lr=1.5e-4 * batch / 256, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(batch, 3, 224, 224)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = net(images, mask_ratio=0.75)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class _PlaceholderType(type):
    def __getattr__(cls, name):  # e.g. InterpolationMode.NEAREST at timm's import time
        if name.startswith('__'):
            raise AttributeError(name)
        return _PlaceholderType(name, (), {})


class _Placeholder(types.ModuleType):
    """A torchvision module whose every attribute is an empty class: timm imports names, CRATE-MAE uses none."""

    __path__ = ()  # a package, so ``import torchvision.x.y`` goes through the finder below

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        value = _PlaceholderType(name, (), {})
        setattr(self, name, value)
        return value


class _PlaceholderFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        import importlib.machinery

        if name == 'torchvision' or name.startswith('torchvision.'):
            return importlib.machinery.ModuleSpec(name, _PlaceholderFinder)
        return None

    @staticmethod
    def create_module(spec):
        return _Placeholder(spec.name)

    @staticmethod
    def exec_module(module):
        pass


def _install_torchvision_placeholder():
    sys.meta_path.insert(0, _PlaceholderFinder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--reference_dir', help='a checkout of Ma-Lab-Berkeley/CRATE (needed by the torch modes)')
    p.add_argument('--model', default='tiny', choices=['tiny', 'small', 'base'])
    p.add_argument('--config', default=None, help='registry name of the jax modes (default crate_mae_MODEL)')
    p.add_argument(
        '--variant',
        action='append',
        default=[],
        help="an extra jax mode, NAME=KEY=VALUE[,KEY=VALUE...], e.g. fused=model.fused_ista=True (repeatable)",
    )
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--steps', type=int, default=1, help='steps per mode per round')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--modes', default='jax_f32,torch_f32,torch_bf16')
    p.add_argument('--stub_torchvision', action='store_true')
    p.add_argument('--output', default=None, help='also append the JSON lines here')
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    unknown = set(modes) - {'jax_f32', 'jax_bf16', 'torch_f32', 'torch_bf16'}
    if unknown:
        p.error(f'unknown modes {sorted(unknown)}; choose from jax_f32, jax_bf16, torch_f32, torch_bf16.')
    overrides = {'jax_f32': ['model.dtype=float32'], 'jax_bf16': ['model.dtype=bfloat16']}
    for text in args.variant:
        try:
            name, variant = _parse_variant(text)
        except ValueError as e:
            p.error(str(e))
        modes.append(f'jax:{name}')
        overrides[f'jax:{name}'] = variant
    config_name = args.config or f'crate_mae_{args.model}'
    torch_modes = [m for m in modes if m.startswith('torch')]
    if torch_modes and not (
        args.reference_dir and os.path.isdir(os.path.join(args.reference_dir, 'model', 'crate_ae'))
    ):
        p.error(
            f'--reference_dir {args.reference_dir!r} has no model/crate_ae: the modes {torch_modes} need a '
            'Ma-Lab-Berkeley/CRATE checkout (or leave them out with --modes).'
        )

    from cratemae import flops
    from experiments import registry
    from launch import cli

    steps, train_flops = {}, {}
    for mode in modes:
        if mode.startswith('jax'):
            try:
                steps[mode], model_config = _jax_mode(config_name, args.batch, overrides[mode])
            except cli.UsageError as e:  # a misspelt key, a bad value, an unknown experiment
                p.error(f'{mode}: {e}')
        else:
            steps[mode] = _torch_mode(
                args.model, args.batch, args.reference_dir, mode == 'torch_bf16', args.stub_torchvision
            )
            model_config = registry.get_config(f'crate_mae_{args.model}').model  # unset fused_ista counts 3 matmuls
        train_flops[mode] = flops.train_flops(model_config, args.batch) * args.batch
    for mode in modes:
        for _ in range(args.warmup):
            steps[mode]()
    load_before = _load()
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                steps[mode]()
            wall[mode].append((time.perf_counter() - w0) / args.steps)
            cpu[mode].append((time.process_time() - c0) / args.steps)
    load_after = _load()

    import jax

    torch = sys.modules.get('torch')
    env = {
        'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'cpu_count': os.cpu_count(),
        'jax': jax.__version__,
        'torch': torch.__version__ if torch else None,
        'torch_threads': torch.get_num_threads() if torch else None,
        'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'torchvision_placeholder': args.stub_torchvision,
        'load_before': load_before,
        'load_after': load_after,
    }
    try:
        with open('/proc/cpuinfo') as f:
            env['cpu_model'] = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), None)
    except OSError:
        env['cpu_model'] = None
    best_torch = max((args.batch / statistics.median(wall[m]) for m in modes if m.startswith('torch')), default=None)
    for mode in modes:
        ips = args.batch / statistics.median(wall[mode])
        record = {
            'benchmark': 'compare_reference_cpu',
            'mode': mode,
            'model': config_name if mode.startswith('jax') else f'mae_crate_{args.model} (reference)',
            'overrides': overrides.get(mode, []),
            'batch': args.batch,
            'rounds': args.rounds,
            'steps_per_round': args.steps,
            'images_per_s': ips,
            'images_per_s_best_round': args.batch / min(wall[mode]),
            's_per_step': [round(x, 3) for x in wall[mode]],
            'cpu_s_per_step': [round(x, 3) for x in cpu[mode]],
            'images_per_cpu_s': args.batch / statistics.median(cpu[mode]),
            'achieved_gflop_per_s': train_flops[mode] / statistics.median(wall[mode]) / 1e9,
            'ratio_to_best_torch_mode': None if best_torch is None else ips / best_torch,
            **env,
        }
        line = json.dumps(record, sort_keys=True)
        print(line, flush=True)
        if args.output:
            with open(args.output, 'a') as f:
                f.write(line + '\n')


if __name__ == '__main__':
    main()
